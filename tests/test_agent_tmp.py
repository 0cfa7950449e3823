"""The agents' temp trees: a SIGKILLed server's tree is swept by the next server to start, a live
server's never; the lock that tells them apart is held by the server alone, never by its zygote or agents.
"""

import asyncio
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest

from corral.supervisor.agent_tmp import LOCK_NAME, PREFIX, make_tree, sweep_dead_trees
from corral.supervisor.tree_removal import remove_tree
from tests.chaos_kit import call, client_session
from tests.procs import descendants, start_server, wait_gone

# The temp dirs on the host's disk (no tmpfs per session, which the zygote's namespace would take along
# when the server dies): what these tests sweep is what a host without the disk layer is left with.
ESCAPER = ("--agent", "tests.agents.hostile:Escaper", "--agent-disk", "0")
ONE_SESSION = ("--max-sessions", "1")


async def attack(http, url: str, sid: str, what: str, **args) -> dict:
    """One Escaper attack in a session of a server; its {"escaped", "detail"}."""
    status, body = await call(http, "POST", url + "/api/mcp-command",
                              json={"command": "attack", "args": {"what": what, **args}, "session_id": sid})
    assert status == 200, body
    return body["result"]


async def leave_files(http, url: str, sid: str, bait) -> str:
    """From inside a session: a secret file in its TMPDIR, and symlinks to a file and a dir outside; its TMPDIR."""
    tmpdir = (await attack(http, url, sid, "tmp"))["detail"]["tmpdir"]
    assert (await attack(http, url, sid, "write", path=os.path.join(tmpdir, "secret")))["escaped"]
    assert (await attack(http, url, sid, "symlink", target=str(bait / "file"), path=os.path.join(tmpdir, "to-file")))["escaped"]
    assert (await attack(http, url, sid, "symlink", target=str(bait), path=os.path.join(tmpdir, "to-dir")))["escaped"]
    return tmpdir


def log_events(path, event: str) -> list[dict]:
    """The JSON log lines of one event in a server's log."""
    found = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == event:
            found.append(entry)
    return found


def own_tree(server_dir, tmp: str) -> str:
    """The agents' temp tree of the server whose --run-dir is ``server_dir/run`` (named after its run id)."""
    (run,) = os.listdir(server_dir / "run")
    run_id = run.removeprefix("corral-")
    (tree,) = glob.glob(os.path.join(tmp, f"{PREFIX}{run_id}-*"))
    return tree


def _private_tmp(parent: str | None = None):
    """A temp dir for one test's servers alone (any corral server starting on the host sweeps /tmp),
    reachable by the agents' uids (pytest's tmp_path is root's 0700 one)."""
    path = tempfile.mkdtemp(prefix="corral-sweep-test-", dir=parent)
    os.chmod(path, 0o711)
    yield path
    remove_tree(path)  # what a failing test leaves may be too deep for shutil.rmtree


@pytest.fixture
def private_tmp():
    """A private temp dir under the host's temp dir."""
    yield from _private_tmp()


@pytest.fixture
def private_tmpfs_tmp():
    """A private temp dir on tmpfs where there is one: thousands of rmdirs cost ~0.8 ms each on this VM's ext4."""
    yield from _private_tmp("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM a server and wait for its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(30)


async def test_a_sigkilled_servers_tree_is_swept_at_the_next_start_and_a_live_ones_is_not(tmp_path, private_tmp):
    dirs = {name: tmp_path / name for name in ("dead", "live", "next")}
    for d in dirs.values():
        d.mkdir()
    bait = tmp_path / "bait"
    bait.mkdir()
    (bait / "file").write_text("not the sweep's")
    (bait / "inside").write_text("nor this")
    procs, env = [], {"TMPDIR": private_tmp}
    try:
        dead, dead_url = await asyncio.to_thread(start_server, dirs["dead"], *ESCAPER, env=env)
        procs.append(dead)
        live, live_url = await asyncio.to_thread(start_server, dirs["live"], *ESCAPER, env=env)
        procs.append(live)
        async with client_session() as http:
            dead_tmp = await leave_files(http, dead_url, "hostile", bait)
            live_tmp = await leave_files(http, live_url, "neighbour", bait)
            children = descendants(dead.pid)
            dead.send_signal(signal.SIGKILL)
            dead.wait()
            assert await asyncio.to_thread(wait_gone, children, 5.0) == []
            dead_tree = os.path.dirname(dead_tmp)
            assert os.path.dirname(dead_tree) == private_tmp  # the servers made their trees in TMPDIR
            assert os.path.exists(os.path.join(dead_tmp, "secret"))  # the leak this sweep exists for

            nxt, next_url = await asyncio.to_thread(start_server, dirs["next"], *ESCAPER, env=env)
            procs.append(nxt)
            # its port opens before its supervisor starts; the first answer comes after (and after the sweep)
            assert (await call(http, "GET", next_url + "/health"))[0] == 200
            assert not os.path.lexists(dead_tree)
            assert (bait / "file").read_text() == "not the sweep's" and (bait / "inside").read_text() == "nor this"
            assert sorted(os.listdir(live_tmp)) == ["secret", "to-dir", "to-file"]
            assert (await attack(http, live_url, "neighbour", "tmp"))["escaped"]  # the live server's agent writes on
        swept = {e["path"]: e for e in log_events(dirs["next"] / "serve.log", "stale_agent_tmp_removed")}
        assert dead_tree in swept and os.path.dirname(live_tmp) not in swept
        assert swept[dead_tree]["sessions"] == 1 and swept[dead_tree]["bytes"] == len("owned")

        # A clean stop still removes its own tree.
        live_tree, next_tree = os.path.dirname(live_tmp), own_tree(dirs["next"], private_tmp)
        assert (stop(live), stop(nxt)) == (0, 0)
        assert not os.path.lexists(live_tree) and not os.path.lexists(next_tree)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def fd_targets(pid: int) -> set[str]:
    """What every open fd of a process points at."""
    targets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile
    return targets


async def test_only_the_server_holds_its_trees_lock_not_the_zygote_or_an_agent(make_supervisor):
    sup = await make_supervisor()
    s = await sup.get_or_create("s1", "t")
    await sup.chat(s, "hello")
    lock = os.path.join(sup.sandbox.tmp_parent, LOCK_NAME)
    assert lock in fd_targets(os.getpid())
    for pid in (sup.spawner.pid, s.pid):
        assert lock not in fd_targets(pid), pid
    # held: the sweep's own open of the file cannot take the lock, so a sweep in this very process keeps the tree
    swept = sweep_dead_trees(os.path.dirname(sup.sandbox.tmp_parent))
    assert sup.sandbox.tmp_parent not in [t["path"] for t in swept]
    assert os.path.isdir(s.sandbox["tmpdir"])


HOLDER = """
import sys
from corral.supervisor.agent_tmp import make_tree
tree, fd = make_tree("holder", sys.argv[1])
print(tree, flush=True)
sys.stdin.read()
"""


def test_a_tree_is_swept_only_once_its_holder_is_dead(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        tree = holder.stdout.readline().strip()
        os.mkdir(os.path.join(tree, "s1-a"))
        with open(os.path.join(tree, "s1-a", "notes"), "w") as f:
            f.write("12345")
        assert sweep_dead_trees(str(tmp_path)) == []
        assert os.path.isdir(tree)
        holder.kill()
        holder.wait()
        assert sweep_dead_trees(str(tmp_path)) == [{"path": tree, "sessions": 1, "bytes": 5, "removed": True, "error": None}]
        assert not os.path.lexists(tree)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def unlocked_tree(parent, name: str):
    """A tree whose lock file nobody holds: what a dead server leaves."""
    tree = parent / name
    tree.mkdir()
    (tree / LOCK_NAME).write_text("1\n")
    (tree / "s1-x").mkdir()
    (tree / "s1-x" / "f").write_text("x")
    return tree


def test_what_the_sweep_leaves_alone(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = unlocked_tree(outside, "target")
    (tmp_path / f"{PREFIX}link").symlink_to(target)  # a symlinked tree: never followed
    (tmp_path / f"{PREFIX}starting").mkdir()  # no lock file yet (or made before the lock): not judged
    (tmp_path / f"{PREFIX}starting" / "s1-y").mkdir()
    (tmp_path / "other-name").mkdir()
    held_tree, held_fd = make_tree("live", str(tmp_path))
    try:
        assert sweep_dead_trees(str(tmp_path)) == []
        assert sorted(os.listdir(tmp_path)) == sorted(["outside", f"{PREFIX}link", f"{PREFIX}starting", "other-name",
                                                      os.path.basename(held_tree)])
        assert os.path.exists(target / "s1-x" / "f")
    finally:
        os.close(held_fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a tree owned by another user")
def test_another_users_tree_is_not_swept_by_root(tmp_path):
    tree = unlocked_tree(tmp_path, f"{PREFIX}someone")
    os.chown(tree, 65534, 65534)
    assert sweep_dead_trees(str(tmp_path)) == []
    assert os.path.isdir(tree / "s1-x")


def test_symlinks_an_agent_planted_in_a_dead_tree_are_removed_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    tree = unlocked_tree(tmp_path, f"{PREFIX}dead")
    (tree / "s1-x" / "to-dir").symlink_to(outside)
    (tree / "s1-x" / "to-file").symlink_to(outside / "keep")
    (tree / "s1-y").symlink_to(outside)  # a session entry that is a symlink (agents cannot make one: the parent is 0711)
    (swept,) = sweep_dead_trees(str(tmp_path))
    assert swept == {"path": str(tree), "sessions": 1, "bytes": 1, "removed": True, "error": None}
    assert (outside / "keep").read_text() == "keep" and not tree.exists()


async def test_a_deep_tree_wedges_neither_a_sessions_end_nor_the_server_nor_the_next_start(tmp_path, private_tmpfs_tmp):
    """An agent's 3,000-deep chain (with unreadable dirs and a symlink loop) once made ``shutil.rmtree``
    raise RecursionError in the zygote-message callback: the session stayed ``stopping``, its uid and
    slot were never freed, SIGTERM no longer stopped the server, and after a SIGKILL every start failed."""
    dirs = {name: tmp_path / name for name in ("first", "second")}
    for d in dirs.values():
        d.mkdir()
    env = {"TMPDIR": private_tmpfs_tmp}
    procs = []
    try:
        first, url = await asyncio.to_thread(start_server, dirs["first"], *ESCAPER, *ONE_SESSION, env=env)
        procs.append(first)
        async with client_session() as http:
            assert (await attack(http, url, "deep", "deep_tree", depth=3000))["escaped"]
            status, body = await call(http, "DELETE", url + "/api/sessions/deep")
            assert (status, body.get("state")) == (200, "ended")
            # its slot is free at --max-sessions 1: another session starts, and leaves such a tree too
            assert (await attack(http, url, "next", "deep_tree", depth=3000))["escaped"]
            dead_tree = own_tree(dirs["first"], private_tmpfs_tmp)
            children = descendants(first.pid)
            first.send_signal(signal.SIGKILL)
            first.wait()
            assert await asyncio.to_thread(wait_gone, children, 5.0) == []

            second, url = await asyncio.to_thread(start_server, dirs["second"], *ESCAPER, *ONE_SESSION, env=env)
            procs.append(second)
            assert (await call(http, "GET", url + "/health"))[0] == 200
            assert not os.path.lexists(dead_tree)
            assert (await attack(http, url, "deep", "deep_tree", depth=3000))["escaped"]
        swept = {e["path"]: e for e in log_events(dirs["second"] / "serve.log", "stale_agent_tmp_removed")}
        assert swept[dead_tree]["sessions"] >= 1  # "next"'s (and "deep"'s, if the kill came before its removal)
        live_tree = own_tree(dirs["second"], private_tmpfs_tmp)
        assert stop(second) == 0 and not os.path.lexists(live_tree)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
