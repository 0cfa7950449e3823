"""Per-session process figures (pid, RSS, USS, CPU %, threads, fds, memory limit) from psutil.

Reading /proc costs a few system calls per process, so it is done only while someone looks:
``refresh()`` samples every live agent in one pass on a worker thread and caches the result;
calls within ``max_age`` seconds of the last pass reuse it (unless agents came or went since), so
any number of admin requests or scrapes cost at most one pass a second, and nobody looking costs
nothing (no timer at all).
``for_session(s)`` is synchronous and returns the cached figures for one session.

CPU % is measured between two passes (psutil keeps each process's previous CPU times); the
first time a process is seen it is its average since it started, like ``ps``'s %CPU.
RSS, CPU % and threads are read on every pass. USS and PSS come from /proc/PID/smaps_rollup,
which makes the kernel walk the process's page tables (most of a pass's cost), so they, the open
fds and the cgroup's usage are re-read at most every ``detail_max_age`` seconds per process, at
staggered times so each pass does a share of that work.
"""

import asyncio
import os
import random
import time

import psutil

from corral.supervisor import procfs
from corral.supervisor.logs import get_logger

log = get_logger(component="procstats")

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

# Figures for a session that has no process (or whose process vanished mid-pass).
_EMPTY = {
    "rss_bytes": None,
    "uss_bytes": None,
    "pss_bytes": None,
    "cpu_percent": None,
    "threads": None,
    "open_fds": None,
    "processes": None,
}


class ProcStats:
    """Cached process figures of every live agent of one supervisor."""

    def __init__(self, sup, *, max_age: float = 1.0, detail_max_age: float = 10.0):
        self.sup = sup
        self.max_age = max_age
        self.detail_max_age = detail_max_age
        self.passes = 0
        self.last_pass_seconds: float | None = None
        self._figures: dict[int, dict] = {}  # pid -> figures of the last pass
        self._tracked: dict[int, _Tracked] = {}  # kept between passes for CPU deltas and details
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
        out["limits"] = self._other_limits()
        if "cgroup" not in out:
            out["cgroup"] = None
        out["egress"] = self.sup.egress_counts(s.id, s.tenant)
        return out

    def _limit(self) -> dict | None:
        """The memory limit and the mechanism enforcing it."""
        limiter = self.sup.limiter
        if limiter is None:
            return None
        described = limiter.describe()
        return {"bytes": described.get("limit_bytes"), "mechanism": described.get("mechanism")}

    def _other_limits(self) -> dict:
        """The session's limits beyond memory: processes and cpu (with their mechanisms), open files."""
        controls = getattr(self.sup.limiter, "controls", {}) or {}
        out = {name: {"limit": c.value, "mechanism": c.mechanism} for name, c in controls.items()}
        out["open_files"] = {"limit": self.sup.config.max_open_files or None, "mechanism": "rlimit"}
        return out

    def total_rss(self) -> int:
        """Resident memory of every sampled agent together, in bytes."""
        return sum(f["rss_bytes"] or 0 for f in self._figures.values())

    def total_uss(self) -> int:
        """Unique memory of every sampled agent together, in bytes."""
        return sum(f["uss_bytes"] or 0 for f in self._figures.values())

    # ---------------------------------------------------------------- on the worker thread

    def _sample(self, targets: list[tuple[int, object]]) -> dict[int, dict]:
        """One pass over every target process."""
        started = time.perf_counter()
        now = time.monotonic()
        tracked, figures = {}, {}
        for pid, spec in targets:
            entry = self._tracked.get(pid)
            try:
                if entry is None:
                    entry = _Tracked(psutil.Process(pid), spec, now)
                figures[pid] = entry.read(now, self.detail_max_age, self.sup.limiter)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # it died during the pass; its exit report is on its way
            tracked[pid] = entry
        self._tracked = tracked
        self.last_pass_seconds = time.perf_counter() - started
        return figures


class _Tracked:
    """One agent process followed from pass to pass: its last CPU reading and slow-changing figures."""

    __slots__ = ("proc", "spec", "started", "cpu_ticks", "cpu_at", "detail", "detail_due")

    def __init__(self, proc: psutil.Process, spec, now: float):
        self.proc, self.spec = proc, spec
        self.started = self.cpu_ticks = None
        self.cpu_at = now
        self.detail: dict = {}
        self.detail_due = now  # read at once, then at a random phase so passes share the work

    def read(self, now: float, detail_max_age: float, limiter) -> dict:
        """RSS, CPU % and threads now (one read of /proc/PID/stat); the rest when due."""
        started, ticks, threads, rss_pages = _read_stat(self.proc.pid)
        if self.started is None or started != self.started:  # first sight (or a reused pid)
            self.started = started
            cpu = _lifetime_cpu_percent(self.proc)
        else:
            cpu = 100.0 * (ticks - self.cpu_ticks) / _CLK_TCK / max(now - self.cpu_at, 1e-3)
        self.cpu_ticks, self.cpu_at = ticks, now
        if now >= self.detail_due:
            first = not self.detail
            self.detail = self._read_detail(limiter)
            self.detail_due = now + (random.uniform(0, detail_max_age) if first else detail_max_age)
        return {"rss_bytes": rss_pages * _PAGE, "cpu_percent": round(cpu, 1), "threads": threads, **self.detail}

    def _read_detail(self, limiter) -> dict:
        """USS and PSS (smaps_rollup: the kernel walks the page tables), open fds, cgroup usage."""
        try:
            full = self.proc.memory_full_info()
            uss, pss = full.uss, getattr(full, "pss", None)
        except psutil.AccessDenied:
            uss = pss = None
        usage = limiter.usage(self.spec) if self.spec and limiter is not None else None
        controls = limiter.control_usage(self.spec) if self.spec and limiter is not None else {}
        return {"uss_bytes": uss, "pss_bytes": pss, "open_fds": self.proc.num_fds(), "cgroup": usage,
                "processes": controls.get("pids", {}).get("current")}


def _read_stat(pid: int) -> tuple[int, int, int, int]:
    """(start time, utime + stime in ticks, threads, RSS pages) from /proc/PID/stat.

    One read instead of psutil's three (stat, statm, status) for what every pass needs.
    """
    try:
        fields = procfs.stat_fields(pid)
    except FileNotFoundError:
        raise psutil.NoSuchProcess(pid) from None
    except PermissionError:
        raise psutil.AccessDenied(pid) from None
    if fields[procfs.STATE] == b"Z":
        raise psutil.ZombieProcess(pid)
    return (int(fields[procfs.STARTTIME]), int(fields[procfs.UTIME]) + int(fields[procfs.STIME]),
            int(fields[procfs.NUM_THREADS]), int(fields[procfs.RSS]))


def _lifetime_cpu_percent(proc: psutil.Process) -> float:
    """Average CPU % since the process started (what the first sample can say)."""
    times = proc.cpu_times()
    lived = max(time.time() - proc.create_time(), 0.01)
    # create_time has clock-tick resolution: cap what a very young process can claim.
    return min(100.0 * (times.user + times.system) / lived, 100.0 * proc.num_threads())
