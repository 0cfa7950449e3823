"""The agents' temp tree of one server, held for the server's life, and the sweep of dead servers' trees.

Each sandboxed server makes ``<tmp>/corral-agents-<run>-XXXX`` (0711) for its sessions' private
temp dirs and holds an exclusive ``flock`` on ``owner.lock`` inside it until it stops. The kernel
drops the lock when the server dies, however it dies (SIGKILL, OOM killer), so liveness is known
without guessing: at start a server tries each other tree's lock without waiting; getting it means
the owner is gone, and the tree is removed. A tree without the lock file (a server still starting,
or one of a version before the lock) is never touched.

Removing a tree (at a clean stop, or a dead server's at start) is ``tree_removal.remove_tree``:
no recursion, no symlink followed, within a time bound; what it cannot remove in time is logged and
left for the next start, which never fails for it.

The lock's fd is close-on-exec and the zygote is exec'ed with only the fds it needs, so no agent
ever holds it: an agent sharing it could unlock a live server's tree (a flock belongs to the open
file, not the process), or keep a dead server's tree alive. """
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time

from corral.supervisor.tree_removal import remove_tree

__all__ = ["PREFIX", "LOCK_NAME", "make_tree", "release_tree", "sweep_dead_trees"]

PREFIX = "corral-agents-"
LOCK_NAME = "owner.lock"
SWEEP_TIMEOUT = 30.0  # seconds the start-up sweep may take in all; what is left waits for the next start


def make_tree(run_id: str, parent: str | None = None) -> tuple[str, int]:
    """Make this server's tree (0711: agents reach their own dir by name, list nobody's); return it and the held lock's fd."""
    path = tempfile.mkdtemp(prefix=f"{PREFIX}{run_id}-", dir=parent)
    try:
        os.chmod(path, 0o711)
        return path, _hold_lock(path)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def _hold_lock(tree: str) -> int:
    """Create and lock ``owner.lock``: locked under another name first, so a sweep never finds it unlocked."""
    pending = os.path.join(tree, LOCK_NAME + ".new")
    fd = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())  # for an operator wondering whose tree it is
        os.rename(pending, os.path.join(tree, LOCK_NAME))
    except BaseException:
        os.close(fd)
        raise
    return fd


def release_tree(tree: str, lock_fd: int | None, *, timeout: float) -> dict:
    """A clean stop: remove the tree (within ``timeout`` s), then let the lock go; never raises, says what it did."""
    try:
        return remove_tree(tree, timeout=timeout).as_log()
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def sweep_dead_trees(parent: str | None = None, *, timeout: float = SWEEP_TIMEOUT) -> list[dict]:
    """Remove the trees under ``parent`` (the temp dir) whose servers are gone, within ``timeout`` s in all; say what each held."""
    parent = parent or tempfile.gettempdir()
    deadline = time.monotonic() + timeout
    try:
        names = sorted(n for n in os.listdir(parent) if n.startswith(PREFIX))
    except OSError:
        return []
    swept = []
    for name in names:
        path = os.path.join(parent, name)
        try:
            found = _sweep_if_dead(path, max(0.0, deadline - time.monotonic()))
        except OSError as exc:  # never stops a start: the next one tries again
            found = {"path": path, "sessions": 0, "bytes": 0, "removed": False, "error": str(exc)}
        if found is not None:
            swept.append(found)
    return swept


def _sweep_if_dead(tree: str, timeout: float) -> dict | None:
    """Remove one tree if nobody holds its lock: {path, sessions, bytes, removed, error}; None when left alone."""
    try:
        dir_fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # a symlink (never followed), gone meanwhile, or not ours to open
    try:
        if os.fstat(dir_fd).st_uid != os.geteuid():
            return None  # another user's, whatever its name says
        lock_fd = _take_lock(dir_fd)
        if lock_fd is None:
            return None
        try:
            if not _same_dir(dir_fd, tree):
                return None  # swapped for another entry since it was opened
            sessions = _session_dirs(dir_fd)
            with contextlib.suppress(OSError):  # first: no other sweep judges the tree while this one removes it
                os.unlink(LOCK_NAME, dir_fd=dir_fd)
            removal = remove_tree(tree, timeout=timeout)  # unlinks an agent's symlinks, never follows them
            return {"path": tree, "sessions": sessions, "bytes": removal.bytes, "removed": removal.removed,
                    "error": removal.error}
        finally:
            os.close(lock_fd)
    finally:
        os.close(dir_fd)


def _take_lock(dir_fd: int) -> int | None:
    """The tree's lock, taken without waiting; None if its server holds it or the tree has no lock file."""
    try:
        fd = os.open(LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None  # no lock file: a server still starting, or a tree from before the lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None  # its server is alive
    return fd


def _same_dir(dir_fd: int, path: str) -> bool:
    """Whether ``path`` still names the directory open on ``dir_fd`` (and is no symlink)."""
    try:
        return os.path.samestat(os.fstat(dir_fd), os.lstat(path))
    except OSError:
        return False


def _session_dirs(dir_fd: int) -> int:
    """How many session dirs a tree holds (its subdirectories; symlinks not followed)."""
    with os.scandir(dir_fd) as entries:
        return sum(1 for e in entries if e.is_dir(follow_symlinks=False))
