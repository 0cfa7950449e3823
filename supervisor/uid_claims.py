"""Which sandbox uids this server holds, host-wide: one ``flock`` per uid in a root-only directory.

Every root server on a host draws its sessions' uids from ``--sandbox-uid-range`` (by default the
same 60000-60999). Without a claim, two servers (cluster nodes on one machine, two instances behind
one proxy) would give one uid to two sessions: each could signal the other's processes, and the uid
sweep after one session's end (``kill(-1)`` as that uid) would kill the other server's agent. A
server claims a uid by locking ``<dir>/<uid>.lock`` for as long as a session of its has it; the
kernel drops the lock when the server dies, however it dies, so a dead server's uids come free
without guessing. The fds are close-on-exec and the zygote is exec'ed with only its own, so no agent
holds a claim. Stdlib only.
"""
from __future__ import annotations

import fcntl
import os
import stat

__all__ = ["CLAIMS_DIR", "UidClaims", "claims_dir_problem"]

CLAIMS_DIR = "/run/corral/uids"


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


class UidClaims:
    """The uids this server has claimed, each held by one locked file."""

    def __init__(self, path: str = CLAIMS_DIR):
        self.path = path
        self.held: dict[int, int] = {}  # uid -> the fd holding its lock

    def claim(self, uid: int) -> bool:
        """Lock ``uid`` for a session of ours; False when another server holds it."""
        fd = os.open(os.path.join(self.path, f"{uid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self.held[uid] = fd
        return True

    def release(self, uid: int) -> None:
        """Let ``uid`` go (its session's processes are gone); never raises."""
        fd = self.held.pop(uid, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Let every claim go."""
        for uid in list(self.held):
            self.release(uid)
