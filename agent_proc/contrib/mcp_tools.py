"""An agent that gives each session its own MCP tool servers (``corral[mcp]``).

Run it with ``corral serve --agent corral.agent_proc.contrib.mcp_tools:MCPTools`` and name the servers in
``CORRAL_MCP_SERVERS`` (JSON text) or in the file ``CORRAL_MCP_CONFIG``, in the usual ``mcpServers``
shape::

    {"mcpServers": {
        "files": {"command": "python", "args": ["-m", "files_server"], "env": {"ROOT": "/srv"}},
        "search": {"url": "https://search.example/mcp", "headers": {"Authorization": "Bearer …"}}
    }}

A server with a ``command`` is started by the session (stdio) on its first tool request and stopped
with it: it is the agent's child, in its cgroup, and the kernel kills it if the agent dies. A server
with a ``url`` is connected to (streamable HTTP). ``/api/mcp-command`` takes ``list_tools`` and
``call_tool`` (``{"name", "arguments", "server"?}``); chat messages ``tools`` and ``<tool> <JSON
arguments>`` do the same from the chat page.
"""

import asyncio
import json
import os
import shutil
import stat
import sys
import sysconfig
from contextlib import AsyncExitStack

from mcp import ClientSession, MCPError, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from corral.agent_proc.agent import Agent, BadRequest, ConfigError, UnknownCommand, UpstreamError

# Runs before a stdio server's own command: asks the kernel to SIGKILL it when the agent dies,
# however it dies (the SDK starts servers in a session of their own, out of the agent's process
# group, so a group kill alone would miss them), then becomes the server.
_LAUNCHER = (
    "import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 9, 0, 0, 0); "
    "os.getppid() == int(sys.argv[1]) or os._exit(1)\n"
    "try: os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as e: sys.exit(f'cannot execute {sys.argv[2]}: {e.strerror}')"  # to the session's logs
)
_HELP = 'Say "tools" for the list, or "<tool> <JSON arguments>" to call one.'


def load_servers(env=os.environ) -> dict[str, dict]:
    """The configured servers by name, from CORRAL_MCP_SERVERS or the file CORRAL_MCP_CONFIG."""
    text, path = env.get("CORRAL_MCP_SERVERS"), env.get("CORRAL_MCP_CONFIG")
    try:
        if not text and path:
            with open(path) as f:
                text = f.read()
        config = json.loads(text or "{}")
    except (OSError, ValueError) as exc:
        raise UpstreamError(f"cannot read the MCP configuration: {exc}") from None
    servers = config.get("mcpServers", config) if isinstance(config, dict) else None
    if not isinstance(servers, dict):
        raise UpstreamError('the MCP configuration must be {"mcpServers": {name: {...}}}')
    for name, spec in servers.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("command") or spec.get("url"), str):
            raise UpstreamError(f"MCP server {name!r} needs a 'command' or a 'url'")
    return servers


# Where a system's own Python lives: the launcher's fallback when this one is out of the sessions' reach
# (a pyenv install under root's 0700 home). The launcher needs nothing but the standard library.
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")


def launcher_python(blocked=lambda path: None if os.access(path, os.R_OK | os.X_OK) else path) -> str | None:
    """The Python that starts stdio servers: this one if the session's uid can run it, else the system's.

    ``blocked(path)`` says what keeps the session from ``path`` (None: nothing); by default the
    calling process's own access, which in an agent is the session's uid.
    """
    own = (sys.executable, sysconfig.get_paths()["stdlib"])  # its standard library must be readable too
    if all(os.path.exists(p) and blocked(p) is None for p in own):
        return sys.executable
    return next((p for p in SYSTEM_PYTHONS if os.path.exists(p) and blocked(p) is None), None)


def unreachable_programs(servers: dict[str, dict], sandbox) -> list[tuple[str, str, str]]:
    """(server, program, blocking directory) for each stdio server whose programs a session's uid cannot reach.

    A stdio server is started through a Python (the launcher below), then its own command: both must
    be reachable by the session's uid.
    """
    found = []
    for name, spec in servers.items():
        if "command" not in spec:
            continue
        launcher = launcher_python(sandbox.unreachable) or sys.executable
        command = shutil.which(spec["command"], path=(spec.get("env") or {}).get("PATH")) or spec["command"]
        for program in (launcher, command):
            blocked = sandbox.unreachable(program)
            if blocked:
                found.append((name, os.path.realpath(program), blocked))
                break
    return found


class Connection:
    """One MCP server for one session, held open by a task of its own.

    The SDK's transports are anyio task groups, which must be left by the task that entered them;
    so one task enters them, stays until ``close``, and turns use the session it publishes.
    """

    def __init__(self, name: str, spec: dict):
        self.name = name
        self.spec = spec
        self.session: ClientSession | None = None
        self.launcher = sys.executable  # the Python that starts a stdio server (launcher_python)
        self.tools: list = []
        self.ready = asyncio.get_running_loop().create_future()
        self.closing = asyncio.Event()
        self.task = asyncio.create_task(self._hold())

    async def _hold(self) -> None:
        """Open the transport and the session, list the tools, and keep them open until closed."""
        try:
            async with AsyncExitStack() as stack:
                read, write = (await stack.enter_async_context(self._transport(stack)))[:2]
                self.session = await stack.enter_async_context(ClientSession(read, write))
                await self.session.initialize()
                self.tools = (await self.session.list_tools()).tools
                self.ready.set_result(None)
                await self.closing.wait()
        except BaseException as exc:  # noqa: BLE001  handed to whoever waits for the connection
            if not self.ready.done():
                self.ready.set_exception(UpstreamError(f"MCP server {self.name!r} failed to start: {self._failure(exc)}"))
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)):
                raise

    def _failure(self, exc: BaseException) -> str:
        """Why the server did not start, naming the program of a stdio server (the SDK's errors do not)."""
        if "command" not in self.spec:
            return repr(exc)
        if isinstance(exc, PermissionError):  # this Python itself, which starts the command
            return (f"permission denied executing {exc.filename or self.launcher}: can the session's uid "
                    "read it? (docs/security.md)")
        return f"{self.spec['command']}: {exc!r} (its output is in the session's logs)"

    def _transport(self, stack: AsyncExitStack):
        """The stdio or streamable HTTP transport the spec names."""
        if "url" in self.spec:
            client = create_mcp_http_client(headers=self.spec.get("headers") or None)
            stack.push_async_callback(client.aclose)
            return streamable_http_client(self.spec["url"], http_client=client)
        command = [self.spec["command"], *map(str, self.spec.get("args") or ())]
        self.launcher = launcher_python() or sys.executable  # none: the exec fails, and the 502 names it
        params = StdioServerParameters(
            command=self.launcher,
            args=["-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *command],
            env={str(k): str(v) for k, v in (self.spec.get("env") or {}).items()},
            cwd=self.spec.get("cwd"),
        )
        return stdio_client(params)

    async def close(self) -> None:
        """Close the session and stop (or disconnect from) the server."""
        self.closing.set()
        await asyncio.gather(self.task, return_exceptions=True)


class MCPTools(Agent):
    """Lists and calls the tools of the session's MCP servers."""

    @classmethod
    def check_config(cls, sandbox):
        """Refuse to start with a malformed configuration, or stdio servers the sessions cannot start."""
        try:
            servers = load_servers()
        except UpstreamError as exc:
            raise ConfigError(str(exc)) from None
        for name, program, blocked in unreachable_programs(servers, sandbox)[:1]:
            raise ConfigError(
                f"MCP server {name!r} (stdio) cannot start under the sandbox: the sessions' uids cannot reach "
                f"{program} ({blocked} is {stat.filemode(os.stat(blocked).st_mode)}); name a program they can "
                f"reach (e.g. /usr/bin/python3), install it where other users can read it, chmod o+x {blocked}, "
                f"or run with --sandbox off (docs/security.md)")

    def __init__(self, session_id, tenant, metadata=None):
        super().__init__(session_id, tenant, metadata)
        self.servers = load_servers()
        self.connections: dict[str, Connection] = {}
        self.calls = 0

    async def connected(self) -> list[Connection]:
        """Every server's connection, started on first use (a failed one is tried again next time)."""
        for name, spec in self.servers.items():
            conn = self.connections.get(name)
            if conn is None or (conn.ready.done() and conn.ready.exception() is not None):
                self.connections[name] = Connection(name, spec)
        # Shielded: an interrupted turn must not cancel a connection another turn will use.
        await asyncio.shield(asyncio.gather(*(c.ready for c in self.connections.values())))
        return list(self.connections.values())

    async def list_tools(self) -> list[dict]:
        """Every tool of every server: server, name, description, input schema."""
        return [
            {"server": c.name, "name": t.name, "description": t.description or "", "input_schema": t.input_schema}
            for c in await self.connected()
            for t in c.tools
        ]

    async def call_tool(self, name: str, arguments: dict | None, server: str | None = None) -> dict:
        """Call a tool by name (and server, where two servers have a tool of that name)."""
        if not isinstance(name, str) or not isinstance(arguments or {}, dict):
            raise BadRequest("call_tool needs a 'name' and an 'arguments' object")
        owners = [c for c in await self.connected() if (server in (None, c.name)) and any(t.name == name for t in c.tools)]
        if not owners:
            raise BadRequest(f"no tool named {name!r}" + (f" on server {server!r}" if server else ""))
        if len(owners) > 1:
            raise BadRequest(f"servers {', '.join(c.name for c in owners)} all have {name!r}: name the 'server'")
        self.calls += 1
        try:
            result = await owners[0].session.call_tool(name, arguments or {})
        except MCPError as exc:
            raise UpstreamError(f"MCP server {owners[0].name!r} failed {name!r}: {exc}") from None
        return result.model_dump(mode="json", by_alias=True, exclude_none=True)

    async def on_command(self, command, args):
        """``list_tools`` and ``call_tool`` (``{"name", "arguments", "server"?}``)."""
        args = args if isinstance(args, dict) else {}
        if command == "list_tools":
            return await self.list_tools()
        if command == "call_tool":
            return await self.call_tool(args.get("name"), args.get("arguments"), args.get("server"))
        raise UnknownCommand(command)

    async def on_message(self, text):
        """``tools``, or ``<tool> <JSON arguments>``: the tool's text content is the reply."""
        name, _, rest = text.strip().partition(" ")
        if name == "tools":
            return "\n".join(f"{t['name']} ({t['server']}): {t['description']}" for t in await self.list_tools())
        try:
            arguments = json.loads(rest) if rest.strip() else {}
        except ValueError:
            raise BadRequest(f"the arguments must be a JSON object. {_HELP}") from None
        if not name or not isinstance(arguments, dict):
            raise BadRequest(_HELP)
        result = await self.call_tool(name, arguments)
        return "\n".join(c.get("text", json.dumps(c)) for c in result.get("content", [])) or json.dumps(result)

    async def on_stop(self):
        """Close every connection (stopping the servers this session started)."""
        await asyncio.gather(*(c.close() for c in self.connections.values()))

    def snapshot(self):
        """The servers configured, those connected, and the tool calls so far."""
        connected = [n for n, c in self.connections.items() if c.ready.done() and c.ready.exception() is None]
        return {"servers": list(self.servers), "connected": connected, "tool_calls": self.calls}
