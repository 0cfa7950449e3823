"""Per-session memory limits: pick the best mechanism the host allows (cgroup v2, cgroup v1, rlimit).

The supervisor owns one limiter per run and hands it to the spawner (supervisor/spawner.py). For
every spawn the spawner calls ``prepare(key)`` and sends the resulting plain-dict spec to the
zygote; the forked child applies it with ``agent_proc.limits.apply_limits`` before any agent code
runs. After the child exits the spawner asks ``oom_killed(spec)`` (before ``release(spec)``, which
removes the evidence). ``release``, ``close`` and the start-up sweep wait for the kernel between
tries, so they run on a worker thread.

Stdlib only (psutil is not needed); no web imports.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import time
from decimal import Decimal, InvalidOperation

from corral.supervisor import procfs

__all__ = [
    "MemoryLimiter", "Cgroup2Limiter", "Cgroup1Limiter", "RlimitLimiter", "NoLimiter",
    "parse_size", "choose_limiter", "MECHANISMS",
]

MECHANISMS = ("cgroup2", "cgroup1", "rlimit", "none")

_KEY_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_OWNER_RE = re.compile(r"^corral-[A-Za-z0-9._-]+@(?P<pid>\d+)\.(?P<start>\d+)$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_NO_LIMIT_WORDS = {"none", "off", "unlimited", "max"}

# rmdir of a just-emptied cgroup can report EBUSY while exiting tasks are still being torn down.
_RMDIR_TRIES = 50
_RMDIR_PAUSE = 0.01
_KILL_ROUNDS = 50


# ----------------------------------------------------------------------------------------------
# sizes

def parse_size(text: str | int) -> int:
    """Parse "512M", "1G", "512MiB", "1.5G", "1048576" or an int into bytes (units are binary)."""
    if isinstance(text, bool):
        raise ValueError(f"invalid memory size {text!r}: expected bytes or a size like '512M'")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid memory size {text!r}: must not be negative")
        return text
    if not isinstance(text, str):
        raise ValueError(f"invalid memory size {text!r}: expected str or int")
    if text.strip().lower() in _NO_LIMIT_WORDS:
        return 0
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(
            f"invalid memory size {text!r}: expected a number with an optional unit "
            "K/M/G/T (also KiB/MiB/KB/MB..., all powers of 1024), e.g. '512M' or '1.5G'")
    number, unit, _suffix = m.groups()
    try:
        value = Decimal(number) * _UNITS[unit.lower()]
    except InvalidOperation as exc:  # pragma: no cover - the regex already guards this
        raise ValueError(f"invalid memory size {text!r}") from exc
    return int(value)


# ----------------------------------------------------------------------------------------------
# small file helpers (cgroupfs files are tiny; one read/write each)

def _read(path: str) -> str:
    """Return the stripped contents of a small file."""
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value: str | int) -> None:
    """Write one value to a control file (one write(), as cgroupfs expects)."""
    with open(path, "w") as f:
        f.write(str(value))


def _write_optional(path: str, value: str | int) -> None:
    """Write a control file the kernel may not have (older kernel, no swap accounting): best effort."""
    try:
        _write(path, value)
    except OSError:
        pass  # cgroupfs refuses to create unknown files; the limit itself is already set


def _read_int(path: str) -> int | None:
    """Read an integer file; None when missing/unreadable or "max"."""
    try:
        return int(_read(path))
    except (OSError, ValueError):
        return None


def _read_keyed(path: str) -> dict[str, int]:
    """Parse a flat keyed file like memory.events ("key value" per line); {} on error."""
    out: dict[str, int] = {}
    try:
        text = _read(path)
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _pids(path: str) -> list[int]:
    """Pids listed in a cgroup.procs/tasks file; [] when it is gone."""
    try:
        return [int(x) for x in _read(path).split()]
    except (OSError, ValueError):
        return []


def _rmdir_retry(path: str) -> bool:
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
            time.sleep(_RMDIR_PAUSE)
    return False


def _own_cgroup(proc_self_cgroup: str, controller: str | None) -> str:
    """Our cgroup path from /proc/self/cgroup: the "0::" line (v2) or the line naming `controller` (v1)."""
    for line in _read(proc_self_cgroup).splitlines():
        hier, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        if controller is None and hier == "0" and ctrls == "":
            return path
        if controller is not None and controller in ctrls.split(","):
            return path
    raise LookupError(f"no {'cgroup2' if controller is None else controller} line in {proc_self_cgroup}")


def _join(root: str, cg_path: str) -> str:
    """Join a cgroupfs mount point and a /proc/self/cgroup path."""
    return os.path.join(root, cg_path.lstrip("/")).rstrip("/") or "/"


# ----------------------------------------------------------------------------------------------
# limiters

class MemoryLimiter:
    """Base limiter: no cgroup; subclasses fill in the mechanism-specific parts."""

    mechanism = "none"

    def __init__(self, limit_bytes: int | None, path: str | None = None):
        self.limit_bytes = limit_bytes
        self.path = path  # per-run parent cgroup dir (cgroups only)
        self.fallback_reasons: list[str] = []
        self.swept: list[str] = []  # per-run dirs of dead corral servers removed at start

    def describe(self) -> dict:
        """What /health and the logs show."""
        return {"mechanism": self.mechanism, "limit_bytes": self.limit_bytes, "path": self.path}

    def prepare(self, key: str) -> dict:
        """Per-spawn spec for apply_limits in the child."""
        return {"kind": "none"}

    def oom_killed(self, spec) -> bool:
        """No kernel OOM verdict without a cgroup; the agent reports MemoryError itself."""
        return False

    def usage(self, spec) -> dict | None:
        """No per-session accounting without a cgroup."""
        return None

    def kill_all(self, spec) -> None:
        """Nothing to kill without a cgroup (the core kills the process group)."""

    def release(self, spec) -> None:
        """Nothing to clean up without a cgroup."""

    def close(self) -> None:
        """Nothing to clean up without a cgroup."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class NoLimiter(MemoryLimiter):
    """No memory limit at all."""

    mechanism = "none"

    def __init__(self, limit_bytes: int | None = None):
        super().__init__(None)


class RlimitLimiter(MemoryLimiter):
    """setrlimit in the child: RLIMIT_DATA (+ a generous RLIMIT_AS backstop); see agent_proc.limits."""

    mechanism = "rlimit"

    def prepare(self, key: str) -> dict:
        """The child does all the work; just pass the size."""
        return {"kind": "rlimit", "limit_bytes": int(self.limit_bytes)}


class _CgroupLimiter(MemoryLimiter):
    """Shared logic for one leaf cgroup per spawn under a per-run parent dir."""

    procs_files = ("cgroup.procs",)
    usage_files: tuple[str, str]  # (current, peak) file names, set by each cgroup version

    def usage(self, spec) -> dict | None:
        """Current and peak usage of the spawn's cgroup (peak None where the kernel lacks it)."""
        path = _spec_path(spec)
        if path is None:
            return None
        current_file, peak_file = self.usage_files
        current = _read_int(os.path.join(path, current_file))
        if current is None:
            return None
        return {"current": current, "peak": _read_int(os.path.join(path, peak_file))}

    def prepare(self, key: str) -> dict:
        """Create <parent>/<key>, set its limits, return the spec; cleans up and raises OSError on failure."""
        if not _KEY_RE.match(key) or key in (".", ".."):
            raise ValueError(f"cgroup key {key!r} is not filesystem-safe")
        path = os.path.join(self.path, key)
        try:
            os.mkdir(path)
        except FileExistsError:
            self.kill_all({"path": path})  # stale leftover with the same key: reuse, but empty it
        try:
            self._set_limits(path)
        except OSError:
            self.release({"path": path})
            raise
        return {"kind": self.mechanism, "path": path, "limit_bytes": int(self.limit_bytes)}

    def _set_limits(self, path: str) -> None:
        raise NotImplementedError

    def _procs(self, path: str) -> list[int]:
        """Pids currently in the cgroup."""
        for name in self.procs_files:
            pids = _pids(os.path.join(path, name))
            if pids:
                return pids
        return []

    def kill_all(self, spec) -> None:
        """SIGKILL every process in the cgroup, re-reading until it is empty (catches racing forks)."""
        path = _spec_path(spec)
        if path is None:
            return
        for _ in range(_KILL_ROUNDS):
            pids = self._procs(path)
            if not pids:
                return
            for pid in pids:
                # A pid read from cgroup.procs is in the cgroup right now; a reuse race between read and
                # kill needs the pid to exit *and* be recycled within microseconds: acceptable.
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(_RMDIR_PAUSE)  # let the kernel finish the exits before re-reading

    def release(self, spec) -> None:
        """Kill what is left and remove the per-spawn dir; never raises."""
        path = _spec_path(spec)
        if path is None:
            return
        try:
            self.kill_all(spec)
            _rmdir_retry(path)
        except Exception:  # noqa: BLE001 - release must never raise into the supervisor
            pass

    def close(self) -> None:
        """Release any per-spawn dirs still present, then remove the per-run parent."""
        try:
            for name in os.listdir(self.path):
                child = os.path.join(self.path, name)
                if os.path.isdir(child):
                    self.release({"path": child})
            _rmdir_retry(self.path)
        except OSError:
            pass


def _spec_path(spec) -> str | None:
    """The cgroup dir named by a spec, or None for non-cgroup specs."""
    if isinstance(spec, dict) and isinstance(spec.get("path"), str):
        return spec["path"]
    return None


class Cgroup2Limiter(_CgroupLimiter):
    """cgroup v2: memory.max + memory.swap.max=0 + memory.oom.group=1, verdict from memory.events."""

    mechanism = "cgroup2"
    usage_files = ("memory.current", "memory.peak")  # memory.peak: >= 5.19, else peak is None

    def _set_limits(self, path: str) -> None:
        """Hard limit, no swap escape, and kill the whole session tree on OOM."""
        _write(os.path.join(path, "memory.max"), int(self.limit_bytes))
        _write_optional(os.path.join(path, "memory.swap.max"), 0)  # absent without swap accounting
        _write_optional(os.path.join(path, "memory.oom.group"), 1)  # >= 4.19

    def oom_killed(self, spec) -> bool:
        """True if memory.events counts an oom_kill (or an oom_group_kill, >= 5.17)."""
        path = _spec_path(spec)
        if path is None:
            return False
        ev = _read_keyed(os.path.join(path, "memory.events"))
        return ev.get("oom_kill", 0) > 0 or ev.get("oom_group_kill", 0) > 0

    def kill_all(self, spec) -> None:
        """cgroup.kill (>= 5.14) kills atomically, forks included; else fall back to iterating procs."""
        path = _spec_path(spec)
        if path is None:
            return
        kill_file = os.path.join(path, "cgroup.kill")
        if os.path.exists(kill_file):
            try:
                _write(kill_file, 1)
            except OSError:
                pass
        super().kill_all(spec)  # also waits for cgroup.procs to drain (or kills, pre-5.14)


class Cgroup1Limiter(_CgroupLimiter):
    """cgroup v1 memory controller: limit_in_bytes (+ memsw), verdict from memory.oom_control."""

    mechanism = "cgroup1"
    procs_files = ("cgroup.procs", "tasks")
    usage_files = ("memory.usage_in_bytes", "memory.max_usage_in_bytes")

    def _set_limits(self, path: str) -> None:
        """Hard limit; memsw to the same value so a session cannot escape into swap."""
        _write(os.path.join(path, "memory.limit_in_bytes"), int(self.limit_bytes))
        # Only with swap accounting; must be >= limit_in_bytes at all times, hence set after it.
        _write_optional(os.path.join(path, "memory.memsw.limit_in_bytes"), int(self.limit_bytes))

    def oom_killed(self, spec) -> bool:
        """True if memory.oom_control's oom_kill counter (>= 4.13) is positive."""
        path = _spec_path(spec)
        if path is None:
            return False
        return _read_keyed(os.path.join(path, "memory.oom_control")).get("oom_kill", 0) > 0


# ----------------------------------------------------------------------------------------------
# probing

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


def _probe_cgroup2(limit: int, run_id: str, v2_root: str, proc_self_cgroup: str) -> Cgroup2Limiter:
    """Set up <own>/corral-<run_id> with +memory for children; raises with a reason when impossible."""
    controllers = os.path.join(v2_root, "cgroup.controllers")
    if not os.path.exists(controllers):
        raise RuntimeError(f"no pure cgroup v2 mount at {v2_root} ({controllers} missing)")
    if "memory" not in _read(controllers).split():
        raise RuntimeError(f"memory controller not available in {controllers}")
    own_path = _own_cgroup(proc_self_cgroup, None)
    if own_path.strip("/") == "":
        # The (namespace) root: its cgroup.procs is every process on the host/container, and the leaf
        # move would drag them all along. Only a delegated subtree is ours to rearrange.
        raise RuntimeError("we run in the root cgroup; start corral in a delegated cgroup (systemd Delegate=memory)")
    own = _join(v2_root, own_path)
    if "memory" not in _read(os.path.join(own, "cgroup.controllers")).split():
        raise RuntimeError(f"memory controller not delegated to our cgroup {own}")
    _make_leaf_for_ourselves(own)
    _enable_memory(own)
    parent = os.path.join(own, run_dir_name(run_id))
    os.makedirs(parent, exist_ok=True)
    try:
        _enable_memory(parent)
    except OSError:
        _rmdir_retry(parent)
        raise
    limiter = Cgroup2Limiter(limit, parent)
    limiter.swept = sweep_stale_runs(own, lambda path: Cgroup2Limiter(limit, path))
    return limiter


def _make_leaf_for_ourselves(own: str) -> None:
    """No-internal-processes rule: move everything in our cgroup to <own>/supervisor before enabling controllers."""
    pids = _pids(os.path.join(own, "cgroup.procs"))
    if not pids:
        return
    leaf = os.path.join(own, "supervisor")
    os.makedirs(leaf, exist_ok=True)
    me = os.getpid()
    # Ourselves first; then anything else in our cgroup (e.g. an already-started zygote), because a
    # single process left behind makes the subtree_control write fail with EBUSY.
    for pid in [me] + [p for p in pids if p != me]:
        try:
            _write(os.path.join(leaf, "cgroup.procs"), pid)
        except ProcessLookupError:
            pass  # exited meanwhile


def _enable_memory(cg: str) -> None:
    """Enable the memory controller for the children of `cg` (idempotent)."""
    ctl = os.path.join(cg, "cgroup.subtree_control")
    try:
        enabled = _read(ctl).split()
    except FileNotFoundError:
        enabled = []
    if "memory" not in enabled:
        _write(ctl, "+memory")


def _probe_cgroup1(limit: int, run_id: str, v1_root: str, proc_self_cgroup: str) -> Cgroup1Limiter:
    """Create <v1_root>/<own memory path>/corral-<run_id>; raises with a reason when impossible."""
    if not os.path.exists(os.path.join(v1_root, "memory.usage_in_bytes")):
        raise RuntimeError(f"no cgroup v1 memory controller mounted at {v1_root}")
    own = _join(v1_root, _own_cgroup(proc_self_cgroup, "memory"))
    if not os.path.isdir(own):
        raise RuntimeError(f"our memory cgroup {own} is not visible under {v1_root}")
    parent = os.path.join(own, run_dir_name(run_id))
    os.makedirs(parent, exist_ok=True)
    limiter = Cgroup1Limiter(limit, parent)
    limiter.swept = sweep_stale_runs(own, lambda path: Cgroup1Limiter(limit, path))
    return limiter


def choose_limiter(limit_bytes: int | None, *, run_id: str, prefer: str | None = None,
                   v2_root: str = "/sys/fs/cgroup", v1_root: str = "/sys/fs/cgroup/memory",
                   proc_self_cgroup: str = "/proc/self/cgroup") -> MemoryLimiter:
    """Return the best limiter the host allows; reasons for skipped mechanisms go to .fallback_reasons."""
    if prefer is not None and prefer not in MECHANISMS:
        raise ValueError(f"unknown memory limit mechanism {prefer!r}; expected one of {', '.join(MECHANISMS)}")
    if not limit_bytes or prefer == "none":
        return NoLimiter()
    if not _KEY_RE.match(run_id):
        raise ValueError(f"run_id {run_id!r} is not filesystem-safe")
    probes = {
        "cgroup2": lambda: _probe_cgroup2(limit_bytes, run_id, v2_root, proc_self_cgroup),
        "cgroup1": lambda: _probe_cgroup1(limit_bytes, run_id, v1_root, proc_self_cgroup),
        "rlimit": lambda: RlimitLimiter(limit_bytes),
    }
    order = [prefer] if prefer else list(probes)
    reasons: list[str] = []
    for name in order:
        try:
            limiter = probes[name]()
        except Exception as exc:  # noqa: BLE001 - every probe failure is a fallback reason, not a crash
            reasons.append(f"{name}: {exc}")
            continue
        limiter.fallback_reasons = reasons
        return limiter
    raise ValueError(f"memory limit mechanism {prefer!r} is unavailable: {'; '.join(reasons)}")
