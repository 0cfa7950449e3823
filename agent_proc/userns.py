"""The zygote's user namespace: how a server that is not root gets its agents a pid namespace (stdlib + ctypes).

A pid namespace needs CAP_SYS_ADMIN, which an unprivileged process has only in a user namespace of
its own. The zygote enters one (the server's uid and gid mapped to themselves, one line each,
setgroups denied), makes the agents' pid namespace in it, and drops every capability the new
namespace gave it before it forks anything, so no agent holds one. It happens once per zygote, never
per agent. ``probe`` tries the same in a throwaway child when the supervisor starts.
"""
from __future__ import annotations

import errno
import os

from corral.agent_proc.libc import LIBC, check
from corral.agent_proc.sandbox import drop_capabilities, set_capabilities, unshare_pid_namespace

__all__ = ["enter_user_namespace", "drop_every_capability", "kernel_has_user_namespaces", "probe", "try_in_child"]

CLONE_NEWUSER = 0x10000000
_SYSCTLS = (  # (file, name, value that turns user namespaces off for us)
    ("/proc/sys/user/max_user_namespaces", "user.max_user_namespaces", "0"),
    ("/proc/sys/kernel/unprivileged_userns_clone", "kernel.unprivileged_userns_clone", "0"),
)
_APPARMOR_RESTRICTION = "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"


def enter_user_namespace() -> None:
    """Move into a new user namespace where only our own uid and gid exist, each mapped to itself.

    Mapping them to themselves (not to 0) keeps every file's owner and every permission check what
    it was, and a process of that uid regains no capabilities by execve. The caller must have one
    thread: the kernel refuses CLONE_NEWUSER otherwise.
    """
    uid, gid = os.geteuid(), os.getegid()
    check(LIBC.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    _write_own("setgroups", "deny")  # an unprivileged gid_map needs it; nobody here can change groups either
    _write_own("uid_map", f"{uid} {uid} 1")
    _write_own("gid_map", f"{gid} {gid} 1")


def _write_own(name: str, text: str) -> None:
    """Write one of our own /proc/self id-map files (a single write(), as the kernel wants)."""
    try:
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise OSError(exc.errno, f"writing /proc/self/{name}: {os.strerror(exc.errno)}") from None


def drop_every_capability(last: int | None = None, *, keep: int = 0) -> None:
    """Empty every capability set: bounding and ambient, then effective, permitted and inheritable but ``keep``
    (a mask: the disk layer's zygote keeps CAP_SYS_ADMIN of its own user namespace to mount each agent's tmpfs)."""
    drop_capabilities(last)
    set_capabilities(keep)


def kernel_has_user_namespaces() -> bool:
    """Whether this kernel is built with user namespaces (CONFIG_USER_NS)."""
    return os.path.exists("/proc/self/ns/user")


def probe() -> str | None:
    """Why the zygote could not make its user and pid namespaces here; None when it can.

    The sysctls that turn them off are read first; then a forked child tries for real (a container's
    seccomp profile or an LSM may refuse what the sysctls allow) and reports the first failure.
    """
    if not kernel_has_user_namespaces():
        return "the kernel has no user namespaces (CONFIG_USER_NS)"
    for path, name, off in _SYSCTLS:
        if _read(path) == off:
            return f"user namespaces are off for unprivileged users (sysctl {name} = {off})"
    failure = try_in_child(enter_user_namespace, unshare_pid_namespace)
    if failure is None:
        return None
    if _read(_APPARMOR_RESTRICTION) == "1":
        failure += " (sysctl kernel.apparmor_restrict_unprivileged_userns = 1)"
    elif failure.endswith(os.strerror(errno.EPERM)):
        failure += " (a container's seccomp profile or a security module refuses it?)"
    return failure


def try_in_child(*steps) -> str | None:
    """Take ``steps`` (namespace changes) in a forked child, which then exits; the first error, or None."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        message = b"the probe failed"
        try:
            os.close(read_end)
            for step in steps:
                step()
            message = b""
        except OSError as exc:
            message = (exc.strerror or str(exc)).encode()
        finally:
            os.write(write_end, message)
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    return message or None


def _read(path: str) -> str | None:
    """A sysctl's value, None where the file does not exist."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None
