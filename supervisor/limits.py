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
    "parse_size", "parse_cores", "choose_limiter", "MECHANISMS", "ControlLimit",
]

MECHANISMS = ("cgroup2", "cgroup1", "rlimit", "none")

_KEY_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_OWNER_RE = re.compile(r"^corral-[A-Za-z0-9._-]+@(?P<pid>\d+)\.(?P<start>\d+)$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_NO_LIMIT_WORDS = {"none", "off", "unlimited", "max"}
CPU_PERIOD_US = 100_000  # the CFS period a --cpu-limit quota is a share of (the kernel's default)
_MIN_QUOTA_US = 1_000  # the kernel refuses a smaller quota

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


def parse_cores(text: str | float) -> float:
    """Parse a CPU limit in cores ("0.5", "2"; 0/none = no cap) into a float."""
    if isinstance(text, str) and text.strip().lower() in _NO_LIMIT_WORDS:
        return 0.0
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"invalid cpu limit {text!r}: expected cores, e.g. 0.5 or 2") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"invalid cpu limit {text!r}: must be a finite number of cores, 0 or more")
    if value and value * CPU_PERIOD_US < _MIN_QUOTA_US:
        raise ValueError(f"invalid cpu limit {text!r}: at least {_MIN_QUOTA_US / CPU_PERIOD_US} cores")
    return value


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
        self.controls: dict[str, ControlLimit] = {}  # "cpu", "pids": the limits beyond memory

    def describe(self) -> dict:
        """What /health and the logs show: the memory mechanism, and each other limit's."""
        described = {"mechanism": self.mechanism, "limit_bytes": self.limit_bytes, "path": self.path}
        described.update((name, control.describe()) for name, control in self.controls.items())
        return described

    def prepare(self, key: str) -> dict:
        """Per-spawn spec for apply_limits in the child: memory, then each control (undone on failure)."""
        spec = self._prepare_memory(key)
        try:
            for name, control in self.controls.items():
                part = control.prepare(key, spec)
                if part is not None:
                    spec.setdefault("controls", {})[name] = part
                    if part.get("join"):
                        spec.setdefault("join", []).append(part["path"])
        except OSError:
            self.release(spec)
            raise
        return spec

    def _prepare_memory(self, key: str) -> dict:
        """The memory part of the spec."""
        return {"kind": "none"}

    def control_usage(self, spec) -> dict:
        """Each control's current use in this spawn ({} where there is no cgroup to ask)."""
        parts = spec.get("controls", {}) if isinstance(spec, dict) else {}
        usage = {}
        for name, part in parts.items():
            used = self.controls[name].usage(part) if name in self.controls else None
            if used is not None:
                usage[name] = used
        return usage

    def release(self, spec) -> None:
        """After the spawn's process exited: release each control's part, then memory's; never raises."""
        parts = spec.get("controls", {}) if isinstance(spec, dict) else {}
        for name, part in parts.items():
            if name in self.controls:
                self.controls[name].release(part)
        self._release_memory(spec)

    def _release_memory(self, spec) -> None:
        """Nothing to clean up without a cgroup."""

    def close(self) -> None:
        """At shutdown: the controls' per-run dirs, then memory's."""
        for control in self.controls.values():
            control.close()
        self._close_memory()

    def _close_memory(self) -> None:
        """Nothing to clean up without a cgroup."""

    def oom_killed(self, spec) -> bool:
        """No kernel OOM verdict without a cgroup; the agent reports MemoryError itself."""
        return False

    def usage(self, spec) -> dict | None:
        """No per-session accounting without a cgroup."""
        return None

    def kill_all(self, spec) -> None:
        """Nothing to kill without a cgroup (the core kills the process group)."""

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

    def _prepare_memory(self, key: str) -> dict:
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

    def _prepare_memory(self, key: str) -> dict:
        """Create <parent>/<key>, set its limits, return the spec; cleans up and raises OSError on failure."""
        return {"kind": self.mechanism, "path": self.make_leaf(key), "limit_bytes": int(self.limit_bytes)}

    def make_leaf(self, key: str) -> str:
        """Create <parent>/<key> with its limits set; cleans up and raises OSError on failure."""
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
            self._release_memory({"path": path})
            raise
        return path

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

    def _release_memory(self, spec) -> None:
        """Kill what is left and remove the per-spawn dir; never raises."""
        path = _spec_path(spec)
        if path is None:
            return
        try:
            self.kill_all(spec)
            _rmdir_retry(path)
        except Exception:  # noqa: BLE001 - release must never raise into the supervisor
            pass

    def _close_memory(self) -> None:
        """Release any per-spawn dirs still present, then remove the per-run parent."""
        try:
            for name in os.listdir(self.path):
                child = os.path.join(self.path, name)
                if os.path.isdir(child):
                    self._release_memory({"path": child})
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
# limits beyond memory: cpu and pids

class _Cgroup1Group(_CgroupLimiter):
    """One cgroup v1 hierarchy (cpu or pids) of its own: a per-run dir, a leaf per spawn the child joins."""

    mechanism = "cgroup1"
    procs_files = ("cgroup.procs", "tasks")

    def __init__(self, path: str, files: dict):
        super().__init__(None, path)
        self.files = files  # control file -> value, written in this order into each leaf

    def _set_limits(self, path: str) -> None:
        """Write each control file (period before quota: the kernel checks them together)."""
        for name, value in self.files.items():
            _write(os.path.join(path, name), value)


# What each resource's cgroup files are: the value written per session, the file read for current use.
_V2_FILES = {"cpu": lambda cores: {"cpu.max": f"{_quota_us(cores)} {CPU_PERIOD_US}"},
             "pids": lambda count: {"pids.max": int(count)}}
_V1_FILES = {"cpu": lambda cores: {"cpu.cfs_period_us": CPU_PERIOD_US, "cpu.cfs_quota_us": _quota_us(cores)},
             "pids": lambda count: {"pids.max": int(count)}}
_V1_PROBE_FILE = {"cpu": "cpu.cfs_quota_us", "pids": "cgroup.procs"}


def _quota_us(cores: float) -> int:
    """The CFS quota (µs a period) for a share of cores."""
    return max(_MIN_QUOTA_US, round(cores * CPU_PERIOD_US))


class ControlLimit:
    """One per-session limit beyond memory ("cpu" in cores, "pids") and the mechanism enforcing it.

    ``cgroup2`` writes into the memory limiter's per-spawn cgroup (cpu.max, pids.max); ``cgroup1``
    has its own hierarchy, so each spawn gets a leaf there that the child joins; ``rlimit`` (pids
    only) is RLIMIT_NPROC of the session's own uid, applied by the sandbox; ``unavailable`` says why.
    """

    def __init__(self, resource: str, value, mechanism: str, *, files: dict | None = None,
                 group: _Cgroup1Group | None = None, reason: str | None = None):
        self.resource = resource
        self.value = value or None
        self.mechanism = mechanism  # cgroup2 | cgroup1 | rlimit | unavailable | none
        self.files = files or {}
        self.group = group
        self.reason = reason

    def describe(self) -> dict:
        """The mechanism, the limit, and the per-run cgroup (or why there is none)."""
        described = {"mechanism": self.mechanism, "limit": self.value,
                     "path": self.group.path if self.group else None}
        if self.reason:
            described["reason"] = self.reason
        return described

    def prepare(self, key: str, memory_spec: dict) -> dict | None:
        """This spawn's part of the spec: the cgroup holding the limit (and whether the child must join it)."""
        if self.mechanism == "cgroup2":
            path = memory_spec["path"]
            for name, value in self.files.items():
                _write(os.path.join(path, name), value)
            return {"path": path}
        if self.mechanism == "cgroup1":
            return {"path": self.group.make_leaf(key), "join": True}
        return None

    def usage(self, part: dict) -> dict | None:
        """Current use from the cgroup: pids.current; cpu.stat's usage and throttling (what the kernel has)."""
        path = part.get("path") if isinstance(part, dict) else None
        if path is None:
            return None
        if self.resource == "pids":
            current = _read_int(os.path.join(path, "pids.current"))
            return None if current is None else {"current": current}
        stat = _read_keyed(os.path.join(path, "cpu.stat"))
        if not stat:
            return None
        return {"usage_usec": stat.get("usage_usec"), "throttled": stat.get("nr_throttled", 0)}

    def release(self, part: dict) -> None:
        """Remove this spawn's leaf of its own hierarchy (cgroup1); the memory cgroup goes with memory."""
        if self.mechanism == "cgroup1" and isinstance(part, dict):
            self.group._release_memory(part)

    def close(self) -> None:
        """Remove the per-run dir of its own hierarchy."""
        if self.group is not None:
            self.group.close()


def choose_control(resource: str, value, memory: MemoryLimiter, *, run_id: str, v2_root: str,
                   v1_root: str, proc_self_cgroup: str) -> ControlLimit:
    """The best mechanism for one limit beyond memory; the reasons for skipped ones go to memory.fallback_reasons."""
    if not value:
        return ControlLimit(resource, None, "none")
    reasons = []
    if isinstance(memory, Cgroup2Limiter):
        try:
            return _probe_control_v2(resource, value, memory, v2_root)
        except Exception as exc:  # noqa: BLE001 - a reason, not a crash
            reasons.append(f"cgroup2: {exc}")
    else:
        reasons.append("cgroup2: needs the per-session cgroup the cgroup2 memory limiter makes "
                       f"(memory mechanism here: {memory.mechanism})")
    try:
        return _probe_control_v1(resource, value, run_id, v1_root, proc_self_cgroup)
    except Exception as exc:  # noqa: BLE001
        reasons.append(f"cgroup1: {exc}")
    memory.fallback_reasons += [f"{resource}: {r}" for r in reasons]
    if resource == "pids":
        return ControlLimit("pids", value, "rlimit", reason="RLIMIT_NPROC of the session's own uid, where the "
                            "sandbox gives it one (as root); " + "; ".join(reasons))
    return ControlLimit(resource, value, "unavailable", reason="; ".join(reasons))


def _probe_control_v2(resource: str, value, memory: Cgroup2Limiter, v2_root: str) -> ControlLimit:
    """Enable the controller for the memory limiter's per-spawn cgroups; raises with a reason when impossible."""
    own = os.path.dirname(memory.path)
    if resource not in _read(os.path.join(own, "cgroup.controllers")).split():
        raise RuntimeError(f"{resource} controller not delegated to our cgroup {own}")
    _enable_memory(own, resource)
    _enable_memory(memory.path, resource)
    return ControlLimit(resource, value, "cgroup2", files=_V2_FILES[resource](value))


def _probe_control_v1(resource: str, value, run_id: str, v1_root: str, proc_self_cgroup: str) -> ControlLimit:
    """Make <v1_root>/<own path>/corral-<run> in the controller's own hierarchy; raises with a reason when impossible."""
    if not os.path.exists(os.path.join(v1_root, _V1_PROBE_FILE[resource])):
        raise RuntimeError(f"no cgroup v1 {resource} controller mounted at {v1_root}")
    own = _join(v1_root, _own_cgroup(proc_self_cgroup, resource))
    if not os.path.isdir(own):
        raise RuntimeError(f"our {resource} cgroup {own} is not visible under {v1_root}")
    files = _V1_FILES[resource](value)
    parent = os.path.join(own, run_dir_name(run_id))
    os.makedirs(parent, exist_ok=True)
    group = _Cgroup1Group(parent, files)
    group.swept = sweep_stale_runs(own, lambda path: _Cgroup1Group(path, {}))
    return ControlLimit(resource, value, "cgroup1", files=files, group=group)


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


def _enable_memory(cg: str, controller: str = "memory") -> None:
    """Enable a controller (memory by default) for the children of `cg` (idempotent)."""
    ctl = os.path.join(cg, "cgroup.subtree_control")
    try:
        enabled = _read(ctl).split()
    except FileNotFoundError:
        enabled = []
    if controller not in enabled:
        _write(ctl, f"+{controller}")


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
                   proc_self_cgroup: str = "/proc/self/cgroup", cpu_limit: float | None = None,
                   max_pids: int | None = None, v1_roots: dict | None = None) -> MemoryLimiter:
    """Return the best limiter the host allows, with its cpu and pids controls when asked for (not None).

    Reasons for skipped mechanisms go to .fallback_reasons; ``v1_roots`` maps "cpu"/"pids" to their
    v1 mounts (default /sys/fs/cgroup/cpu and /sys/fs/cgroup/pids).
    """
    limiter = _choose_memory(limit_bytes, run_id=run_id, prefer=prefer, v2_root=v2_root, v1_root=v1_root,
                             proc_self_cgroup=proc_self_cgroup)
    v1_roots = {"cpu": "/sys/fs/cgroup/cpu", "pids": "/sys/fs/cgroup/pids", **(v1_roots or {})}
    for resource, value in (("cpu", cpu_limit), ("pids", max_pids)):
        if value is not None:
            if resource == "cpu":
                value = parse_cores(value)
            limiter.controls[resource] = choose_control(resource, value, limiter, run_id=run_id, v2_root=v2_root,
                                                        v1_root=v1_roots[resource], proc_self_cgroup=proc_self_cgroup)
    return limiter


def _choose_memory(limit_bytes: int | None, *, run_id: str, prefer: str | None, v2_root: str, v1_root: str,
                   proc_self_cgroup: str) -> MemoryLimiter:
    """The memory limiter: the best mechanism the host allows, or the one preferred."""
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
