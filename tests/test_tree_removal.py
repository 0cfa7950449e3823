"""The remover of agents' trees: any shape (100,000 deep, unreadable dirs, symlink loops) goes, without
recursion, without following a symlink, within its time bound; it never raises. The trees are real
(made on tmpfs where there is one: the agents' temp dirs are tmpfs mounts under a disk bound)."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from corral.supervisor.tree_removal import Remover, remove_tree
from tests.test_sandbox import in_child

ROOT = os.geteuid() == 0
AGENT_UID = 60990  # an agent's uid: unused on the host, and nobody's name


@pytest.fixture
def scratch():
    """A dir anyone may write in, on tmpfs when /dev/shm is one (fast to fill), removed afterwards."""
    parent = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = tempfile.mkdtemp(prefix="corral-removal-test-", dir=parent)
    os.chmod(path, 0o777)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def chain(top: Path, depth: int) -> None:
    """A ``depth``-deep chain of dirs under ``top`` (one descriptor at a time: no path is that long)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    with open(os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "w") as f:
        f.write("at the bottom")
    os.close(fd)


def hostile_tree(top: Path, outside: Path) -> None:
    """What an agent leaves to trip a remover: symlink loops, links out, unreadable and unwritable dirs."""
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "file").write_text("12345")
    (top / "a" / "loop").symlink_to("..")
    (top / "a" / "b" / "self").symlink_to("self")
    (top / "out-dir").symlink_to(outside)
    (top / "out-file").symlink_to(outside / "keep")
    (top / "closed" / "inner").mkdir(parents=True)
    (top / "closed" / "inner" / "f").write_text("x")
    os.chmod(top / "closed" / "inner", 0o000)
    os.chmod(top / "closed", 0o000)
    (top / "no-write").mkdir()
    (top / "no-write" / "f").write_text("y")
    os.chmod(top / "no-write", 0o500)


def test_a_100000_deep_chain_goes_without_recursion(scratch):
    top = scratch / "deep"
    top.mkdir()
    chain(top, 100_000)
    with pytest.raises(RecursionError):
        shutil.rmtree(top / "d" / "d")  # what cleaned temp dirs before (ignore_errors does not catch this)
    removal = remove_tree(str(top))
    assert (removal.removed, removal.failures, removal.error) == (True, 0, None)
    assert removal.entries == 100_000 + 1 + 1 and removal.bytes == len("at the bottom")  # the chain, the file, top


@pytest.mark.parametrize("who", [pytest.param(None, id="as-root" if ROOT else "as-self"),
                                 pytest.param(AGENT_UID, id="as-the-agents-uid")])
def test_unreadable_dirs_and_symlink_loops_go_and_nothing_outside_is_touched(scratch, who):
    if who is not None and not ROOT:
        pytest.skip("needs root to become another uid")
    outside = scratch / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    top = scratch / "tree"

    def make_and_remove():
        top.mkdir()
        hostile_tree(top, outside)
        removal = remove_tree(str(top))
        return removal.removed, removal.failures, removal.bytes

    # as the agents' uid (no CAP_DAC_OVERRIDE): the owner gives itself rwx back on what it closed
    assert in_child(make_and_remove, uid=who) == (True, 0, len("12345") + 2)
    assert (outside / "keep").read_text() == "keep" and not os.path.lexists(top)


def test_the_time_bound_stops_a_removal_and_it_says_what_is_left(scratch):
    top = scratch / "slow"
    top.mkdir()
    chain(top, 50)
    stopped = remove_tree(str(top), timeout=0)
    assert not stopped.removed and stopped.error.startswith("gave up after")
    assert remove_tree(str(top)).removed  # the next try (the next start's sweep) finishes it


def test_a_missing_path_or_a_symlink_in_place_of_the_tree_is_no_error(scratch):
    (scratch / "target").mkdir()
    (scratch / "target" / "keep").write_text("keep")
    (scratch / "link").symlink_to(scratch / "target")
    assert remove_tree(str(scratch / "absent")).removed
    assert remove_tree(str(scratch / "link")).removed
    assert (scratch / "target" / "keep").read_text() == "keep"


def test_the_remover_queues_off_the_caller_and_close_calls_off_the_rest(scratch):
    done = []
    remover = Remover(on_done=done.append)
    for name in ("one", "two"):
        (scratch / name).mkdir()
        chain(scratch / name, 10)
        remover.submit(str(scratch / name))
    assert remover.drain(10)
    assert [(Path(r.path).name, r.removed) for r in done] == [("one", True), ("two", True)]
    assert remover.close(1)
    (scratch / "late").mkdir()
    remover.submit(str(scratch / "late"))  # after close: nothing runs, nothing raises
    assert (scratch / "late").is_dir()


def test_a_removal_past_its_bound_is_reported_and_the_next_one_still_runs(scratch):
    done = []
    remover = Remover(timeout=0, on_done=done.append)  # every removal out of time at once
    (scratch / "big").mkdir()
    chain(scratch / "big", 20)
    remover.submit(str(scratch / "big"))
    remover.submit(str(scratch / "absent"))
    assert remover.close(10)
    assert [(Path(r.path).name, r.removed, (r.error or "")[:13]) for r in done] == [
        ("big", False, "gave up after"), ("absent", True, "")]
