"""`corral serve` as a real process: SIGKILLed under concurrent chats, restarted on the same data.

Every message whose reply a client received (HTTP 200) must be in its session's history, in
order, with that reply; nothing of the old run may outlive it; the sessions answer again.
Also: a server started on bad data says so in one line and exits non-zero.
"""

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import psutil
import pytest

from corral.supervisor.store import create_store
from tests.procs import free_port

ALICE = "Your name is Alice."
CLIENTS = 6
SESSIONS_PER_CLIENT = 4
ACKED_BEFORE_KILL = 80  # acknowledged messages to wait for before the SIGKILL
REPO = Path(__file__).resolve().parents[1]
SERVE = [sys.executable, "-c", "from corral.web.cli import main; raise SystemExit(main())", "serve"]


class Server:
    """One `corral serve` subprocess on a data dir."""

    def __init__(self, tmp_path: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"),
                "--port", str(self.port), "--rate-limit", "0", "--log-level", "info"]
        self.log = open(tmp_path / f"serve-{self.port}.log", "w+b")
        self.proc = subprocess.Popen(SERVE + args, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)

    async def ready(self, timeout: float = 20.0) -> None:
        """Wait until /health answers (the OS edge: a child process binding its port)."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                assert self.proc.poll() is None, f"corral serve exited: {self.output()}"
                try:
                    async with http.get(self.url + "/health") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, f"corral serve did not come up: {self.output()}"
                await asyncio.sleep(0.05)

    def output(self) -> str:
        """What the server logged so far."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def descendants(self) -> list[psutil.Process]:
        """The zygote and every agent of this run (found by parentage before the parent dies)."""
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self) -> None:
        """SIGTERM and reap (used for a clean shutdown at the end)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def servers(tmp_path):
    """Start servers on the test's data dir; all are stopped afterwards."""
    started = []

    def start(port: int | None = None) -> Server:
        server = Server(tmp_path, port)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


async def chat(http: aiohttp.ClientSession, url: str, session_id: str, message: str) -> str:
    """One acknowledged chat turn: the reply (raises on anything but 200)."""
    async with http.post(url + "/api/chat", json={"message": message, "session_id": session_id}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return body["reply"]


async def client_traffic(url: str, sessions: list[str], acked: dict, enough: asyncio.Event) -> None:
    """Chat round-robin over this client's sessions until the server goes away."""
    async with aiohttp.ClientSession() as http:
        for sid in sessions:
            acked[sid].append(("My name is Alice", await chat(http, url, sid, "My name is Alice")))
        i = 0
        while True:
            sid = sessions[i % len(sessions)]
            message = f"note {i} for {sid}"
            try:
                reply = await chat(http, url, sid, message)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return  # the server was killed: this message was never acknowledged
            acked[sid].append((message, reply))
            i += 1
            # every session has its process (all greeted) and enough turns were acknowledged
            if all(acked.values()) and sum(len(v) for v in acked.values()) >= ACKED_BEFORE_KILL:
                enough.set()


def titles_alive(procs: list[psutil.Process]) -> list[str]:
    """Titles of the processes in ``procs`` that still run."""
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(" ".join(proc.cmdline()) or proc.name())
        except psutil.NoSuchProcess:
            pass
    return alive


def processes_titled(marker: str) -> list[psutil.Process]:
    """Live processes whose title mentions ``marker`` (a session id prefix of this test)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if marker in " ".join(proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def assert_history_holds(history, acked: list[tuple[str, str]]) -> None:
    """The acknowledged turns open the history in order; after them at most one unanswered turn."""
    pairs = [(m.role, m.content) for m in history]
    expected = [item for message, reply in acked for item in (("user", message), ("assistant", reply))]
    assert pairs[: len(expected)] == expected
    tail = pairs[len(expected):]
    assert len(tail) <= 2 and all(role == r for (role, _), r in zip(tail, ("user", "assistant")))
    assert [m.seq for m in history] == list(range(1, len(history) + 1))


async def test_sigkill_under_traffic_loses_no_acknowledged_message(servers, tmp_path):
    marker = f"cc{uuid.uuid4().hex[:8]}"
    server = servers()
    await server.ready()
    session_ids = [[f"{marker}-{c}-{k}" for k in range(SESSIONS_PER_CLIENT)] for c in range(CLIENTS)]
    acked = {sid: [] for group in session_ids for sid in group}
    enough = asyncio.Event()
    clients = [asyncio.ensure_future(client_traffic(server.url, group, acked, enough)) for group in session_ids]
    await asyncio.wait_for(enough.wait(), 60)

    # psutil blocks: run it in a thread so the clients keep the server busy up to the kill
    old_run = await asyncio.to_thread(server.descendants)
    titles = await asyncio.to_thread(titles_alive, old_run)
    assert any("corral: zygote" in t for t in titles)
    assert sum("corral: agent" in t for t in titles) == CLIENTS * SESSIONS_PER_CLIENT
    assert len(await asyncio.to_thread(processes_titled, marker)) == CLIENTS * SESSIONS_PER_CLIENT
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    await asyncio.wait_for(asyncio.gather(*clients), 30)

    # Nothing of the old run outlives it: the zygote and agents die with their parent.
    gone, alive = await asyncio.to_thread(psutil.wait_procs, old_run, timeout=2)
    assert titles_alive(alive) == []
    assert processes_titled(marker) == []

    store = create_store(None, tmp_path / "data")  # the SQLite file the killed server wrote
    await store.open()
    try:
        for sid, turns in acked.items():
            assert_history_holds(await store.history(sid), turns)
    finally:
        await store.close()

    again = servers(server.port)  # the same node (host:port) comes back
    await again.ready()
    await store.open()
    try:  # it ended what its predecessor left live, so stats and retention see them as ended
        assert (await store.stats())["sessions_active"] == 0
    finally:
        await store.close()
    async with aiohttp.ClientSession() as http:
        answers = await asyncio.gather(*(chat(http, again.url, sid, "What is my name?") for sid in acked))
    assert answers == [ALICE] * len(acked)


# ---------------------------------------------------------------- starting on bad data


def serve_once(*args: str) -> subprocess.CompletedProcess:
    """Run `corral serve` that is expected to stop at once; its result."""
    return subprocess.run(SERVE + ["--port", str(free_port()), "--log-level", "warning", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=30)


def assert_one_line_refusal(result: subprocess.CompletedProcess, *expected: str) -> None:
    """Non-zero exit, no traceback, the last stderr line names the cause."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("corral: ")
    for text in expected:
        assert text in last


def test_serve_refuses_a_corrupt_sqlite_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "corral.sqlite3").write_bytes(b"this is not a database " * 512)
    result = serve_once("--data-dir", str(data), "--run-dir", str(tmp_path / "run"))
    assert_one_line_refusal(result, str(data / "corral.sqlite3"), "not a database")


def test_serve_refuses_an_unreachable_postgresql(tmp_path):
    url = f"postgresql://corral:secret@127.0.0.1:{free_port()}/corral"
    result = serve_once("--database-url", url, "--run-dir", str(tmp_path / "run"))
    assert_one_line_refusal(result, "cannot connect to PostgreSQL at 127.0.0.1")
    assert "secret" not in result.stderr
