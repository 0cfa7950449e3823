"""The MCP tools agent in real agent processes, with a real MCP server built with the SDK
(tests/agents/mcp_server.py) started per session over stdio, or reached over streamable HTTP."""

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from corral.supervisor import errors, states
from tests.apihelpers import json_of, start
from tests.conftest import AgentSays
from tests.procs import wait_gone
from tests.test_start_checks import PYTHON_UNREACHABLE

AGENT = "corral.agent_proc.contrib.mcp_tools:MCPTools"
SERVER = str(Path(__file__).parent / "agents" / "mcp_server.py")
SLOW = 60.0  # starting a Python MCP server imports the SDK: seconds on a busy machine

# The agent starts its MCP servers with this Python, which lives in root's 0700 home on the CI machine
# kind: an agent under its own uid cannot exec it (docs/security.md, "the Python installation").
# tests/test_sandbox.py holds the sandbox; these hold the agent.
SANDBOX = "off"


# A stdio MCP server in the standard library alone, for a Python that has no MCP SDK (the system's).
TINY_SERVER = r"""
import json, os, sys
for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg:
        continue
    method, result = msg.get("method"), None
    if method == "initialize":
        result = {"protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"tools": {}},
                  "serverInfo": {"name": "tiny", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": [{"name": "whoami", "description": "its uid", "inputSchema": {"type": "object"}}]}
    elif method == "tools/call":
        result = {"content": [{"type": "text", "text": json.dumps({"uid": os.getuid(), "python": sys.executable})}]}
    reply = {"jsonrpc": "2.0", "id": msg["id"]}
    reply.update({"result": result} if result is not None else {"error": {"code": -32601, "message": method}})
    print(json.dumps(reply), flush=True)
"""
SYSTEM_PYTHON = "/usr/bin/python3"


def stdio_servers(**names) -> str:
    """CORRAL_MCP_SERVERS naming the test server over stdio under each name."""
    return json.dumps({"mcpServers": {name: {"command": sys.executable, "args": [SERVER]} for name in names or {"tools": 1}}})


@pytest.fixture
async def sup(make_supervisor, monkeypatch):
    """A supervisor running the MCP agent with the test server configured."""
    monkeypatch.setenv("CORRAL_MCP_SERVERS", stdio_servers())
    return await make_supervisor(agent=AGENT, request_timeout=SLOW, sandbox=SANDBOX)


async def call(sup, s, name: str, **arguments) -> dict:
    """call_tool through the agent; the result as the agent returned it."""
    return (await sup.command(s, "call_tool", {"name": name, "arguments": arguments}))["reply"]


async def test_lists_and_calls_the_servers_tools(sup):
    s = await sup.get_or_create("toolbox", "default")
    tools = (await sup.command(s, "list_tools", {}))["reply"]
    assert {t["name"] for t in tools} == {"add", "whoami", "stubborn", "fail", "wait"}
    add = next(t for t in tools if t["name"] == "add")
    assert add["server"] == "tools" and add["description"] == "Add two integers."
    assert add["input_schema"]["required"] == ["a", "b"]
    result = await call(sup, s, "add", a=2, b=3)
    assert result["content"] == [{"type": "text", "text": "5"}] and result["isError"] is False
    failed = await call(sup, s, "fail", reason="not today")
    assert failed["isError"] is True and "not today" in failed["content"][0]["text"]
    state = (await sup.chat(s, 'add {"a": 20, "b": 22}'))
    assert state["reply"] == "42"
    assert state["state"] == {"servers": ["tools"], "connected": ["tools"], "tool_calls": 3}


async def test_bad_tool_requests_are_400s_and_the_agent_lives(sup):
    s = await sup.get_or_create("picky", "default")
    with pytest.raises(errors.InvalidRequest, match="no tool named 'nope'"):
        await call(sup, s, "nope")
    with pytest.raises(errors.CommandNotFound):
        await sup.command(s, "drop_tables", {})
    with pytest.raises(errors.InvalidRequest, match="JSON object"):
        await sup.chat(s, "add {not json")
    assert (await sup.chat(s, "tools"))["reply"].startswith("add (tools): Add two integers.")


@pytest.mark.parametrize("mechanism", ["rlimit", None])
async def test_a_stdio_server_is_the_sessions_child_and_dies_with_it(make_supervisor, monkeypatch, mechanism):
    """With or without a cgroup to sweep (rlimit has none), a session's servers end with it."""
    monkeypatch.setenv("CORRAL_MCP_SERVERS", stdio_servers())
    sup = await make_supervisor(agent=AGENT, request_timeout=SLOW, sandbox=SANDBOX, limit_mechanism=mechanism)
    s = await sup.get_or_create("parent", "default")
    server = json.loads((await call(sup, s, "whoami"))["content"][0]["text"])
    assert server["ppid"] == s.pid
    assert psutil.Process(server["pid"]).ppid() == s.pid
    stubborn = await call(sup, s, "stubborn")  # it would outlive its stdin closing, and ignores SIGTERM
    assert stubborn["content"][0]["text"] == "stubborn"
    other = await sup.get_or_create("sibling", "default")
    sibling = json.loads((await call(sup, other, "whoami"))["content"][0]["text"])
    assert sibling["pid"] != server["pid"]  # one server per session
    await sup.kill(s)  # SIGKILL: the agent cannot stop its servers itself
    assert wait_gone([server["pid"]], timeout=10) == []
    assert psutil.pid_exists(sibling["pid"])
    await sup.stop(other, states.ENDED)  # a clean stop closes the session's servers too
    assert wait_gone([sibling["pid"]], timeout=10) == []


async def test_an_interrupted_tool_call_leaves_the_server_usable(sup, tmp_path):
    s = await sup.get_or_create("impatient", "default")
    path = str(tmp_path / "began.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as began:
        began.bind(path)
        began.setblocking(False)
        turn = asyncio.ensure_future(sup.command(s, "call_tool", {
            "name": "wait", "arguments": {"seconds": 600, "announce": path}}))
        await asyncio.wait_for(asyncio.get_running_loop().sock_recv(began, 16), SLOW)  # the server has it
    pid = s.pid
    assert sup.interrupt(s)
    assert (await asyncio.wait_for(turn, 20))["status"] == "interrupted"
    assert (await call(sup, s, "add", a=2, b=2))["content"][0]["text"] == "4"
    assert s.pid == pid


async def test_a_server_that_cannot_start_is_an_upstream_error(make_supervisor, monkeypatch, tmp_path):
    monkeypatch.setenv("CORRAL_MCP_SERVERS", json.dumps({"mcpServers": {"ghost": {"command": str(tmp_path / "missing")}}}))
    sup = await make_supervisor(agent=AGENT, request_timeout=SLOW, sandbox=SANDBOX)
    s = await sup.get_or_create("haunted", "default")
    said = AgentSays(sup, f"cannot execute {tmp_path / 'missing'}: No such file or directory")  # in its logs
    with pytest.raises(errors.UpstreamFailed, match=f"MCP server 'ghost' failed to start: {tmp_path / 'missing'}: "):
        await sup.command(s, "list_tools", {})
    assert s.state == states.IDLE
    await said.wait()


async def test_mcp_command_endpoint_takes_list_tools_and_call_tool(aiohttp_client, make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("CORRAL_MCP_SERVERS", stdio_servers())
    client = await start(aiohttp_client, make_config, tmp_path, agent=AGENT, request_timeout=SLOW, sandbox=SANDBOX)
    listed = await json_of(await client.post("/api/mcp-command", json={"command": "list_tools", "session_id": "web"}), 200)
    assert "add" in {t["name"] for t in listed["result"]}
    called = await json_of(await client.post("/api/mcp-command", json={
        "command": "call_tool", "args": {"name": "add", "arguments": {"a": 5, "b": 6}}, "session_id": "web"}), 200)
    assert called["result"]["structuredContent"] == {"result": 11}
    refused = await client.post("/api/mcp-command", json={
        "command": "call_tool", "args": {"name": "add", "arguments": "5 and 6"}, "session_id": "web"})
    assert refused.status == 400 and (await refused.json())["error"]["code"] == "bad_request"


@pytest.fixture
def http_server(unused_tcp_port):
    """The test MCP server over streamable HTTP, in a process of its own; its URL once it listens."""
    proc = subprocess.Popen([sys.executable, SERVER, "http", str(unused_tcp_port)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:  # uvicorn says when it listens
            if "running on" in line.lower():
                break
        else:
            pytest.fail("the MCP HTTP server did not start")
        yield f"http://127.0.0.1:{unused_tcp_port}/mcp"
    finally:
        proc.kill()
        proc.wait()


async def test_a_streamable_http_server_is_connected_to(make_supervisor, monkeypatch, http_server):
    monkeypatch.setenv("CORRAL_MCP_SERVERS", json.dumps({"mcpServers": {
        "remote": {"url": http_server}, "local": {"command": sys.executable, "args": [SERVER]}}}))
    sup = await make_supervisor(agent=AGENT, request_timeout=SLOW, sandbox=SANDBOX)
    s = await sup.get_or_create("remote-user", "default")
    with pytest.raises(errors.InvalidRequest, match="name the 'server'"):
        await call(sup, s, "add", a=1, b=2)
    result = await sup.command(s, "call_tool", {"name": "whoami", "arguments": {}, "server": "remote"})
    remote = json.loads(result["reply"]["content"][0]["text"])
    assert remote["ppid"] != s.pid  # not the session's: it was connected to, not started
    assert os.getpid() != remote["pid"]


@pytest.mark.skipif(not (PYTHON_UNREACHABLE and os.path.exists(SYSTEM_PYTHON)),
                    reason="needs root, a Python the sandbox's uids cannot reach, and the system's python3")
async def test_stdio_servers_start_through_the_systems_python_when_the_sandbox_cannot_run_this_one(make_supervisor, monkeypatch):
    monkeypatch.setenv("CORRAL_MCP_SERVERS", json.dumps(
        {"mcpServers": {"tiny": {"command": SYSTEM_PYTHON, "args": ["-I", "-c", TINY_SERVER]}}}))
    sup = await make_supervisor(agent=AGENT, request_timeout=SLOW)  # the default sandbox: a uid per session
    s = await sup.get_or_create("system-python", "default")
    whoami = json.loads((await call(sup, s, "whoami"))["content"][0]["text"])
    assert whoami == {"uid": s.sandbox["uid"], "python": SYSTEM_PYTHON}
