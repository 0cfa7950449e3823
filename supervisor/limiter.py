"""What every memory limiter offers the spawner, and the mechanisms that need no cgroup (none, rlimit).

For every spawn the spawner calls ``prepare(key)`` and sends the resulting ``LimitSpec``
(agent_proc/limits.py) to the zygote; the forked child applies it with ``apply_limits`` before any agent code
runs. After the child exits the spawner asks ``oom_killed(spec)`` (before ``release(spec)``, which
removes the evidence). The cgroup mechanisms are in supervisor/cgroups.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from corral.agent_proc.limits import LimitSpec

if TYPE_CHECKING:
    from corral.supervisor.cgroups import ControlLimit


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

    def prepare(self, key: str) -> LimitSpec:
        """Per-spawn spec for apply_limits in the child: memory, then each control (undone on failure)."""
        spec = self._prepare_memory(key)
        try:
            for name, control in self.controls.items():
                part = control.prepare(key, spec)
                if part is not None:
                    spec.controls[name] = part
        except OSError:
            self.release(spec)
            raise
        return spec

    def _prepare_memory(self, key: str) -> LimitSpec:
        """The memory part of the spec."""
        return LimitSpec()

    def control_usage(self, spec) -> dict:
        """Each control's current use in this spawn ({} where there is no cgroup to ask)."""
        parts = spec.controls if isinstance(spec, LimitSpec) else {}
        usage = {}
        for name, part in parts.items():
            used = self.controls[name].usage(part) if name in self.controls else None
            if used is not None:
                usage[name] = used
        return usage

    def release(self, spec) -> None:
        """After the spawn's process exited: release each control's part, then memory's; never raises."""
        parts = spec.controls if isinstance(spec, LimitSpec) else {}
        for name, part in parts.items():
            if name in self.controls:
                self.controls[name].release(part)
        self.release_memory(spec)

    def release_memory(self, spec) -> None:
        """Release this spawn's memory part (a cgroup1 control calls it too); nothing without a cgroup."""

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

    def _prepare_memory(self, key: str) -> LimitSpec:
        """The child does all the work; just pass the size."""
        return LimitSpec("rlimit", limit_bytes=int(self.limit_bytes))
