"""A real MCP server built with the SDK, for the MCP tools agent's tests: ``python mcp_server.py``
serves stdio; ``python mcp_server.py http PORT`` serves streamable HTTP on 127.0.0.1:PORT."""

import asyncio
import atexit
import os
import signal
import socket
import sys
import time

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("corral-test-tools")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def whoami() -> dict:
    """This server's pid and its parent's."""
    return {"pid": os.getpid(), "ppid": os.getppid()}


@server.tool()
async def stubborn() -> str:
    """From now on ignore SIGTERM and never exit on our own (stdin closing included)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    atexit.register(time.sleep, 3600)
    return "stubborn"


@server.tool()
def fail(reason: str) -> str:
    """Refuse, so the call comes back as a tool error."""
    raise ToolError(reason)


@server.tool()
async def wait(seconds: float, announce: str = "") -> str:
    """Take its time, after a datagram to ``announce`` (a unix socket path) saying it began."""
    if announce:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"began", announce)
    await asyncio.sleep(seconds)
    return "waited"


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
