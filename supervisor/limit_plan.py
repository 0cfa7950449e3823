"""Per-session memory limits: pick the best mechanism the host allows (cgroup v2, cgroup v1, rlimit).

The supervisor owns one limiter per run and hands it to the spawner (supervisor/spawner.py). The
common interface and the rlimit mechanism are in supervisor/limiter.py, the cgroup mechanisms and
the cpu and pids controls in supervisor/cgroups.py, the cgroup filesystem in supervisor/cgroupfs.py;
this module parses the sizes and chooses. ``release``, ``close`` and the start-up sweep wait for the
kernel between tries, so they run on a worker thread.

Stdlib only (psutil is not needed); no web imports.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from corral.supervisor.cgroupfs import SAFE_NAME, process_start_time, run_dir_name
from corral.supervisor.cgroups import (
    CPU_PERIOD_US, MIN_QUOTA_US, Cgroup1Limiter, Cgroup2Limiter, ControlLimit, choose_control, probe_cgroup1,
    probe_cgroup2,
)
from corral.supervisor.limiter import MemoryLimiter, NoLimiter, RlimitLimiter

__all__ = [
    "MemoryLimiter", "Cgroup2Limiter", "Cgroup1Limiter", "RlimitLimiter", "NoLimiter",
    "parse_size", "parse_cores", "choose_limiter", "MECHANISMS", "ControlLimit",
    "process_start_time", "run_dir_name",
]

MECHANISMS = ("cgroup2", "cgroup1", "rlimit", "none")

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_NO_LIMIT_WORDS = {"none", "off", "unlimited", "max"}


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
    if value and value * CPU_PERIOD_US < MIN_QUOTA_US:
        raise ValueError(f"invalid cpu limit {text!r}: at least {MIN_QUOTA_US / CPU_PERIOD_US} cores")
    return value


# ----------------------------------------------------------------------------------------------
# choosing

def choose_limiter(limit_bytes: int | None, *, run_id: str, prefer: str | None = None,
                   v2_root: str = "/sys/fs/cgroup", v1_root: str = "/sys/fs/cgroup/memory",
                   proc_self_cgroup: str = "/proc/self/cgroup", cpu_limit: float | None = None,
                   max_pids: int | None = None, v1_roots: dict | None = None,
                   pids_rlimit: bool = True) -> MemoryLimiter:
    """Return the best limiter the host allows, with its cpu and pids controls when asked for (not None).

    Reasons for skipped mechanisms go to .fallback_reasons; ``v1_roots`` maps "cpu"/"pids" to their
    v1 mounts (default /sys/fs/cgroup/cpu and /sys/fs/cgroup/pids); ``pids_rlimit``: whether sessions
    have uids of their own, so that RLIMIT_NPROC can stand in for a missing pids cgroup.
    """
    limiter = _choose_memory(limit_bytes, run_id=run_id, prefer=prefer, v2_root=v2_root, v1_root=v1_root,
                             proc_self_cgroup=proc_self_cgroup)
    v1_roots = {"cpu": "/sys/fs/cgroup/cpu", "pids": "/sys/fs/cgroup/pids", **(v1_roots or {})}
    for resource, value in (("cpu", cpu_limit), ("pids", max_pids)):
        if value is not None:
            if resource == "cpu":
                value = parse_cores(value)
            limiter.controls[resource] = choose_control(resource, value, limiter, run_id=run_id, v2_root=v2_root,
                                                        v1_root=v1_roots[resource], proc_self_cgroup=proc_self_cgroup,
                                                        pids_rlimit=pids_rlimit)
    return limiter


def _choose_memory(limit_bytes: int | None, *, run_id: str, prefer: str | None, v2_root: str, v1_root: str,
                   proc_self_cgroup: str) -> MemoryLimiter:
    """The memory limiter: the best mechanism the host allows, or the one preferred."""
    if prefer is not None and prefer not in MECHANISMS:
        raise ValueError(f"unknown memory limit mechanism {prefer!r}; expected one of {', '.join(MECHANISMS)}")
    if not limit_bytes or prefer == "none":
        return NoLimiter()
    if not SAFE_NAME.match(run_id):
        raise ValueError(f"run_id {run_id!r} is not filesystem-safe")
    probes = {
        "cgroup2": lambda: probe_cgroup2(limit_bytes, run_id, v2_root, proc_self_cgroup),
        "cgroup1": lambda: probe_cgroup1(limit_bytes, run_id, v1_root, proc_self_cgroup),
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
