"""What agents print: captured per session, logged as structured lines, kept for admins (issue 11, item 9)."""

import asyncio
import json
import signal
import sys
import urllib.request

import pytest

from corral.supervisor import errors
from corral.supervisor.agent_output import CUT_MARK, LINE_BURST, MAX_LINE_BYTES, LineSplitter
from tests.apihelpers import ADMIN, ALICE, TENANTS, assert_error, json_of, start, supervisor_of
from tests.conftest import wait_for_state
from tests.procs import start_server, wait_gone
from tests.test_ops_cli import corral

PRINTER = "tests.output_agents:Printer"


class OutputLines:
    """Collects the supervisor's ``agent_output`` events; waits for a given line (an event, not a poll)."""

    def __init__(self, sup):
        self.seen: list[dict] = []
        self.waiting: dict[str, asyncio.Future] = {}
        self.unsubscribe = sup.events.subscribe(self._on_event, types={"agent_output"})

    def _on_event(self, event: dict) -> None:
        self.seen.append(event)
        fut = self.waiting.pop(event["line"], None)
        if fut is not None and not fut.done():
            fut.set_result(event)

    async def wait_for(self, line: str, timeout: float = 20.0) -> dict:
        """The event of the first line equal to ``line`` (seen already, or when it comes)."""
        for event in self.seen:
            if event["line"] == line:
                return event
        fut = self.waiting.setdefault(line, asyncio.get_running_loop().create_future())
        return await asyncio.wait_for(fut, timeout)


async def test_each_line_is_attributed_to_its_session_and_stream(make_supervisor):
    sup = await make_supervisor(agent=PRINTER)
    lines = OutputLines(sup)
    one, two = await sup.get_or_create("out-one", "acme"), await sup.get_or_create("out-two", "globex")
    await sup.command(one, "say", {"text": "to stdout from one"})
    await sup.command(two, "say", {"text": "to stderr from two", "stream": "stderr"})
    await sup.command(one, "child", {})  # a program the agent runs writes to the same pipe
    first = await lines.wait_for("to stdout from one")
    second = await lines.wait_for("to stderr from two")
    child = await lines.wait_for("from a child program")
    assert (first["session_id"], first["tenant"], first["pid"], first["stream"]) == ("out-one", "acme", one.pid, "stdout")
    assert (second["session_id"], second["tenant"], second["pid"], second["stream"]) == ("out-two", "globex", two.pid, "stderr")
    assert (child["session_id"], child["stream"]) == ("out-one", "stdout")
    kept = sup.agent_output(one.key)
    assert [(e["stream"], e["line"], e["pid"]) for e in kept] == [
        ("stdout", "to stdout from one", one.pid), ("stdout", "from a child program", one.pid)
    ]
    assert [e["line"] for e in sup.agent_output(two.key)] == ["to stderr from two"]


async def test_a_crash_traceback_is_kept_with_the_session(make_supervisor):
    sup = await make_supervisor(agent=PRINTER)
    s = await sup.get_or_create("crasher", "acme")
    await sup.ensure_live(s)
    pid = s.pid
    with pytest.raises(errors.AgentDied):
        await sup.command(s, "crash", {"how": "exception"})
    await wait_for_state(sup, s, {"crashed"})
    # The process is gone: whatever it wrote was drained when its exit was handled.
    stderr = [e for e in sup.agent_output(s.key) if e["stream"] == "stderr"]
    assert stderr[0]["line"] == "Traceback (most recent call last):" and stderr[0]["pid"] == pid
    assert stderr[-1]["line"] == "RuntimeError: demo agent crashed on request"


async def test_the_tail_keeps_the_last_lines_and_outlives_the_session(make_supervisor):
    sup = await make_supervisor(agent=PRINTER, agent_log_lines=3)
    s = await sup.get_or_create("chatty", "acme")
    for i in range(6):
        await sup.command(s, "say", {"text": f"line {i}"})
    await sup.kill(s)  # drains the pipes
    assert [e["line"] for e in sup.agent_output(s.key)] == ["line 3", "line 4", "line 5"]
    assert "chatty" not in sup.sessions  # killed sessions leave memory; their tail stays readable
    s = await sup.get_or_create("chatty", "acme")  # back again: the new process adds to the same tail
    await sup.command(s, "say", {"text": "line 6"})
    await sup.stop(s, "ended")
    assert [e["line"] for e in sup.agent_output(s.key)] == ["line 4", "line 5", "line 6"]


async def test_a_long_line_is_cut_and_the_next_one_kept(make_supervisor):
    sup = await make_supervisor(agent=PRINTER)
    s = await sup.get_or_create("long", "acme")
    await sup.command(s, "long", {"chars": 3 * MAX_LINE_BYTES + 10})
    await sup.stop(s, "ended")
    kept = sup.agent_output(s.key)
    assert [(len(e["line"]), e.get("truncated", False)) for e in kept] == [(MAX_LINE_BYTES + len(CUT_MARK), True),
                                                                          (19, False)]
    assert kept[0]["line"].endswith(CUT_MARK)
    assert kept[1]["line"] == "after the long line"


def test_the_splitter_bounds_a_line_however_it_arrives():
    splitter = LineSplitter()
    got = []
    for piece in (b"ab", b"c\nd" + b"x" * MAX_LINE_BYTES, b"y" * 10, b"z\nlast", b"\r\nend"):
        got += splitter.feed(piece)
    got += splitter.flush()
    assert got == [(b"abc", False), (b"d" + b"x" * (MAX_LINE_BYTES - 1), True), (b"last", False), (b"end", False)]


async def test_a_flooding_agent_drops_its_output_instead_of_waiting(make_supervisor):
    sup = await make_supervisor(agent=PRINTER)
    s = await sup.get_or_create("flood", "acme")
    # Far more than a pipe holds and than the line budget takes: the agent must not block on it.
    reply = await sup.command(s, "flood", {"bytes": 8 * 1024 * 1024})
    assert reply["reply"]["dropped"] > 0
    lines = OutputLines(sup)
    await sup.kill(s)
    kept = sup.agent_output(s.key)
    assert len([e for e in kept if e["stream"] == "stdout"]) <= LINE_BURST + 200
    assert any(e["stream"] == "corral" and "lines dropped" in e["line"] for e in kept)
    lines.unsubscribe()


async def test_the_output_relays_death_is_the_zygotes_and_a_new_pair_takes_over(make_supervisor):
    import os

    import psutil

    sup = await make_supervisor(agent=PRINTER)
    s = await sup.get_or_create("relayed", "acme")
    await sup.ensure_live(s)
    zygote = sup.spawner.pid
    [relay] = [c.pid for c in psutil.Process(zygote).children() if c.cmdline()[:1] == ["corral: output relay"]]
    os.kill(relay, signal.SIGKILL)
    await wait_for_state(sup, s, {"crashed"})  # no exit could be reported without it: the zygote went too
    assert s.exit_description == "the zygote died"
    lines = OutputLines(sup)
    await sup.command(s, "say", {"text": "through the new relay"})  # a new zygote, with a relay of its own
    assert (await lines.wait_for("through the new relay"))["pid"] == s.pid
    assert sup.spawner.pid != zygote
    lines.unsubscribe()


async def test_admins_read_a_sessions_output_over_http(aiohttp_client, make_config, tmp_path):
    client = await start(aiohttp_client, make_config, tmp_path, tenants=TENANTS, agent=PRINTER)
    sup = supervisor_of(client)
    lines = OutputLines(sup)
    body = {"command": "say", "args": {"text": "hello admin"}, "session_id": "http-out"}
    await json_of(await client.post("/api/mcp-command", json=body, headers=ALICE), 200)
    await lines.wait_for("hello admin")
    answer = await json_of(await client.get("/admin/sessions/http-out/logs", headers=ADMIN), 200)
    assert answer["session_id"] == "http-out" and answer["tenant"] == "alice" and answer["kept"] == 200
    assert [(e["stream"], e["line"]) for e in answer["lines"]] == [("stdout", "hello admin")]
    assert answer["lines"][0]["pid"] == sup.sessions["alice/http-out"].pid
    last = await json_of(await client.get("/admin/sessions/http-out/logs", params={"lines": 0}, headers=ADMIN), 200)
    assert last["lines"] == []
    await assert_error(await client.get("/admin/sessions/http-out/logs", headers=ALICE), 401, "unauthorized")
    await assert_error(await client.get("/admin/sessions/nobody/logs", headers=ADMIN), 404, "session_not_found")
    await assert_error(
        await client.get("/admin/sessions/http-out/logs", params={"lines": "x"}, headers=ADMIN), 400, "wrong_type"
    )


async def test_corral_sessions_logs_prints_the_lines(aiohttp_server, make_config):
    from corral.web.app import create_app
    from corral.web.keys import SUPERVISOR

    server = await aiohttp_server(create_app(make_config(admin_token="ops-logs-token", agent=PRINTER)))
    sup = server.app[SUPERVISOR]
    s = await sup.get_or_create("cli-out", "acme")
    await sup.command(s, "say", {"text": "for the operator", "stream": "stderr"})
    await sup.stop(s, "ended")
    url = str(server.make_url("/"))
    code, out, err = await corral("sessions", "logs", "cli-out", "--url", url, env_token="ops-logs-token")
    assert code == 0, err
    stamp, pid, stream, text = out.strip().split(" ", 3)
    assert (pid, stream, text) == (str(sup.agent_output(s.key)[0]["pid"]), "stderr", "for the operator")
    assert stamp.endswith("Z")
    code, out, err = await corral("sessions", "logs", "nobody", "--url", url, env_token="ops-logs-token")
    assert code == 1 and "404" in err and "Traceback" not in err
    await sup.chat(await sup.get_or_create("quiet", "acme"), "hello")  # prints nothing
    code, out, err = await corral("sessions", "logs", "quiet", "--url", url, env_token="ops-logs-token")
    assert (code, out) == (0, "") and err.strip() == "corral: session quiet has no output kept (its agent printed nothing on this server)"


def test_the_servers_stderr_is_json_lines_only(tmp_path):
    proc, url = start_server(tmp_path, "--agent", PRINTER)
    try:
        def post(path, body):
            req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert post("/api/mcp-command", {"command": "say", "args": {"text": "printed"}, "session_id": "j1"}) == 200
        assert post("/api/mcp-command", {"command": "crash", "args": {"how": "exception"}, "session_id": "j1"}) == 502
        req = urllib.request.Request(url + "/api/sessions/j1", method="DELETE")  # waits for the process to be gone
        urllib.request.urlopen(req, timeout=30).close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert wait_gone([proc.pid], 1) == []
    records = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines() if line.strip()]
    output = [r for r in records if r["event"] == "agent_output"]
    assert {r["session_id"] for r in output} == {"j1"} and all(r["tenant"] == "default" for r in output)
    assert ("stdout", "printed") in {(r["stream"], r["line"]) for r in output}
    assert ("stderr", "RuntimeError: demo agent crashed on request") in {(r["stream"], r["line"]) for r in output}


def test_serve_lifts_its_open_files_limit(tmp_path):
    """Each live session holds a descriptor in the server (and one in the zygote): a 1024 soft limit would cap it near 768."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"the hard open-files limit here ({hard}) leaves nothing to lift")
    low = [sys.executable, "-c", "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (1024, %d)); "
           "from corral.web.cli import main; sys.exit(main())" % hard]
    proc, url = start_server(tmp_path, program=low)
    try:
        # the port opens before the limit is lifted (the port is taken first, so a second server stops
        # early): a first answer means start-up is past it
        urllib.request.urlopen(url + "/health", timeout=30).close()
        limits = open(f"/proc/{proc.pid}/limits").read()
        soft = int(next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3])
        assert soft == hard
    finally:
        proc.kill()
        proc.wait()
