"""The bounded disk: each agent's TMPDIR a size-limited tmpfs in the zygote's own mount namespace (stdlib + ctypes).

The zygote unshares a mount namespace once (propagation private, so nothing it mounts reaches the
host), mounts a tmpfs with ``size=`` and ``nr_inodes=`` on a session's temp dir just before forking
its agent, and detaches it (``MNT_DETACH``) once the agent has exited: the agent gets ENOSPC past
the bound and lives, and everything it wrote goes with the unmount, whatever the tree's shape. The
supervisor, in the host's namespace, only ever sees the empty directory under it. If the zygote
dies, its namespace (and every tmpfs in it) goes with its last process. Measured: a mount ~16 µs, a
lazy unmount ~60 µs (docs/security.md).
"""
from __future__ import annotations

import ctypes
import os
import tempfile


__all__ = ["enter_mount_namespace", "mount_tmpfs", "unmount", "inodes_for", "probe", "CLONE_NEWNS"]

CLONE_NEWNS = 0x00020000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_MS_REC, _MS_PRIVATE = 0x4000, 1 << 18
_MNT_DETACH = 2
_BYTES_PER_INODE = 4096  # an agent may fill its bound with files of a page each, not with millions of empty ones
_MIN_INODES = 1024
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    """Raise OSError with the call's errno when it returned -1."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def inodes_for(size: int) -> int:
    """The inode bound that goes with a size bound."""
    return max(_MIN_INODES, size // _BYTES_PER_INODE)


def enter_mount_namespace() -> None:
    """Move into a mount namespace of our own whose mounts never propagate to (or from) the host's."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(None, b"/", None, ctypes.c_ulong(_MS_REC | _MS_PRIVATE), None), "mount(/, MS_PRIVATE)")


def mount_tmpfs(path: str, *, size: int, uid: int, gid: int) -> None:
    """Mount a tmpfs of ``size`` bytes (and ``inodes_for(size)`` inodes) on ``path``: 0700, owned by uid:gid, no exec."""
    options = f"size={size},nr_inodes={inodes_for(size)},mode=0700,uid={uid},gid={gid}".encode()
    flags = ctypes.c_ulong(_MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _check(_libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", flags, options), f"mount tmpfs on {path}")


def unmount(path: str) -> None:
    """Detach the mount on ``path`` (lazily: freed once nothing holds a file in it)."""
    _check(_libc.umount2(os.fsencode(path), ctypes.c_int(_MNT_DETACH)), f"umount {path}")


def probe(*, in_user_namespace: bool) -> str | None:
    """Why the zygote could not bound agents' disk here (tried in a forked child); None when it can."""
    from corral.agent_proc import userns

    where = tempfile.mkdtemp(prefix="corral-disk-probe-")
    try:
        steps = [userns.enter_user_namespace] if in_user_namespace else []
        steps += [enter_mount_namespace,
                  lambda: mount_tmpfs(where, size=1 << 20, uid=os.geteuid(), gid=os.getegid()),
                  lambda: unmount(where)]
        return userns.try_in_child(*steps)
    finally:
        os.rmdir(where)
