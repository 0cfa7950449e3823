"""Which sandbox uids this server holds, host-wide: a lock on one byte per uid of one file in a root-only directory.

Every root server on a host draws its sessions' uids from ``--sandbox-uid-range`` (by default the
same 60000-60999). Without a claim, two servers (cluster nodes on one machine, two instances behind
one proxy) would give one uid to two sessions: each could signal the other's processes, and the uid
sweep after one session's end (``kill(-1)`` as that uid) would kill the other server's agent. A
server claims a uid by locking byte ``uid`` of ``<dir>/claims`` (an open-file-description lock,
``F_OFD_SETLK``: it conflicts between two opens of the file even in one process, and is dropped
when the file is closed) for as long as a session of its has it; the kernel drops the locks when
the server dies, however it dies, so a dead server's uids come free without guessing. One
descriptor holds every claim (a file per uid cost a descriptor per live session). It is
close-on-exec and the zygote is exec'ed with only its own, so no agent holds a claim. Stdlib only.
"""
from __future__ import annotations

import fcntl
import os
import stat
import struct

__all__ = ["CLAIMS_DIR", "UidClaims", "claims_dir_problem"]

CLAIMS_DIR = "/run/corral/uids"
CLAIMS_FILE = "claims"


def claims_dir_problem(path: str) -> str | None:
    """Make the claims directory (root's, 0700) if needed; why it cannot be trusted, or None."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot make {path}: {exc.strerror or exc}"
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        # another user's (or a symlinked) directory could hold every lock, or point the files elsewhere
        return f"{path} is not a directory that only root can write"
    return None


def _lock_byte(fd: int, offset: int, kind: int) -> None:
    """Take (F_WRLCK) or drop (F_UNLCK) the OFD lock on one byte; BlockingIOError if another holds it."""
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), padded as the C struct is
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", kind, os.SEEK_SET, offset, 1, 0))


class UidClaims:
    """The uids this server has claimed, each a locked byte of one open file."""

    def __init__(self, path: str = CLAIMS_DIR):
        self.path = path
        self.fd: int | None = None  # opened at the first claim
        self.held: set[int] = set()

    def claim(self, uid: int) -> bool:
        """Lock ``uid`` for a session of ours; False when another server holds it."""
        if self.fd is None:
            self.fd = os.open(os.path.join(self.path, CLAIMS_FILE),
                              os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            _lock_byte(self.fd, uid, fcntl.F_WRLCK)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another open of the file holds it
            return False
        if self._held_the_old_way(uid):
            _lock_byte(self.fd, uid, fcntl.F_UNLCK)
            return False
        self.held.add(uid)
        return True

    def _held_the_old_way(self, uid: int) -> bool:
        """Whether a server of the previous release (an flock on ``<uid>.lock``, one file per uid) holds ``uid``.

        Checked and let go at once, so no descriptor stays: servers of both releases on one host (a
        rolling upgrade) do not give a uid to two sessions, as long as the new ones do the checking.
        """
        try:
            fd = os.open(os.path.join(self.path, f"{uid}.lock"), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self, uid: int) -> None:
        """Let ``uid`` go (its session's processes are gone); never raises."""
        if uid in self.held and self.fd is not None:
            self.held.discard(uid)
            try:
                _lock_byte(self.fd, uid, fcntl.F_UNLCK)
            except OSError:
                pass

    def close(self) -> None:
        """Let every claim go (closing the file drops its locks)."""
        self.held.clear()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
