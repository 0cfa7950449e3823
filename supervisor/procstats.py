"""Per-session process figures (pid, RSS, USS, CPU %, threads, fds, memory limit) from psutil.

Reading /proc costs a few system calls per process, so it is done only while someone looks:
``refresh()`` samples every live agent in one pass on a worker thread and caches the result;
calls within ``max_age`` seconds of the last pass reuse it (unless agents came or went since), so
any number of admin requests or scrapes cost at most one pass a second, and nobody looking costs
nothing (no timer at all).
``for_session(s)`` is synchronous and returns the cached figures for one session.

CPU % is measured between two passes (psutil keeps each process's previous CPU times); the
first time a process is seen it is its average since it started, like ``ps``'s %CPU.
USS and PSS come from /proc/PID/smaps_rollup, which makes the kernel walk the process's page
tables (most of a pass's cost), so each process's are re-read at most every ``uss_max_age``
seconds, at staggered times; RSS, CPU, threads and fds are read on every pass.
"""

import asyncio
import random
import time

import psutil

from supervisor.logs import get_logger

log = get_logger(component="procstats")

# Figures for a session that has no process (or whose process vanished mid-pass).
_EMPTY = {
    "rss_bytes": None,
    "uss_bytes": None,
    "pss_bytes": None,
    "cpu_percent": None,
    "threads": None,
    "open_fds": None,
}


class ProcStats:
    """Cached process figures of every live agent of one supervisor."""

    def __init__(self, sup, *, max_age: float = 1.0, uss_max_age: float = 10.0):
        self.sup = sup
        self.max_age = max_age
        self.uss_max_age = uss_max_age
        self.passes = 0
        self.last_pass_seconds: float | None = None
        self._figures: dict[int, dict] = {}  # pid -> figures of the last pass
        self._tracked: dict[int, _Tracked] = {}  # kept between passes for CPU deltas and USS
        self._sampled_pids: frozenset[int] = frozenset()
        self._sampled_at = float("-inf")  # monotonic
        self._pass: asyncio.Future | None = None

    # ---------------------------------------------------------------- on the loop

    async def refresh(self) -> None:
        """Make the cache at most ``max_age`` old and cover every agent: join the pass in flight or run one."""
        if self._pass is None and not self._stale():
            return
        if self._pass is None:
            self._pass = asyncio.ensure_future(self._run_pass())
        await asyncio.shield(self._pass)

    async def _run_pass(self) -> None:
        """Snapshot the pids on the loop, read /proc on a worker thread, publish the result."""
        targets = self._targets()
        self._sampled_pids = frozenset(pid for pid, _ in targets)
        loop = asyncio.get_running_loop()
        try:
            figures = await loop.run_in_executor(None, self._sample, targets)
        except Exception as exc:  # a failed pass keeps the old figures; never fail a request
            log.warning("procstats_failed", error=repr(exc))
            figures = self._figures
        finally:
            self._pass = None
        self._figures = figures
        self._sampled_at = time.monotonic()
        self.passes += 1

    def _stale(self) -> bool:
        """Whether the cache is too old, or agents started or died since it was taken."""
        if time.monotonic() - self._sampled_at >= self.max_age:
            return True
        return self.sup.by_pid.keys() != self._sampled_pids

    def _targets(self) -> list[tuple[int, object]]:
        """(pid, limit spec) of every session that has a process."""
        return [(pid, s.limits) for pid, s in list(self.sup.by_pid.items())]

    def for_session(self, s) -> dict:
        """The cached figures of one session (``None`` fields when it has no process)."""
        figures = self._figures.get(s.pid) if s.pid is not None else None
        out = {"pid": s.pid, **(figures or _EMPTY)}
        out["memory_limit"] = self._limit()
        if "cgroup" not in out:
            out["cgroup"] = None
        return out

    def _limit(self) -> dict | None:
        """The memory limit and the mechanism enforcing it."""
        limiter = self.sup.limiter
        if limiter is None:
            return None
        described = limiter.describe()
        return {"bytes": described.get("limit_bytes"), "mechanism": described.get("mechanism")}

    def total_rss(self) -> int:
        """Resident memory of every sampled agent together, in bytes."""
        return sum(f["rss_bytes"] or 0 for f in self._figures.values())

    def total_uss(self) -> int:
        """Unique memory of every sampled agent together, in bytes."""
        return sum(f["uss_bytes"] or 0 for f in self._figures.values())

    def sampled_age(self) -> float | None:
        """Seconds since the last pass, or None before the first."""
        if self._sampled_at == float("-inf"):
            return None
        return time.monotonic() - self._sampled_at

    # ---------------------------------------------------------------- on the worker thread

    def _sample(self, targets: list[tuple[int, object]]) -> dict[int, dict]:
        """One pass over every target process."""
        started = time.perf_counter()
        now = time.monotonic()
        limiter = self.sup.limiter
        tracked, figures = {}, {}
        for pid, spec in targets:
            entry = self._tracked.get(pid)
            try:
                if entry is None:
                    entry = _Tracked(psutil.Process(pid), now, self.uss_max_age)
                figures[pid] = entry.read(now, self.uss_max_age)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # it died during the pass; its exit report is on its way
            tracked[pid] = entry
            if spec and limiter is not None:
                figures[pid]["cgroup"] = limiter.usage(spec)
        self._tracked = tracked
        self.last_pass_seconds = time.perf_counter() - started
        return figures


class _Tracked:
    """One agent process followed from pass to pass: psutil's handle and its last USS/PSS."""

    __slots__ = ("proc", "fresh", "uss", "pss", "uss_due")

    def __init__(self, proc: psutil.Process, now: float, uss_max_age: float):
        self.proc = proc
        self.fresh = True
        self.uss = self.pss = None
        self.uss_due = now  # read at once, then at a random phase so passes share the work

    def read(self, now: float, uss_max_age: float) -> dict:
        """The figures of the process, read in one oneshot() batch."""
        proc = self.proc
        with proc.oneshot():
            rss = self._memory(now, uss_max_age)
            if self.fresh:
                cpu = _lifetime_cpu_percent(proc)
                proc.cpu_percent(None)  # start the interval for the next pass
                self.fresh = False
            else:
                cpu = proc.cpu_percent(None)
            return {
                "rss_bytes": rss,
                "uss_bytes": self.uss,
                "pss_bytes": self.pss,
                "cpu_percent": round(cpu, 1),
                "threads": proc.num_threads(),
                "open_fds": proc.num_fds(),
            }

    def _memory(self, now: float, uss_max_age: float) -> int:
        """RSS now; USS and PSS (smaps_rollup: the costly read) when due."""
        if now < self.uss_due:
            return self.proc.memory_info().rss
        first = self.uss is None
        try:
            full = self.proc.memory_full_info()
        except psutil.AccessDenied:
            self.uss_due = float("inf")  # never readable for us: RSS only
            return self.proc.memory_info().rss
        self.uss, self.pss = full.uss, getattr(full, "pss", None)
        self.uss_due = now + (random.uniform(0, uss_max_age) if first else uss_max_age)
        return full.rss


def _lifetime_cpu_percent(proc: psutil.Process) -> float:
    """Average CPU % since the process started (what the first sample can say)."""
    times = proc.cpu_times()
    lived = max(time.time() - proc.create_time(), 0.01)
    # create_time has clock-tick resolution: cap what a very young process can claim.
    return min(100.0 * (times.user + times.system) / lived, 100.0 * proc.num_threads())
