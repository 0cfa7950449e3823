"""``corral serve`` refuses at start what could only fail at the first message, in one line, before
its port opens; and an agent's tracebacks show its source lines (real servers, real sandboxes)."""

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import pytest

from corral.agent_proc.startup_checks import SandboxInfo
from tests.procs import CORRAL_MAIN, free_port, start_server

OPENAI = "corral.agent_proc.contrib.openai_chat:OpenAIChat"
MCP = "corral.agent_proc.contrib.mcp_tools:MCPTools"
PYTHON_UNREACHABLE = os.geteuid() == 0 and SandboxInfo(own_uid=True).unreachable(sys.executable)

USER_AGENTS = textwrap.dedent('''
    import os
    from corral import Agent, ConfigError

    class Plain:
        pass

    class Gated(Agent):
        @classmethod
        def check_config(cls, sandbox):
            with open(os.environ["GATE"]) as gate:  # blocks until the test opens the other end
                raise ConfigError("MYBOT_TOKEN is not set: " + gate.read())

    class Raises(Agent):
        def on_message(self, text):
            total = {"apples": 1}
            return str(total["pears"])  # the line a reader of the traceback needs
''')


def serve(tmp_path, *args, env=None, port=None) -> subprocess.Popen:
    """Start ``corral serve`` in tmp_path (where the agents' modules are)."""
    (tmp_path / "mybot.py").write_text(USER_AGENTS)
    cmd = [*CORRAL_MAIN, "serve", "--port", str(port or free_port()), "--data-dir", str(tmp_path / "data"),
           "--run-dir", str(tmp_path / "run"), *args]
    return subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def refusal(proc: subprocess.Popen) -> str:
    """The one line a refused start printed (the rest of stderr is JSON log events); exit code 1."""
    out, err = proc.communicate(timeout=60)
    said = [line for line in err.splitlines() if not line.startswith("{")]
    assert proc.returncode == 1, err
    assert len(said) == 1 and said[0].startswith("corral: cannot start: ") and "Traceback" not in err, err
    return said[0]


@pytest.mark.parametrize("agent,env,says", [
    ("mybot:Plain", {}, "mybot:Plain is not a subclass of corral.Agent (it is the class mybot.Plain)"),
    (OPENAI, {"CORRAL_OPENAI_MODEL": ""}, f"agent {OPENAI}: no model configured: set CORRAL_OPENAI_MODEL"),
])
def test_a_mistake_in_the_agent_stops_serve_in_one_line(tmp_path, agent, env, says):
    assert says in refusal(serve(tmp_path, "--agent", agent, env=env))


def test_the_port_is_not_open_while_the_agent_is_checked(tmp_path):
    gate, port = tmp_path / "gate", free_port()
    os.mkfifo(gate)
    # GATE reaches the zygote's clean environment only when declared
    proc = serve(tmp_path, "--agent", "mybot:Gated", "--agent-env", "GATE", env={"GATE": str(gate)}, port=port)
    with open(open_gate(gate, proc), "w") as writer:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        writer.write("set it in the server's environment")
    line = refusal(proc)
    assert line.endswith("agent mybot:Gated: MYBOT_TOKEN is not set: set it in the server's environment")


def open_gate(gate, proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """The write end of the FIFO, once the zygote's check_config has opened its read end (fails if serve exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # the reader arriving is the event; ENXIO is how its absence is seen
        try:
            return os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or proc.poll() is not None:
                raise AssertionError(f"serve exited before its check: {proc.communicate()[1]}") from exc
            time.sleep(0.05)
    raise AssertionError("the agent's check_config never opened the gate")


def test_an_agent_raising_on_import_is_named_by_file_and_line(tmp_path):
    (tmp_path / "brokenbot.py").write_text('import os\n\nraise RuntimeError("config missing: set MYBOT_TOKEN")\n')
    line = refusal(serve(tmp_path, "--agent", "brokenbot:Bot"))
    assert line.endswith(f"cannot load agent brokenbot:Bot: RuntimeError('config missing: set MYBOT_TOKEN') "
                         f"at {tmp_path / 'brokenbot.py'}:3: raise RuntimeError(\"config missing: set MYBOT_TOKEN\")")


@pytest.mark.skipif(not PYTHON_UNREACHABLE, reason="needs root and a Python the sandbox's uids cannot reach")
def test_mcp_stdio_servers_under_a_sandbox_that_cannot_run_python_stop_serve(tmp_path):
    servers = json.dumps({"mcpServers": {"files": {"command": sys.executable, "args": ["-m", "files_server"]}}})
    line = refusal(serve(tmp_path, "--agent", MCP, env={"CORRAL_MCP_SERVERS": servers}))
    assert f"MCP server 'files' (stdio) cannot start under the sandbox: the sessions' uids cannot reach " \
           f"{os.path.realpath(sys.executable)} ({PYTHON_UNREACHABLE} is " in line
    assert f"chmod o+x {PYTHON_UNREACHABLE}, or run with --sandbox off" in line


def test_a_crash_in_a_hook_shows_the_source_line_in_the_sessions_logs(tmp_path):
    (tmp_path / "mybot.py").write_text(USER_AGENTS)
    proc, url = start_server(tmp_path, "--agent", "mybot:Raises", cwd=tmp_path)
    try:
        req = urllib.request.Request(url + "/api/chat", data=json.dumps({"message": "hi", "session_id": "tb"}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(req, timeout=30)
        assert failed.value.code == 502
        logs = subprocess.run([*CORRAL_MAIN, "sessions", "logs", "tb", "--url", url], capture_output=True,
                              text=True, timeout=30)
        assert logs.returncode == 0, logs.stderr
        assert 'return str(total["pears"])  # the line a reader of the traceback needs' in logs.stdout, logs.stdout
        assert "KeyError: 'pears'" in logs.stdout
    finally:
        proc.kill()
        proc.wait()
