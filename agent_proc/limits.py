"""Apply a per-session limit spec (memory; cpu and pids cgroups) in the freshly forked agent child (stdlib only).

The spec, a ``LimitSpec`` (defined here, once, for both sides), comes from
``supervisor.limiter.MemoryLimiter.prepare`` through the zygote's pipe. This runs before any agent
code, so an agent can never run unconfined.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field

__all__ = ["apply_limits", "LimitSpec", "CgroupPart", "OOM_EXIT_CODE", "AS_MULTIPLE"]

# Exit status an agent uses after a MemoryError under rlimit, so the supervisor classifies "oom".
OOM_EXIT_CODE = 86

# RLIMIT_AS backstop = current virtual size + AS_MULTIPLE * limit (see _apply_rlimit for why).
AS_MULTIPLE = 4


@dataclass(slots=True)
class CgroupPart:
    """A limit beyond memory (cpu, pids) held by a cgroup of the spawn's own."""

    path: str
    join: bool = False  # a hierarchy of its own (cgroup v1): the child moves itself in


@dataclass(slots=True)
class LimitSpec:
    """One spawn's limits: the memory mechanism and its cgroup or size, and the other limits' cgroups."""

    kind: str = "none"  # none, rlimit, cgroup1, cgroup2
    path: str | None = None  # the spawn's memory cgroup (cgroup1, cgroup2)
    limit_bytes: int | None = None
    controls: dict[str, CgroupPart] = field(default_factory=dict)  # "cpu", "pids"

    @property
    def join(self) -> list[str]:
        """The cgroups beyond memory's that the child moves itself into."""
        return [part.path for part in self.controls.values() if part.join]


def apply_limits(spec: LimitSpec | None) -> None:
    """Confine the calling process as the spec says; raises OSError on failure."""
    spec = spec or LimitSpec()
    if spec.kind in ("cgroup2", "cgroup1"):
        _join_cgroup(spec.path)
    elif spec.kind == "rlimit":
        _apply_rlimit(int(spec.limit_bytes))
    elif spec.kind != "none":
        raise OSError(f"unknown memory limit kind {spec.kind!r}")
    for path in spec.join:
        _join_cgroup(path)  # a limit with a cgroup v1 hierarchy of its own (cpu, pids)


def _join_cgroup(path: str) -> None:
    """Move ourselves into the per-spawn cgroup; processes we fork later start inside it too.

    With os calls, not a text file object: this runs in every new agent, and io's Python-level
    machinery would copy its pages into each (docs/benchmarks.md, "Memory per idle agent").
    """
    fd = os.open(path + "/cgroup.procs", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)  # as open("w")
    try:
        os.write(fd, b"%d" % os.getpid())
    finally:
        os.close(fd)


def _apply_rlimit(limit: int) -> None:
    """Cap private writable memory (RLIMIT_DATA) and, loosely, the address space (RLIMIT_AS)."""
    # RLIMIT_DATA, not RLIMIT_AS, is the real limit: since Linux 4.7 it counts every private writable
    # mapping (heap, anonymous mmap — what malloc and bytearray use), while virtual size is inflated
    # by things that cost no memory: 8 MiB reserved per thread stack, 64 MiB glibc malloc arenas per
    # thread, PROT_NONE reservations, mapped shared libraries. An AS limit near the real budget would
    # make thread creation fail long before memory runs out.
    # The budget counts from what we already have: pages inherited from the zygote are shared
    # copy-on-write (and under cgroups stay charged to the zygote), so a session gets `limit` *new*
    # bytes, the same meaning as the cgroup mechanisms.
    _lower_rlimit(resource.RLIMIT_DATA, _status_kib("VmData") * 1024 + limit)
    # RLIMIT_AS only as a generous backstop for what RLIMIT_DATA does not count (MAP_SHARED anonymous
    # or /dev/shm mappings): current size plus a multiple of the budget leaves room for threads.
    _lower_rlimit(resource.RLIMIT_AS, _status_kib("VmSize") * 1024 + AS_MULTIPLE * limit)


def _lower_rlimit(which: int, value: int) -> None:
    """Set soft and hard limit to `value` (the agent must not raise it), never above an existing hard limit."""
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY and value > hard:
        value = hard  # raising a hard limit needs CAP_SYS_RESOURCE; a tighter one is fine as is
    resource.setrlimit(which, (value, value))


def _status_kib(field: str) -> int:
    """A "<field>: N kB" value from /proc/self/status, 0 when unavailable."""
    try:
        fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            status = os.read(fd, 1 << 16)  # os calls, as in _join_cgroup
        finally:
            os.close(fd)
        for line in status.split(b"\n"):
            if line.startswith(field.encode() + b":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0
