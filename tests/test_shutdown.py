"""The shutdown ladder (web/serving.py) on real ``corral serve`` processes, in every signal order.

Each test keeps a turn in flight, signals the server, and checks what the waiting client got, the
exit code, that the log has no traceback, and that nothing of the tree is left: no process of the
server's process group or below it (zygote, the pid namespace's init, agents, multiprocess's
resource tracker), no run directory, no agents' temp tree.
"""

import asyncio
import contextlib
import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from corral.supervisor.agent_tmp import PREFIX
from corral.supervisor.store import create_store
from tests.chaos_kit import call, client_session
from tests.procs import CORRAL_MAIN, descendants, free_port, own_sandbox_uids, start_server, wait_gone

SLOW = ("--agent", "tests.agents.hostile:SlowAgent", "--sandbox", "off")


@pytest.fixture
def started():
    """Servers a test started: whatever the test's outcome, none outlives it."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def server(started, tmp_path, *args) -> tuple[subprocess.Popen, str]:
    """A real ``corral serve`` leading its own process group, as a shell's job."""
    proc, url = start_server(tmp_path, *own_sandbox_uids(), *args, popen={"start_new_session": True})
    started.append(proc)
    return proc, url


def until(condition, what: str, timeout: float = 30.0):
    """Poll ``condition`` (something outside this process: a log line, a session's state) until true."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(0.02)


def logged(tmp_path, text: str) -> bool:
    """Whether the server's log has ``text``."""
    return text in (tmp_path / "serve.log").read_text(errors="replace")


def run_id(tmp_path) -> str:
    """The running server's run id (its run directory is ``corral-<id>``)."""
    (run_dir,) = os.listdir(tmp_path / "run")
    return run_dir.removeprefix("corral-")


def assert_nothing_left(proc: subprocess.Popen, pids: list[int], tmp_path, run_id: str) -> None:
    """No traceback logged; every process of the tree gone; no run directory or temp tree left."""
    assert "Traceback" not in (tmp_path / "serve.log").read_text(errors="replace")
    group = []
    for p in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(p.pid) == proc.pid:
                group.append(p.pid)
    # the resource tracker leaves when the server's end of its pipe closes: a moment after the exit
    assert wait_gone(pids + group, timeout=2.0) == []
    assert list((tmp_path / "run").iterdir()) == []
    assert glob.glob(os.path.join(tempfile.gettempdir(), f"{PREFIX}{run_id}-*")) == []  # the agents' temp tree


async def busy_with_sleep(http, url: str, proc: subprocess.Popen, session_id: str) -> asyncio.Task:
    """Start a 600 s ``sleep`` command; return its call once the agent's title says it is busy."""
    call_task = asyncio.ensure_future(call(http, "POST", url + "/api/mcp-command", json={
        "command": "sleep", "args": {"seconds": 600}, "session_id": session_id}))

    def busy() -> bool:
        titles = []
        for pid in descendants(proc.pid):
            with contextlib.suppress(psutil.Error):
                titles.append(" ".join(psutil.Process(pid).cmdline()))  # empty for one exiting
        return any(t.startswith(f"corral: agent sid={session_id} ") and t.split()[-1:] == ["busy"] for t in titles)

    await asyncio.to_thread(until, busy, "busy agent")
    return call_task


def shutting_down(answer: tuple[int, dict]) -> bool:
    """Whether an answer is the ladder's JSON 503."""
    status, body = answer
    return status == 503 and body.get("error", {}).get("code") == "shutting_down"


async def test_first_signal_drains_then_answers_what_remains_503(tmp_path, started):
    proc, url = server(started, tmp_path, *SLOW, "--drain-timeout", "3")
    path = str(tmp_path / "began.sock")
    async with client_session() as http:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as began:
            began.bind(path)
            began.settimeout(30)
            short = asyncio.ensure_future(call(http, "POST", url + "/api/chat",
                                               json={"message": f"slow 1 {path}", "session_id": "short"}))
            long = asyncio.ensure_future(call(http, "POST", url + "/api/chat",
                                              json={"message": f"slow 600 {path}", "session_id": "long"}))
            assert {await asyncio.to_thread(lambda: began.recv(64).decode()) for _ in "ab"} == {"short", "long"}
        pids, run = descendants(proc.pid), run_id(tmp_path)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(until, lambda: logged(tmp_path, "draining: 2 turns in flight"), "drain log line", 5)
        status, body = await call(http, "GET", url + "/health")
        assert (status, body["status"]) == (503, "draining")
        assert shutting_down(await call(http, "POST", url + "/api/chat", json={"message": "hi", "session_id": "new"}))
        status, body = await short
        assert (status, body.get("reply")) == (200, "slept 1 in short")  # it finished inside the drain
        assert shutting_down(await long)
        code = await asyncio.to_thread(proc.wait, 30)
    assert code == 0
    assert time.monotonic() - signalled < 3 + 5
    assert_nothing_left(proc, pids, tmp_path, run)
    store = create_store(None, tmp_path / "data")
    await store.open()
    try:  # the interrupted turn's message stays stored
        assert [(m.role, m.content) for m in await store.history("long")] == [("user", f"slow 600 {path}")]
    finally:
        await store.close()


@pytest.mark.parametrize("signals, whom", [
    (("SIGINT", "SIGINT"), "group"),  # Ctrl-C twice at a terminal: every process of the job gets it
    (("SIGTERM", "SIGINT", "SIGTERM"), "server"),  # three in a row, mixed, to the server alone
])
async def test_a_further_signal_stops_within_two_seconds(tmp_path, started, signals, whom):
    proc, url = server(started, tmp_path)
    send = (lambda sig: os.killpg(proc.pid, sig)) if whom == "group" else proc.send_signal
    async with client_session() as http:
        turn = await busy_with_sleep(http, url, proc, "sleeper")
        pids, run = descendants(proc.pid), run_id(tmp_path)
        send(getattr(signal, signals[0]))
        await asyncio.to_thread(until, lambda: logged(tmp_path, "draining: 1 turns in flight"), "drain log line", 5)
        hurried = time.monotonic()
        for name in signals[1:]:
            send(getattr(signal, name))
        assert shutting_down(await turn)
        code = await asyncio.to_thread(proc.wait, 30)
    assert time.monotonic() - hurried < 2.0
    assert code == 0
    assert_nothing_left(proc, pids, tmp_path, run)
    store = create_store(None, tmp_path / "data")
    await store.open()
    try:  # stopped by the server, not crashed (it comes back without spending its restart budget)
        assert (await store.get_session("sleeper")).status == "ended"
    finally:
        await store.close()


def test_a_signal_during_start_up_stops_it_cleanly(tmp_path, started):
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [*CORRAL_MAIN, "serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
             "--run-dir", str(tmp_path / "run"), *own_sandbox_uids()],
            stderr=err, start_new_session=True)
    started.append(proc)
    # the store, the resource tracker and the zygote are about to start: the signal lands while the
    # zygote's interpreter starts (it must not die of it with a KeyboardInterrupt traceback)
    until(lambda: logged(tmp_path, "limit_mechanism"), "start-up under way")
    run = run_id(tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(30) == 0
    assert logged(tmp_path, "stopping during start-up")
    assert_nothing_left(proc, [], tmp_path, run)


def _serve(tmp_path, port: int) -> subprocess.Popen:
    """``corral serve`` on its defaults, its stderr piped."""
    return subprocess.Popen([*CORRAL_MAIN, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data"),
                             "--run-dir", str(tmp_path / "run")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _seconds_to_listen(tmp_path) -> float:
    """How long ``corral serve`` takes, on this machine now, from its start to accepting connections."""
    port = free_port()
    began = time.monotonic()
    proc = _serve(tmp_path, port)
    try:
        while True:
            assert proc.poll() is None, proc.communicate()[1].decode()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return time.monotonic() - began
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


def _seconds_for_python_to_start() -> float:
    """How long this interpreter takes to start and leave doing nothing (site and its imports included; median of 3)."""
    times = []
    for _ in range(3):
        began = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.monotonic() - began)
    return sorted(times)[1]


STEPS = 24


def test_a_ctrl_c_at_any_moment_of_the_start_up_leaves_without_a_traceback(tmp_path):
    """Ctrl-C at 24 moments spread over the start-up (Python importing corral, the command line read, the
    web stack loading, the shutdown ladder taking over) ends it quietly, with 130 or 0.

    The sleeps are the point of the test, not a stand-in for an event: the signal must land at
    moments before any event could be waited on; they are spread between the interpreter's own
    start (its first ~40 ms, before any of corral's code runs, are Python's to answer: twice that,
    for a margin) and the port accepting connections, both measured first, so a slower machine
    moves them with it.
    """
    python = 2 * _seconds_for_python_to_start()
    span = _seconds_to_listen(tmp_path / "measured")
    for step in range(1, STEPS + 1):
        proc = _serve(tmp_path / str(step), free_port())
        time.sleep(python + (span - python) * step / STEPS)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=30)[1].decode()
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, (step, err)
        assert proc.returncode in (0, 128 + signal.SIGINT), (step, proc.returncode, err)
