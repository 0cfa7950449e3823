"""Density and its edge (issue 21, and issue 19's log floods): one descriptor per session, and every
resource a new session needs running out on purpose in a real ``corral serve``: the answer is a 503
with a code and Retry-After, live sessions keep answering, nothing unhandled is logged, nothing leaks.
"""

import concurrent.futures
import json
import os
import resource
import socket
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

from corral.supervisor import descriptors
from corral.supervisor.agent_output import BYTE_BURST, BYTE_RATE
from corral.supervisor.uid_claims import CLAIMS_DIR, UidClaims
from tests.procs import start_server

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the uid layer, the hard limit, cgroups)")
PIDS_CGROUP = "/sys/fs/cgroup/pids"


def call(url: str, path: str, body: dict | None = None, method: str | None = None) -> tuple[int, dict, dict]:
    """One request: (status, JSON body, headers)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}"), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}"), dict(exc.headers)


def chat(url: str, sid: str, message: str = "hello") -> tuple[int, dict, dict]:
    """POST /api/chat."""
    return call(url, "/api/chat", {"message": message, "session_id": sid})


def assert_refused(answer: tuple[int, dict, dict], code: str) -> None:
    """A 503 with the code and a Retry-After."""
    status, body, headers = answer
    assert (status, body["error"]["code"]) == (503, code), body
    assert int(headers["Retry-After"]) >= 1


def log_records(tmp_path) -> list[dict]:
    """The server's JSON log lines."""
    return [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines() if line.startswith("{")]


def assert_nothing_unhandled(tmp_path) -> None:
    """No error-level line, no unhandled error and no traceback (a line that is not JSON) in the server's log."""
    bad = [r for r in log_records(tmp_path) if r.get("level") in ("error", "critical") or "unhandled" in r["event"]]
    assert bad == []
    text = (tmp_path / "serve.log").read_text()
    assert [line for line in text.splitlines() if line.strip() and not line.startswith("{")] == []


def may_raise_hard_limits() -> bool:
    """Whether this (root) process has CAP_SYS_RESOURCE, as the server it starts will."""
    with open("/proc/self/status") as f:
        effective = int(next(line.split()[1] for line in f if line.startswith("CapEff:")), 16)
    return bool(effective & (1 << 24))


def fd_count(pid: int) -> int:
    """Open descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def _client_connection_inodes(url: str) -> set[str]:
    """Socket inodes of the TCP connections accepted on the server's port (not its listening socket)."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] != "0A":  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    return inodes


def fd_count_without_clients(pid: int, url: str) -> int:
    """Open descriptors of the server less its HTTP clients' connections, which close on their own time after
    the answer has been read (so a count taken right after a request is not off by one)."""
    clients = _client_connection_inodes(url)
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") not in clients
        except FileNotFoundError:  # closed while listed
            pass
    return count


def wait_until(condition, what: str, timeout: float = 20.0) -> None:
    """Poll a condition of another process (its descriptors, its sessions) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stop(proc) -> None:
    """SIGTERM the server and wait."""
    proc.terminate()
    proc.wait(30)


def fd_targets(pid: int) -> list[str]:
    """What each open descriptor of a process is (``socket:[…]``, ``pipe:[…]``, a path)."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed while listed
            pass
    return targets


def pipes(pid: int) -> set[str]:
    """The pipes a process holds an end of."""
    return {t for t in fd_targets(pid) if t.startswith("pipe:")}


def output_relay(zygote: int) -> int:
    """The pid of the zygote's output relay, by its title."""
    for child in psutil.Process(zygote).children():
        if " ".join(child.cmdline()).startswith("corral: output relay"):
            return child.pid
    raise AssertionError("no output relay")


async def test_a_live_session_holds_one_descriptor_in_the_server(make_supervisor):
    sup = await make_supervisor(agent="tests.output_agents:Printer")
    await sup.ensure_live(await sup.get_or_create("first", "acme"))  # the shared parts are open
    before, server_pipes = fd_count(os.getpid()), pipes(os.getpid())
    sessions = [await sup.get_or_create(f"fd{i}", "acme") for i in range(10)]
    for s in sessions:
        await sup.ensure_live(s)
    assert descriptors.PER_SESSION == 1
    assert fd_count(os.getpid()) - before <= 10  # its hub connection: no output pipe here
    assert pipes(os.getpid()) == server_pipes
    # the zygote's output relay holds the pipes' read ends, and output still arrives, marked by stream
    relayed = pipes(output_relay(sup.spawner.pid))
    assert all(pipes(s.pid) & relayed for s in sessions)
    await sup.command(sessions[0], "say", {"text": "through the zygote", "stream": "stderr"})
    await sup.stop(sessions[0], "ended")
    assert [(e["stream"], e["line"]) for e in sup.agent_output(sessions[0].key)] == [("stderr", "through the zygote")]


async def test_an_agent_holds_no_other_sessions_output_pipe(make_supervisor):
    sup = await make_supervisor(agent="tests.output_agents:Printer")
    sessions = [await sup.get_or_create(f"own{i}", "acme") for i in range(4)]
    await sup.ensure_live(sessions[0])
    zygote_fds = fd_count(sup.spawner.pid)
    for s in sessions[1:]:
        await sup.ensure_live(s)
    assert fd_count(sup.spawner.pid) == zygote_fds  # no descriptor per session in the zygote either
    held = {s.pid: pipes(s.pid) for s in sessions}
    relayed = pipes(output_relay(sup.spawner.pid))
    assert not pipes(sup.spawner.pid) & relayed  # the zygote keeps none: every agent forks with a small table
    for s in sessions:
        own = {os.readlink(f"/proc/{s.pid}/fd/1")}
        assert own == {os.readlink(f"/proc/{s.pid}/fd/2")} and own <= relayed
        assert held[s.pid] & relayed == own, "an agent holds another session's output pipe"


@needs_root
def test_running_out_of_descriptors_is_a_503_and_the_rest_keeps_answering(tmp_path):
    proc, url = start_server(tmp_path, "--max-sessions", "600000", "--rate-limit", "0")
    try:
        assert chat(url, "keeper")[0] == 200
        # as root (with CAP_SYS_RESOURCE, which a container may withhold) the hard limit was raised to
        # what 600,000 sessions need, up to fs.nr_open; the soft one to the hard one in any case
        soft, hard = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
        if may_raise_hard_limits():
            assert hard == min(descriptors.needed(600000), descriptors.kernel_ceiling())
        assert soft == hard
        # that many cannot have their sandbox uids: capped, in one line saying what fits
        capped = [r for r in log_records(tmp_path) if r["event"] == "max_sessions_capped"]
        assert len(capped) == 1 and capped[0]["limited_by"] == "sandbox uids", capped
        assert call(url, "/health")[1]["max_sessions"] == capped[0]["serving"] <= 1000

        baseline = fd_count(proc.pid)
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (2 * baseline + 40, hard))  # room for a few sessions
        made, answer = [], None
        for i in range(200):
            answer = chat(url, f"fill{i}")
            if answer[0] != 200:
                break
            made.append(f"fill{i}")
        assert_refused(answer, "out_of_descriptors")
        assert 0 < len(made) < 200
        assert chat(url, "keeper", "still there?")[0] == 200
        # connections past the whole table: the accepts that meet EMFILE wait, and are logged as a warning
        crowd = [socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) for _ in range(2 * baseline + 40)]
        wait_until(lambda: any(r["event"] == "accept_paused" for r in log_records(tmp_path)), "the accept pause")
        for sock in crowd:
            sock.close()
        assert chat(url, "keeper", "and now?")[0] == 200
        for sid in made:
            assert call(url, f"/api/sessions/{sid}", method="DELETE")[0] in (200, 202, 204)
        wait_until(lambda: fd_count(proc.pid) <= baseline, "the ended sessions' descriptors to close")
        assert chat(url, "after")[0] == 200  # the slot and descriptors came back
        assert_nothing_unhandled(tmp_path)
    finally:
        stop(proc)


def test_a_max_sessions_the_open_files_cannot_hold_is_capped_in_one_line(tmp_path):
    low = [sys.executable, "-c", "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)); "
           "from corral.web.cli import main; sys.exit(main())"]
    proc, url = start_server(tmp_path, "--max-sessions", "1000", "--sandbox-uid-range", "61800-62999", program=low)
    try:
        status, health, _ = call(url, "/health")
        capped = [r for r in log_records(tmp_path) if r["event"] == "max_sessions_capped"]
        if os.geteuid() == 0 and may_raise_hard_limits():  # root raised the hard limit instead: nothing to cap
            assert resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)[1] == descriptors.needed(1000)
            assert (health["max_sessions"], capped) == (1000, [])
            return
        fits = (1024 - descriptors.reserve(1024)) // descriptors.PER_SESSION
        assert (status, health["max_sessions"]) == (200, fits)
        assert [(r["requested"], r["serving"], r["limited_by"]) for r in capped] == [(1000, fits, "open files")]
        assert f"serving at most {fits}" in capped[0]["message"]
    finally:
        stop(proc)


def _zygote(server_pid: int) -> psutil.Process:
    """The server's zygote, by its title."""
    for child in psutil.Process(server_pid).children(recursive=True):
        if " ".join(child.cmdline()).startswith("corral: zygote"):
            return child
    raise AssertionError("no zygote")


def _pids_cgroup_of(pid: int) -> str:
    """The cgroup v1 pids directory a process is in."""
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "pids" in controllers.split(","):
                return PIDS_CGROUP + path
    raise AssertionError("no pids cgroup")


@needs_root
@pytest.mark.skipif(not os.path.isdir(PIDS_CGROUP), reason="needs the cgroup v1 pids controller to make fork fail")
def test_running_out_of_uids_and_of_processes_is_a_503_and_nothing_leaks(tmp_path):
    uids = range(61790, 61793)
    proc, url = start_server(tmp_path, "--sandbox-uid-range", f"{uids.start}-{uids.stop - 1}", "--max-sessions", "3",
                             "--rate-limit", "0")
    other_server = UidClaims(CLAIMS_DIR)  # another server on this host holding two of the range's uids
    jail = os.path.join(PIDS_CGROUP, f"corral-test-{os.getpid()}")
    try:
        assert chat(url, "one")[0] == 200
        fds = fd_count_without_clients(proc.pid, url)
        free = [uid for uid in uids if other_server.claim(uid)]
        assert len(free) == 2  # the third is session one's
        assert_refused(chat(url, "two"), "out_of_uids")
        assert chat(url, "one", "still there?")[0] == 200
        for uid in free:
            other_server.release(uid)
        assert chat(url, "two")[0] == 200

        zygote = _zygote(proc.pid)
        home = _pids_cgroup_of(zygote.pid)
        os.mkdir(jail)
        with open(os.path.join(jail, "pids.max"), "w") as f:
            f.write("1")  # the zygote alone: its next fork fails with EAGAIN
        with open(os.path.join(jail, "cgroup.procs"), "w") as f:
            f.write(str(zygote.pid))
        assert_refused(chat(url, "three"), "out_of_processes")
        assert chat(url, "two", "still there?")[0] == 200
        health = call(url, "/health")[1]
        assert health["live_sessions"] == 2 and health["sandbox"]["uids_free"] == 1  # the failed spawn's uid is back
        with open(os.path.join(home, "cgroup.procs"), "w") as f:
            f.write(str(zygote.pid))
        assert chat(url, "three")[0] == 200
        assert fd_count_without_clients(proc.pid, url) <= fds + 2 * descriptors.PER_SESSION  # two more sessions, nothing else
        assert_nothing_unhandled(tmp_path)
    finally:
        other_server.close()
        if os.path.isdir(jail):
            for pid in open(os.path.join(jail, "cgroup.procs")).read().split():
                with open(os.path.join(PIDS_CGROUP, "cgroup.procs"), "w") as f:
                    f.write(pid)
            os.rmdir(jail)
        stop(proc)


def test_eight_flooding_sessions_grow_the_log_by_at_most_their_byte_budget(tmp_path):
    proc, url = start_server(tmp_path, "--agent", "tests.output_agents:Printer", "--rate-limit", "0")
    flooders = [f"flood{i}" for i in range(8)]
    try:
        for sid in [*flooders, "quiet"]:
            assert chat(url, sid)[0] == 200
        before = os.path.getsize(tmp_path / "serve.log")
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(len(flooders)) as pool:
            floods = [pool.submit(call, url, "/api/mcp-command",
                                  {"command": "flood_control", "args": {"seconds": 3}, "session_id": sid})
                      for sid in flooders]
            answers = 0
            while not all(f.done() for f in floods):  # meanwhile another session is served
                assert chat(url, "quiet", f"turn {answers}")[0] == 200
                answers += 1
            results = [f.result() for f in floods]
        elapsed = time.monotonic() - started
        assert answers > 0 and all(status == 200 for status, _, _ in results)
        written = sum(body["result"]["lines"] for _, body, _ in results) * 1001
        assert written > 10 * 8 * (BYTE_BURST + BYTE_RATE * elapsed)  # a flood, far over the budget
        # what the pipes still held when the floods ended is read within the same budgets
        stop(proc)
        grown = os.path.getsize(tmp_path / "serve.log") - before
        bound = len(flooders) * (BYTE_BURST + BYTE_RATE * (time.monotonic() - started)) + 64 * 1024
        assert grown <= bound, (grown, bound)
        dropped = [r for r in log_records(tmp_path) if r["event"] == "agent_output_dropped"]
        assert {r["session_id"] for r in dropped} == set(flooders)
        assert all(r["bytes"] > 0 and "KiB of log a second" in r["bound"] for r in dropped)
        cut = [r for r in log_records(tmp_path) if r["event"] == "agent_output" and r.get("truncated")]
        assert cut and all(r["line"].endswith("[corral: line cut]") for r in cut)
    finally:
        if proc.poll() is None:
            stop(proc)
