"""The cgroup filesystem, as the limiters use it: tiny control files, per-run dirs and their owners.

Each control file is read or written with one call (cgroupfs expects one write()). ``rmdir_retry``
and the sweep of dead servers' per-run dirs sleep between tries, so they run on a worker thread.
"""
from __future__ import annotations

import errno
import os
import re
import time

from corral.supervisor import procfs

SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")  # a run id or spawn key that is safe as a dir name
_OWNER_RE = re.compile(r"^corral-[A-Za-z0-9._-]+@(?P<pid>\d+)\.(?P<start>\d+)$")

# rmdir of a just-emptied cgroup can report EBUSY while exiting tasks are still being torn down.
_RMDIR_TRIES = 50
RETRY_PAUSE = 0.01


def read(path: str) -> str:
    """Return the stripped contents of a small file."""
    with open(path) as f:
        return f.read().strip()


def write(path: str, value: str | int) -> None:
    """Write one value to a control file (one write(), as cgroupfs expects)."""
    with open(path, "w") as f:
        f.write(str(value))


def write_optional(path: str, value: str | int) -> None:
    """Write a control file the kernel may not have (older kernel, no swap accounting): best effort."""
    try:
        write(path, value)
    except OSError:
        pass  # cgroupfs refuses to create unknown files; the limit itself is already set


def read_optional(path: str) -> str | None:
    """A small kernel file's stripped contents, None where it is missing or unreadable."""
    try:
        return read(path)
    except OSError:
        return None


def read_int(path: str) -> int | None:
    """Read an integer file; None when missing/unreadable or "max"."""
    try:
        return int(read(path))
    except (OSError, ValueError):
        return None


def read_keyed(path: str) -> dict[str, int]:
    """Parse a flat keyed file like memory.events ("key value" per line); {} on error."""
    out: dict[str, int] = {}
    try:
        text = read(path)
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def listed_pids(path: str) -> list[int]:
    """Pids listed in a cgroup.procs/tasks file; [] when it is gone."""
    try:
        return [int(x) for x in read(path).split()]
    except (OSError, ValueError):
        return []


def rmdir_retry(path: str) -> bool:
    """rmdir a cgroup, retrying briefly on EBUSY; True when it is gone.

    It sleeps between tries: the supervisor calls release/close (and the start-up sweep) on a
    worker thread, never on the event loop.
    """
    for _ in range(_RMDIR_TRIES):
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                return False
            time.sleep(RETRY_PAUSE)
    return False


def own_cgroup(proc_self_cgroup: str, controller: str | None) -> str:
    """Our cgroup path from /proc/self/cgroup: the "0::" line (v2) or the line naming `controller` (v1)."""
    for line in read(proc_self_cgroup).splitlines():
        hier, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        if controller is None and hier == "0" and ctrls == "":
            return path
        if controller is not None and controller in ctrls.split(","):
            return path
    raise LookupError(f"no {'cgroup2' if controller is None else controller} line in {proc_self_cgroup}")


def join(root: str, cg_path: str) -> str:
    """Join a cgroupfs mount point and a /proc/self/cgroup path."""
    return os.path.join(root, cg_path.lstrip("/")).rstrip("/") or "/"


def make_leaf_for_ourselves(own: str) -> None:
    """No-internal-processes rule: move everything in our cgroup to <own>/supervisor before enabling controllers."""
    pids = listed_pids(os.path.join(own, "cgroup.procs"))
    if not pids:
        return
    leaf = os.path.join(own, "supervisor")
    os.makedirs(leaf, exist_ok=True)
    me = os.getpid()
    # Ourselves first; then anything else in our cgroup (e.g. an already-started zygote), because a
    # single process left behind makes the subtree_control write fail with EBUSY.
    for pid in [me] + [p for p in pids if p != me]:
        try:
            write(os.path.join(leaf, "cgroup.procs"), pid)
        except ProcessLookupError:
            pass  # exited meanwhile


def enable_controller(cg: str, controller: str = "memory") -> None:
    """Enable a controller (memory by default) for the children of `cg` (idempotent)."""
    ctl = os.path.join(cg, "cgroup.subtree_control")
    try:
        enabled = read(ctl).split()
    except FileNotFoundError:
        enabled = []
    if controller not in enabled:
        write(ctl, f"+{controller}")


def run_dir_name(run_id: str, pid: int | None = None) -> str:
    """The per-run cgroup's name: the run id and its owner (pid and start time, so a reused pid is told apart)."""
    pid = os.getpid() if pid is None else pid
    started = process_start_time(pid)
    if started is None:
        return f"corral-{run_id}"  # no /proc to prove we are alive: a name no sweep touches
    return f"corral-{run_id}@{pid}.{started}"


def process_start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot, /proc/<pid>/stat field 22), or None if it is gone."""
    try:
        return int(procfs.stat_fields(pid)[procfs.STARTTIME])
    except OSError:
        return None


def sweep_stale_runs(own: str, limiter_for) -> list[str]:
    """Remove the per-run cgroups of corral servers that died without cleaning up (SIGKILL, OOM).

    A run's owner is alive when a process with its pid exists and started when the name says;
    runs of live servers, and dirs without an owner in their name, are left alone.
    """
    swept = []
    for name in os.listdir(own):
        owner = _OWNER_RE.match(name)
        if owner is None:
            continue
        if _owner_alive(int(owner["pid"]), int(owner["start"])):
            continue
        path = os.path.join(own, name)
        limiter_for(path).close()  # kills what is left (nothing, normally) and removes the dirs
        if not os.path.exists(path):
            swept.append(path)
    return swept


def _owner_alive(pid: int, started: int) -> bool:
    """Whether the server that named a per-run cgroup is still running."""
    now = process_start_time(pid)
    if now is not None:
        return now == started  # another start time: the pid was reused
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True  # it exists but /proc hides it (hidepid): assume it is the owner
