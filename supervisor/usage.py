"""Usage accounting: what each session (and so each tenant) used, kept in the store.

Fed by the events stream (supervisor/events.py), never from the turn's path: ``spawned`` counts a
start, ``turn`` a turn with its messages and bytes, ``end`` an end by reason with the process's
exact CPU (the zygote's ``wait4``). One timer samples every live process once per
``--usage-interval`` (a pass on a worker thread, never a timer per session): CPU seconds from the
session's cgroup where it has a cpu control, else ``/proc/PID/stat``; memory from its memory
cgroup, else its RSS; memory × time adds the memory seen × the seconds since the last sample.
The same pass feeds the in-memory timeline of the dashboard's plots (supervisor/timeline.py).
Each batch also reads the processes of the sessions that had turns in it, so CPU and memory are
counted as of each turn's end without a read on the turn's path.

What is counted waits in ``pending`` and is written in one store transaction per batch
(``Store.add_usage``) at most ``FLUSH_AFTER`` seconds after it happened, and at close; a batch
whose write fails is put back and tried again on the next one.
"""

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily

from corral.supervisor import procfs
from corral.supervisor.logs import get_logger
from corral.supervisor.session_keys import session_key
from corral.supervisor.store.base import HOUR, USAGE_COUNTERS, UsageDelta, empty_usage, hour_of
from corral.supervisor.timeline import Timeline

log = get_logger(component="usage")

FLUSH_AFTER = 0.05  # seconds a counted turn waits for its batch (one write for every turn in that window)
RETRY_AFTER = 5.0  # seconds before a failed batch is tried again when nothing new comes
MIB = 1024 * 1024
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_EVENTS = ("spawned", "turn", "end")
# Prometheus name (without _total) -> (usage counter, help)
_TENANT_COUNTERS = {
    "corral_tenant_session_starts": ("starts", "Agent processes started, by tenant"),
    "corral_tenant_turns": ("turns", "Turns answered or failed, by tenant"),
    "corral_tenant_messages_in": ("messages_in", "Messages committed from clients, by tenant"),
    "corral_tenant_messages_out": ("messages_out", "Replies committed, by tenant"),
    "corral_tenant_bytes_in": ("bytes_in", "UTF-8 bytes of messages from clients, by tenant"),
    "corral_tenant_bytes_out": ("bytes_out", "UTF-8 bytes of replies, by tenant"),
    "corral_tenant_cpu_seconds": ("cpu_seconds", "CPU seconds (user + system) of agent processes, by tenant"),
    "corral_tenant_memory_mib_seconds": ("memory_mib_seconds", "Agent memory × time in MiB·s, by tenant"),
}  # corral_tenant_egress_* are the egress gateway's own series (supervisor/egress/), not repeated here


@dataclass
class _Pending:
    """One session's usage not yet written."""

    tenant: str
    counts: Counter = field(default_factory=Counter)
    peak: int = 0
    end_reasons: Counter = field(default_factory=Counter)
    last_end_reason: str | None = None


@dataclass
class _Process:
    """The last reading of one session's current process (CPU already counted, memory, when)."""

    pid: int
    since: float  # monotonic time of the last reading (or of the spawn)
    cpu_seen: float = 0.0
    memory: int = 0


class Usage:
    """Counts one node's sessions' usage and writes it to the store in batches."""

    def __init__(self, sup, *, interval: float):
        self.sup = sup
        self.interval = interval
        self.timeline = Timeline(interval)
        self.pending: dict[str, _Pending] = {}
        self.totals: dict[str, Counter] = {}  # tenant -> counters since this server started (Prometheus)
        self.ends: Counter = Counter()  # (tenant, reason) -> ends since this server started
        self.batches = 0  # batches written
        self.reads = 0  # process readings taken (each a /proc read or two, on the worker thread)
        self._processes: dict[str, _Process] = {}  # session key -> its live process's last reading
        # sessions started or with a turn since the last pass: only these are read (an idle process
        # uses no CPU, and its memory x time is counted from its last reading at its next one or its end)
        self._touched: set[str] = set()
        self._flush: asyncio.Task | None = None
        self._flush_timer: asyncio.TimerHandle | None = None
        self._sample_timer: asyncio.TimerHandle | None = None
        self._sampling: asyncio.Task | None = None
        self._unsubscribe = None
        self._closed = False

    # ---- life --------------------------------------------------------------------------------

    def start(self) -> None:
        """Listen to the supervisor's events and arm the sampling timer (again after a close)."""
        self._closed = False
        self._unsubscribe = self.sup.events.subscribe(self._on_event, types=_EVENTS)
        self._arm_sample()

    async def close(self) -> None:
        """Stop sampling and write what is pending (called before the store closes)."""
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        for timer in (self._sample_timer, self._flush_timer):
            if timer is not None:
                timer.cancel()
        if self._sampling is not None:
            await asyncio.wait([self._sampling])
        await self.flush()

    # ---- what is counted -----------------------------------------------------------------------

    def record_egress(self, session_id: str, *, bytes: int = 0, requests: int = 0, tenant: str | None = None) -> None:
        """Count a session's traffic through the egress gateway (the gateway calls this; see docs/operations.md).

        ``session_id`` is the tenant's id with ``tenant`` given, else the session's key.
        """
        key = session_key(tenant, session_id) if tenant is not None else session_id
        tenant = tenant or self._tenant_of(key)
        if tenant is not None:
            self._add(key, tenant, egress_bytes=int(bytes), egress_requests=int(requests))

    def _tenant_of(self, session_id: str) -> str | None:
        """The tenant of a session this node holds."""
        s = self.sup.sessions.get(session_id)
        return s.tenant if s is not None else None

    def _on_event(self, event: dict) -> None:
        """Count a start, a turn or an end."""
        kind, tenant = event["type"], event.get("tenant")
        if tenant is None:
            return
        sid = session_key(tenant, event["session_id"])  # sessions, usage rows and timelines go by key
        if kind == "turn":
            counts = {"turns": 1}
            if event.get("in_bytes") is not None:
                counts.update(messages_in=1, bytes_in=event["in_bytes"])
            if event.get("out_bytes") is not None:
                counts.update(messages_out=1, bytes_out=event["out_bytes"])
            self._add(sid, tenant, **counts)
            self._touched.add(sid)
            self.timeline.count_turn()
        elif kind == "spawned":
            s = self.sup.sessions.get(sid)
            if s is not None and s.pid is not None:
                self._processes[sid] = _Process(s.pid, time.monotonic())
                self._touched.add(sid)
            self._add(sid, tenant, starts=1)
        elif kind == "end":
            self._ended(sid, tenant, event.get("end_reason") or event.get("reason"), event.get("cpu_seconds"))

    def _ended(self, sid: str, tenant: str, reason: str, cpu_seconds: float | None) -> None:
        """Count an end: its reason, the process's CPU not yet counted, its memory since the last sample."""
        self._touched.discard(sid)
        proc = self._processes.pop(sid, None)
        counts = {"ends": 1}
        if proc is not None:
            counts["memory_mib_seconds"] = proc.memory / MIB * max(0.0, time.monotonic() - proc.since)
            if cpu_seconds is not None:
                counts["cpu_seconds"] = max(0.0, cpu_seconds - proc.cpu_seen)
        pending = self._add(sid, tenant, **counts)
        pending.end_reasons[reason] += 1
        pending.last_end_reason = reason
        self.ends[(tenant, reason)] += 1
        self.timeline.count_end(reason)

    def _add(self, sid: str, tenant: str, *, peak: int = 0, **counts) -> _Pending:
        """Add amounts to a session's pending usage and its tenant's totals; a write follows shortly."""
        pending = self.pending.get(sid)
        if pending is None:
            pending = self.pending[sid] = _Pending(tenant)
        total = self.totals.get(tenant)
        if total is None:
            total = self.totals[tenant] = Counter()
        mine = pending.counts
        for name, amount in counts.items():  # a loop of dict adds: Counter.update of a mapping costs more, per turn
            mine[name] += amount
            total[name] += amount
        if peak:
            pending.peak = max(pending.peak, peak)
            total["memory_peak_bytes"] = max(total["memory_peak_bytes"], peak)
        if self._flush_timer is None:
            self._schedule_flush(FLUSH_AFTER)
        return pending

    # ---- writing -------------------------------------------------------------------------------

    def _schedule_flush(self, delay: float) -> None:
        """Write the pending usage ``delay`` seconds from now, unless a write is already due."""
        if self._flush_timer is None and not self._closed:
            self._flush_timer = asyncio.get_running_loop().call_later(delay, self._flush_due)

    def _flush_due(self) -> None:
        """The flush timer fired: start a write unless one is running (its end starts the next)."""
        self._flush_timer = None
        if self._flush is None:
            self._flush = asyncio.ensure_future(self.flush())

    async def flush(self) -> None:
        """Write every pending delta in one transaction; on failure they are kept for the next try."""
        if self._flush is not None and self._flush is not asyncio.current_task():
            await asyncio.wait([self._flush])
        try:
            while self.pending:
                # the CPU and memory of the sessions that had turns, read now: usage as of each turn's end
                await self._read([sid for sid, p in self.pending.items() if p.counts.get("turns")])
                batch, self.pending = self.pending, {}
                deltas = self._deltas(batch)
                try:
                    await self.sup.store.add_usage(deltas)
                except Exception as exc:  # the store is down: keep the counts, try again later
                    log.warning("usage_write_failed", sessions=len(deltas), error=str(exc))
                    self._put_back(batch)
                    self._schedule_flush(RETRY_AFTER)
                    return
                self.batches += 1
        finally:
            if self._flush is asyncio.current_task():
                self._flush = None

    def _deltas(self, batch: dict[str, _Pending]) -> list[UsageDelta]:
        """The store's deltas of a batch, in this hour on this node."""
        hour = hour_of(time.time())
        return [UsageDelta(sid, p.tenant, self.sup.node, hour, dict(p.counts), p.peak, dict(p.end_reasons),
                           p.last_end_reason) for sid, p in batch.items()]

    def _put_back(self, batch: dict[str, _Pending]) -> None:
        """Merge an unwritten batch into what came since."""
        for sid, old in batch.items():
            new = self.pending.get(sid)
            if new is None:
                self.pending[sid] = old
                continue
            new.counts.update(old.counts)
            new.end_reasons.update(old.end_reasons)
            new.peak = max(new.peak, old.peak)
            new.last_end_reason = new.last_end_reason or old.last_end_reason

    # ---- sampling ------------------------------------------------------------------------------

    def _arm_sample(self) -> None:
        """Sample again in one interval."""
        if not self._closed:
            self._sample_timer = asyncio.get_running_loop().call_later(self.interval, self._sample_due)

    def _sample_due(self) -> None:
        """The sampling timer fired: one pass over every live process."""
        self._sampling = asyncio.ensure_future(self.sample())
        self._sampling.add_done_callback(lambda _: self._arm_sample())

    async def sample(self) -> None:
        """Read the processes of the sessions active since the last pass (a worker thread), feed the timeline.

        Idle sessions are not read: 10,000 idle sessions cost the pass nothing but their last readings
        (measured: reading every live process every 10 s was 4 % of a core at 7,900 idle sessions).
        """
        touched, self._touched = self._touched, set()
        read = await self._read([sid for sid in touched if sid in self.sup.sessions])
        if read is None:
            self._touched |= touched  # read them next time
            return
        known = {sid: (proc.memory, proc.cpu_seen) for sid, proc in self._processes.items()
                 if sid not in read and sid in self.sup.sessions}
        self.timeline.sample(time.time(), self.sup.live_count, {**known, **read})

    async def _read(self, session_ids) -> dict[str, tuple[int, float]] | None:
        """Read these sessions' processes on a worker thread and count what they used since the last reading.

        Returns each one's (memory bytes, CPU seconds of its process so far), or None if the pass failed.
        """
        sessions = [(sid, self.sup.sessions.get(sid)) for sid in session_ids]
        targets = [(sid, s.pid, s.limits) for sid, s in sessions if s is not None and s.pid is not None]
        self.reads += len(targets)
        try:
            readings = await asyncio.get_running_loop().run_in_executor(None, _read_all, targets, self.sup.limiter)
        except Exception as exc:  # a failed pass counts nothing; the next one catches up (CPU is cumulative)
            log.warning("usage_sample_failed", error=repr(exc))
            return None
        now = time.monotonic()
        per_session = {}
        for sid, pid, cpu, memory, peak in readings:
            s = self.sup.sessions.get(sid)
            if s is None or s.pid != pid:
                continue  # it ended during the pass: its end counted the rest
            proc = self._processes.get(sid)
            if proc is None or proc.pid != pid:
                proc = self._processes[sid] = _Process(pid, now)
            cpu_delta = max(0.0, cpu - proc.cpu_seen)
            mib_seconds = memory / MIB * max(0.0, now - proc.since)
            proc.cpu_seen, proc.memory, proc.since = max(cpu, proc.cpu_seen), memory, now
            self._add(sid, s.tenant, peak=max(memory, peak), cpu_seconds=cpu_delta, memory_mib_seconds=mib_seconds)
            per_session[sid] = (memory, proc.cpu_seen)
        self._touched.difference_update(per_session)  # read now (a turn's batch): the next pass need not again
        return per_session

    # ---- Prometheus ----------------------------------------------------------------------------

    def metric_families(self):
        """Per-tenant counters since this server started (never a series per session)."""
        for name, (key, help_text) in _TENANT_COUNTERS.items():
            family = CounterMetricFamily(name, help_text, labels=["tenant"])
            for tenant, total in sorted(self.totals.items()):
                family.add_metric([tenant], total.get(key, 0))
            yield family
        ends = CounterMetricFamily("corral_session_ends", "Session ends by tenant and reason", labels=["tenant", "reason"])
        for (tenant, reason), n in sorted(self.ends.items()):
            ends.add_metric([tenant, reason], n)
        yield ends

    # ---- what the APIs show --------------------------------------------------------------------

    async def of_session(self, session_id: str) -> dict:
        """A session's usage (``session_id``: its key): what the store has plus what is still pending here."""
        stored = await self.sup.store.session_usage(session_id)  # a StoreError is the web layer's 503
        out = {**empty_usage(), **(stored or {})}
        out.pop("end_reasons", None)
        pending = self.pending.get(session_id)
        if pending is not None:
            for name in USAGE_COUNTERS:
                out[name] += pending.counts.get(name, 0)
            out["memory_peak_bytes"] = max(out["memory_peak_bytes"], pending.peak)
            out["last_end_reason"] = pending.last_end_reason or out.get("last_end_reason")
        return out

    async def by_tenant(self, *, tenant: str | None = None, since: float | None = None,
                        until: float | None = None) -> dict[str, dict]:
        """Per tenant, usage over the period from the store (pending usage is written first)."""
        await self.flush()
        return await self.sup.store.tenant_usage(tenant=tenant, since=since, until=until)


def _read_all(targets: list, limiter) -> list[tuple[str, int, float, int, int]]:
    """On a worker thread: (session id, pid, CPU seconds, memory bytes, the kernel's peak or 0) of each process still there."""
    out = []
    for sid, pid, spec in targets:
        try:
            fields = procfs.stat_fields(pid)
        except OSError:
            continue
        cpu = (int(fields[procfs.UTIME]) + int(fields[procfs.STIME]) + int(fields[procfs.CUTIME])
               + int(fields[procfs.CSTIME])) / _CLK_TCK
        memory, peak = int(fields[procfs.RSS]) * _PAGE, 0
        if spec and limiter is not None:
            cgroup_cpu = limiter.control_usage(spec).get("cpu", {}).get("usage_usec")
            if cgroup_cpu is not None:
                cpu = cgroup_cpu / 1e6  # the whole cgroup: orphans and unreaped children too
            used = limiter.usage(spec)
            if used is not None and used.get("current") is not None:
                memory, peak = used["current"], used.get("peak") or 0  # the cgroup's own high-water mark
        out.append((sid, pid, cpu, memory, peak))
    return out


__all__ = ["Usage", "HOUR", "FLUSH_AFTER"]
