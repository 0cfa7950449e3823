"""Removing a tree an agent wrote, whatever it made of it: no recursion, no symlink followed, a time bound.

An agent controls its temp dir's shape: a 100,000-deep chain (``shutil.rmtree`` recurses and raises
``RecursionError`` past ~1,000), a million entries, directories it made unreadable or unwritable,
symlink loops. ``remove_tree`` walks it with an explicit stack, holding one directory descriptor at
a time (going down by ``openat`` of the child, back up by ``openat(fd, "..")`` checked against the
recorded identity of the parent, so a tree swapped underneath is noticed, not followed), removes
every entry with ``unlinkat`` relative to that descriptor, gives its owner ``rwx`` back on a
directory it closed, and stops at a deadline. It never raises: what it could not remove is reported.

``Remover`` runs removals one after another on a thread of its own, so neither the event loop nor a
session's end ever waits for one, and logs each one that leaves something behind.
"""
from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

from corral.supervisor.logs import get_logger

__all__ = ["Removal", "remove_tree", "Remover", "DEFAULT_TIMEOUT"]

log = get_logger(component="tree_removal")

DEFAULT_TIMEOUT = 60.0  # seconds one tree may take; a million entries on tmpfs take a few
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OWNER_RWX = 0o700


@dataclass
class Removal:
    """What a removal did: whether the path is gone, entries and bytes (of regular files) removed, the first error."""

    path: str
    removed: bool = False
    entries: int = 0
    bytes: int = 0
    failures: int = 0
    error: str | None = None
    seconds: float = 0.0

    def as_log(self) -> dict:
        """The fields a log line carries."""
        return {"path": self.path, "removed": self.removed, "entries": self.entries, "bytes": self.bytes,
                "failures": self.failures, "error": self.error, "seconds": round(self.seconds, 3)}


@dataclass
class _Frame:
    """One directory on the way down: its name in its parent, the parent's identity, the subdirs still to do."""

    name: str
    parent_id: tuple[int, int]
    pending: list[str] | None = None  # None until scanned


class _TimeUp(Exception):
    """The removal's deadline passed."""


def _identity(fd: int) -> tuple[int, int]:
    """(device, inode) of an open file."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class _Walk:
    """One removal in progress: its deadline and its tally."""

    def __init__(self, result: Removal, deadline: float, cancel: threading.Event | None = None):
        self.result = result
        self.deadline = deadline
        self.cancel = cancel
        self.fd: int | None = None  # the one directory open: the current one

    def failed(self, exc: BaseException) -> None:
        """Count one entry that could not be removed; keep the first reason."""
        self.result.failures += 1
        if self.result.error is None:
            self.result.error = f"{type(exc).__name__}: {exc}"

    def check_time(self) -> None:
        """Stop once the deadline has passed (or the removal was called off)."""
        if time.monotonic() > self.deadline or (self.cancel is not None and self.cancel.is_set()):
            raise _TimeUp

    def open_dir(self, parent_fd: int, name: str) -> int | None:
        """Open a subdirectory (never through a symlink), giving its owner rwx first; None when it is no directory."""
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
        if st.st_mode & _OWNER_RWX != _OWNER_RWX and st.st_uid == os.geteuid():
            try:
                os.chmod(name, _OWNER_RWX, dir_fd=parent_fd)  # no symlink: lstat said dir, and its writer is dead
            except OSError:
                pass  # root reads it anyway; otherwise the open below says why
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)

    def unlink(self, dir_fd: int, name: str, *, is_dir: bool = False) -> None:
        """Remove one entry of an open directory, counting it (a missing one is fine)."""
        try:
            os.unlink(name, dir_fd=dir_fd) if not is_dir else os.rmdir(name, dir_fd=dir_fd)
            self.result.entries += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.failed(exc)

    def scan(self, fd: int) -> list[str]:
        """Remove every non-directory in an open directory; return its subdirectories' names."""
        subdirs = []
        with os.scandir(fd) as entries:
            for entry in entries:
                self.check_time()
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.name)
                        continue
                    if entry.is_file(follow_symlinks=False):
                        self.result.bytes += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    pass  # gone, or cannot be stat'ed: unlink says which
                self.unlink(fd, entry.name)
        return subdirs

    def remove_dir(self, top_parent: int, name: str) -> None:
        """Empty and remove one directory of ``top_parent``, depth-first, one descriptor open at a time."""
        self.fd = self.open_dir(top_parent, name)
        if self.fd is None:
            self.unlink(top_parent, name)
            return
        frames = [_Frame(name, _identity(top_parent))]
        try:
            while frames:
                self.check_time()
                frame = frames[-1]
                if frame.pending is None:
                    frame.pending = self.scan(self.fd)
                elif frame.pending:
                    self._down(frame.pending.pop(), frames)
                else:
                    frames.pop()
                    self._up(frame, top_parent if not frames else None)
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    def _down(self, child: str, frames: list[_Frame]) -> None:
        """Make a subdirectory the current one (a non-directory is just removed)."""
        try:
            child_fd = self.open_dir(self.fd, child)
        except OSError as exc:
            self.failed(exc)
            return
        if child_fd is None:
            self.unlink(self.fd, child)
            return
        frames.append(_Frame(child, _identity(self.fd)))
        os.close(self.fd)
        self.fd = child_fd

    def _up(self, frame: _Frame, top_parent: int | None) -> None:
        """Leave an emptied directory for its parent (checked to be the one we came from) and remove it."""
        fd, self.fd = self.fd, None
        if top_parent is not None:
            os.close(fd)
            self.unlink(top_parent, frame.name, is_dir=True)
            return
        try:
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        if _identity(parent) != frame.parent_id:
            os.close(parent)
            raise OSError(f"the tree moved under the removal at {frame.name!r}")
        self.fd = parent
        self.unlink(parent, frame.name, is_dir=True)


def remove_tree(path: str, *, timeout: float = DEFAULT_TIMEOUT, cancel: threading.Event | None = None) -> Removal:
    """Remove ``path`` and everything under it within ``timeout`` seconds (or until ``cancel`` is set);
    never raises, says what it did."""
    start = time.monotonic()
    result = Removal(path)
    walk = _Walk(result, start + timeout, cancel)
    parent, name = os.path.split(os.path.abspath(path))
    try:
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        walk.failed(exc)
    else:
        try:
            walk.remove_dir(parent_fd, name)
        except _TimeUp:
            result.error = f"gave up after {time.monotonic() - start:.1f} s" + (f" ({result.error})" if result.error else "")
        except (OSError, MemoryError) as exc:
            walk.failed(exc)
        finally:
            os.close(parent_fd)
    result.removed = not os.path.lexists(path)
    result.seconds = time.monotonic() - start
    return result


class Remover:
    """Removes trees one after another on a thread of its own; logs each that leaves something behind."""

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT, on_done: Callable[[Removal], None] | None = None):
        self.timeout = timeout
        self.on_done = on_done
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-remove")
        self._pending: set = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()  # set by close: the removal under way stops at its next entry

    def submit(self, path: str) -> None:
        """Queue a tree for removal; returns at once."""
        try:
            future = self._pool.submit(self._remove, path)
        except RuntimeError:  # closed: the whole tree goes with the server's own (or the next start's sweep)
            return
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future) -> None:
        """Drop a finished removal from the pending set."""
        with self._lock:
            self._pending.discard(future)

    def _remove(self, path: str) -> Removal:
        """Remove one tree and report it."""
        result = remove_tree(path, timeout=self.timeout, cancel=self._stop)
        if not result.removed or result.failures:
            log.warning("agent_tmp_left", **result.as_log())
        if self.on_done is not None:
            self.on_done(result)
        return result

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the removals queued so far; whether they all finished."""
        with self._lock:
            pending = list(self._pending)
        _done, not_done = wait(pending, timeout=timeout) if pending else (set(), set())
        return not not_done

    def close(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for queued removals, then call off the rest; whether all finished."""
        finished = self.drain(timeout)
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        return finished
