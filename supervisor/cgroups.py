"""The cgroup mechanisms: per-spawn memory cgroups (v2 and v1), the cpu and pids controls, and their probes.

The memory limiters make one leaf cgroup per spawn under a per-run dir; a control (cpu, pids) writes its
files into that leaf (cgroup v2) or into a leaf of its own v1 hierarchy that the child joins. The probes
raise with a reason when the host does not allow a mechanism; supervisor/limit_plan.py chooses among them.
"""
from __future__ import annotations

import os
import signal
import time

from corral.agent_proc.limits import CgroupPart, LimitSpec
from corral.supervisor import cgroupfs as fs
from corral.supervisor.cgroupfs import run_dir_name, sweep_stale_runs
from corral.supervisor.limiter import MemoryLimiter

CPU_PERIOD_US = 100_000  # the CFS period a --cpu-limit quota is a share of (the kernel's default)
MIN_QUOTA_US = 1_000  # the kernel refuses a smaller quota
_KILL_ROUNDS = 50


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
        current = fs.read_int(os.path.join(path, current_file))
        if current is None:
            return None
        return {"current": current, "peak": fs.read_int(os.path.join(path, peak_file))}

    def _prepare_memory(self, key: str) -> LimitSpec:
        """Create <parent>/<key>, set its limits, return the spec; cleans up and raises OSError on failure."""
        return LimitSpec(self.mechanism, path=self.make_leaf(key), limit_bytes=int(self.limit_bytes))

    def make_leaf(self, key: str) -> str:
        """Create <parent>/<key> with its limits set; cleans up and raises OSError on failure."""
        if not fs.SAFE_NAME.match(key) or key in (".", ".."):
            raise ValueError(f"cgroup key {key!r} is not filesystem-safe")
        path = os.path.join(self.path, key)
        try:
            os.mkdir(path)
        except FileExistsError:
            self.kill_all(LimitSpec(self.mechanism, path=path))  # a stale leftover of the same key: empty it
        try:
            self._set_limits(path)
        except OSError:
            self.release_memory(LimitSpec(self.mechanism, path=path))
            raise
        return path

    def _set_limits(self, path: str) -> None:
        raise NotImplementedError

    def _procs(self, path: str) -> list[int]:
        """Pids currently in the cgroup."""
        for name in self.procs_files:
            pids = fs.listed_pids(os.path.join(path, name))
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
            time.sleep(fs.RETRY_PAUSE)  # let the kernel finish the exits before re-reading

    def release_memory(self, spec) -> None:
        """Kill what is left and remove the per-spawn dir; never raises."""
        path = _spec_path(spec)
        if path is None:
            return
        try:
            self.kill_all(spec)
            fs.rmdir_retry(path)
        except Exception:  # noqa: BLE001 - release must never raise into the supervisor
            pass

    def _close_memory(self) -> None:
        """Release any per-spawn dirs still present, then remove the per-run parent."""
        try:
            for name in os.listdir(self.path):
                child = os.path.join(self.path, name)
                if os.path.isdir(child):
                    self.release_memory(LimitSpec(self.mechanism, path=child))
            fs.rmdir_retry(self.path)
        except OSError:
            pass


def _spec_path(spec) -> str | None:
    """The cgroup dir named by a spec (a LimitSpec or a control's CgroupPart), or None for non-cgroup specs."""
    path = getattr(spec, "path", None)
    return path if isinstance(path, str) else None


class Cgroup2Limiter(_CgroupLimiter):
    """cgroup v2: memory.max + memory.swap.max=0 + memory.oom.group=1, verdict from memory.events."""

    mechanism = "cgroup2"
    usage_files = ("memory.current", "memory.peak")  # memory.peak: >= 5.19, else peak is None

    def _set_limits(self, path: str) -> None:
        """Hard limit, no swap escape, and kill the whole session tree on OOM."""
        fs.write(os.path.join(path, "memory.max"), int(self.limit_bytes))
        fs.write_optional(os.path.join(path, "memory.swap.max"), 0)  # absent without swap accounting
        fs.write_optional(os.path.join(path, "memory.oom.group"), 1)  # >= 4.19

    def oom_killed(self, spec) -> bool:
        """True if memory.events counts an oom_kill (or an oom_group_kill, >= 5.17)."""
        path = _spec_path(spec)
        if path is None:
            return False
        ev = fs.read_keyed(os.path.join(path, "memory.events"))
        return ev.get("oom_kill", 0) > 0 or ev.get("oom_group_kill", 0) > 0

    def kill_all(self, spec) -> None:
        """cgroup.kill (>= 5.14) kills atomically, forks included; else fall back to iterating procs."""
        path = _spec_path(spec)
        if path is None:
            return
        kill_file = os.path.join(path, "cgroup.kill")
        if os.path.exists(kill_file):
            try:
                fs.write(kill_file, 1)
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
        fs.write(os.path.join(path, "memory.limit_in_bytes"), int(self.limit_bytes))
        # Only with swap accounting; must be >= limit_in_bytes at all times, hence set after it.
        fs.write_optional(os.path.join(path, "memory.memsw.limit_in_bytes"), int(self.limit_bytes))

    def oom_killed(self, spec) -> bool:
        """True if memory.oom_control's oom_kill counter (>= 4.13) is positive."""
        path = _spec_path(spec)
        if path is None:
            return False
        return fs.read_keyed(os.path.join(path, "memory.oom_control")).get("oom_kill", 0) > 0


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
            fs.write(os.path.join(path, name), value)


# What each resource's cgroup files are: the value written per session, the file read for current use.
_V2_FILES = {"cpu": lambda cores: {"cpu.max": f"{_quota_us(cores)} {CPU_PERIOD_US}"},
             "pids": lambda count: {"pids.max": int(count)}}
_V1_FILES = {"cpu": lambda cores: {"cpu.cfs_period_us": CPU_PERIOD_US, "cpu.cfs_quota_us": _quota_us(cores)},
             "pids": lambda count: {"pids.max": int(count)}}
_V1_PROBE_FILE = {"cpu": "cpu.cfs_quota_us", "pids": "cgroup.procs"}


def _quota_us(cores: float) -> int:
    """The CFS quota (µs a period) for a share of cores."""
    return max(MIN_QUOTA_US, round(cores * CPU_PERIOD_US))


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

    def prepare(self, key: str, memory_spec: LimitSpec) -> CgroupPart | None:
        """This spawn's part of the spec: the cgroup holding the limit (and whether the child must join it)."""
        if self.mechanism == "cgroup2":
            path = memory_spec.path
            for name, value in self.files.items():
                fs.write(os.path.join(path, name), value)
            return CgroupPart(path)
        if self.mechanism == "cgroup1":
            return CgroupPart(self.group.make_leaf(key), join=True)
        return None

    def usage(self, part: CgroupPart) -> dict | None:
        """Current use from the cgroup: pids.current; cpu.stat's usage and throttling (what the kernel has)."""
        path = _spec_path(part)
        if path is None:
            return None
        if self.resource == "pids":
            current = fs.read_int(os.path.join(path, "pids.current"))
            return None if current is None else {"current": current}
        stat = fs.read_keyed(os.path.join(path, "cpu.stat"))
        if not stat:
            return None
        return {"usage_usec": stat.get("usage_usec"), "throttled": stat.get("nr_throttled", 0)}

    def release(self, part: CgroupPart) -> None:
        """Remove this spawn's leaf of its own hierarchy (cgroup1); the memory cgroup goes with memory."""
        if self.mechanism == "cgroup1" and isinstance(part, CgroupPart):
            self.group.release_memory(part)

    def close(self) -> None:
        """Remove the per-run dir of its own hierarchy."""
        if self.group is not None:
            self.group.close()


def choose_control(resource: str, value, memory: MemoryLimiter, *, run_id: str, v2_root: str,
                   v1_root: str, proc_self_cgroup: str, pids_rlimit: bool = True) -> ControlLimit:
    """The best mechanism for one limit beyond memory; the reasons for skipped ones go to memory.fallback_reasons.

    ``pids_rlimit``: whether each session has a uid of its own (root and the sandbox's uid layer),
    the only case where RLIMIT_NPROC bounds one session rather than every process of the server's uid.
    """
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
    if resource == "pids" and pids_rlimit:
        return ControlLimit("pids", value, "rlimit", reason="RLIMIT_NPROC of the session's own uid, where the "
                            "sandbox gives it one (as root); " + "; ".join(reasons))
    if resource == "pids":
        reasons.insert(0, "RLIMIT_NPROC would count every process of the server's uid: it bounds a session "
                          "only with a uid of its own (root and the sandbox's uid layer)")
    return ControlLimit(resource, value, "unavailable", reason="; ".join(reasons))


def _probe_control_v2(resource: str, value, memory: Cgroup2Limiter, v2_root: str) -> ControlLimit:
    """Enable the controller for the memory limiter's per-spawn cgroups; raises with a reason when impossible."""
    own = os.path.dirname(memory.path)
    if resource not in fs.read(os.path.join(own, "cgroup.controllers")).split():
        raise RuntimeError(f"{resource} controller not delegated to our cgroup {own}")
    fs.enable_controller(own, resource)
    fs.enable_controller(memory.path, resource)
    return ControlLimit(resource, value, "cgroup2", files=_V2_FILES[resource](value))


def _probe_control_v1(resource: str, value, run_id: str, v1_root: str, proc_self_cgroup: str) -> ControlLimit:
    """Make <v1_root>/<own path>/corral-<run> in the controller's own hierarchy; raises with a reason when impossible."""
    if not os.path.exists(os.path.join(v1_root, _V1_PROBE_FILE[resource])):
        raise RuntimeError(f"no cgroup v1 {resource} controller mounted at {v1_root}")
    own = fs.join(v1_root, fs.own_cgroup(proc_self_cgroup, resource))
    if not os.path.isdir(own):
        raise RuntimeError(f"our {resource} cgroup {own} is not visible under {v1_root}")
    files = _V1_FILES[resource](value)
    parent = os.path.join(own, run_dir_name(run_id))
    os.makedirs(parent, exist_ok=True)
    group = _Cgroup1Group(parent, files)
    group.swept = sweep_stale_runs(own, lambda path: _Cgroup1Group(path, {}))
    return ControlLimit(resource, value, "cgroup1", files=files, group=group)


# ----------------------------------------------------------------------------------------------
# probing the memory controller

def probe_cgroup2(limit: int, run_id: str, v2_root: str, proc_self_cgroup: str) -> Cgroup2Limiter:
    """Set up <own>/corral-<run_id> with +memory for children; raises with a reason when impossible."""
    controllers = os.path.join(v2_root, "cgroup.controllers")
    if not os.path.exists(controllers):
        raise RuntimeError(f"no pure cgroup v2 mount at {v2_root} ({controllers} missing)")
    if "memory" not in fs.read(controllers).split():
        raise RuntimeError(f"memory controller not available in {controllers}")
    own_path = fs.own_cgroup(proc_self_cgroup, None)
    if own_path.strip("/") == "":
        # The (namespace) root: its cgroup.procs is every process on the host/container, and the leaf
        # move would drag them all along. Only a delegated subtree is ours to rearrange.
        raise RuntimeError("we run in the root cgroup; start corral in a delegated cgroup (systemd Delegate=memory)")
    own = fs.join(v2_root, own_path)
    if "memory" not in fs.read(os.path.join(own, "cgroup.controllers")).split():
        raise RuntimeError(f"memory controller not delegated to our cgroup {own}")
    fs.make_leaf_for_ourselves(own)
    fs.enable_controller(own)
    parent = os.path.join(own, run_dir_name(run_id))
    os.makedirs(parent, exist_ok=True)
    try:
        fs.enable_controller(parent)
    except OSError:
        fs.rmdir_retry(parent)
        raise
    limiter = Cgroup2Limiter(limit, parent)
    limiter.swept = sweep_stale_runs(own, lambda path: Cgroup2Limiter(limit, path))
    return limiter


def probe_cgroup1(limit: int, run_id: str, v1_root: str, proc_self_cgroup: str) -> Cgroup1Limiter:
    """Create <v1_root>/<own memory path>/corral-<run_id>; raises with a reason when impossible."""
    if not os.path.exists(os.path.join(v1_root, "memory.usage_in_bytes")):
        raise RuntimeError(f"no cgroup v1 memory controller mounted at {v1_root}")
    own = fs.join(v1_root, fs.own_cgroup(proc_self_cgroup, "memory"))
    if not os.path.isdir(own):
        raise RuntimeError(f"our memory cgroup {own} is not visible under {v1_root}")
    parent = os.path.join(own, run_dir_name(run_id))
    os.makedirs(parent, exist_ok=True)
    limiter = Cgroup1Limiter(limit, parent)
    limiter.swept = sweep_stale_runs(own, lambda path: Cgroup1Limiter(limit, path))
    return limiter
