"""The dashboard's plots: bounded in-memory rings of one node's figures, fed by the usage sampler.

One ``sample`` per ``--usage-interval`` (supervisor/usage.py's timer, never a timer per session)
appends a point to the node's ring (live sessions, agent memory, CPU in cores, turns a second,
ends by reason since the last point), which keeps the last hour, and a point to each live
session's own ring. A session's ring holds at most ``SESSION_POINTS`` points over its whole life:
when it is full, neighbouring points are merged in pairs (so its step doubles), so a long session
costs no more than a short one. Rings of sessions that ended stay for the last ``RECENT_ENDED``
of them, so a row of the dashboard can still open them.

Memory: a node point is ~0.3 KB (360 at the default 10 s: ~110 KB); a session ring is three
arrays of ``SESSION_POINTS`` (8 + 4 + 4 bytes) plus ~0.3 KB of objects and its dict entry, ~1.3 KB:
~13 MB at 10,000 live sessions (bench/timeline_memory.py).
"""

import math
import time
from array import array
from collections import Counter, OrderedDict, deque

SESSION_POINTS = 64
RECENT_ENDED = 256
WINDOW = 3600.0  # seconds of the node's ring
MIB = 1024 * 1024


class SessionSeries:
    """One session's memory (MiB) and CPU (cores) over its life, at most SESSION_POINTS points."""

    __slots__ = ("times", "memory", "cpu", "stride", "sums", "summed", "cpu_seen")

    def __init__(self):
        self.times, self.memory, self.cpu = array("d"), array("f"), array("f")
        self.cpu_seen = 0.0  # the CPU seconds of its process at the last sample
        self.stride = 1  # samples per point; doubles each time the ring fills
        self.sums, self.summed = [0.0, 0.0, 0.0], 0  # the point being made

    def add(self, when: float, memory_mib: float, cores: float) -> None:
        """Add a sample; every ``stride`` samples make one point (their mean), and a full ring merges pairs."""
        self.sums = [self.sums[0] + when, self.sums[1] + memory_mib, self.sums[2] + cores]
        self.summed += 1
        if self.summed < self.stride:
            return
        if len(self.times) >= SESSION_POINTS:
            for values in (self.times, self.memory, self.cpu):
                values[:] = array(values.typecode, [(values[i] + values[i + 1]) / 2 for i in range(0, len(values) - 1, 2)])
            self.stride *= 2
        for values, total in zip((self.times, self.memory, self.cpu), self.sums):
            values.append(total / self.summed)
        self.sums, self.summed = [0.0, 0.0, 0.0], 0

    def to_dict(self) -> dict:
        """Columns for uPlot: times, memory MiB, CPU cores."""
        return {"t": list(self.times), "memory_mib": [round(v, 3) for v in self.memory],
                "cpu_cores": [round(v, 4) for v in self.cpu]}


class Timeline:
    """The node's last hour and each session's life, as rings."""

    def __init__(self, interval: float):
        self.interval = interval
        self.points: deque = deque(maxlen=max(2, math.ceil(WINDOW / interval)))
        self.sessions: dict[str, SessionSeries] = {}
        self.ended: OrderedDict[str, SessionSeries] = OrderedDict()
        self._turns = 0
        self._ends: Counter = Counter()
        self._last = time.time()

    def count_turn(self) -> None:
        """One more turn ended since the last point."""
        self._turns += 1

    def count_end(self, reason: str) -> None:
        """One more session ended since the last point."""
        self._ends[reason] += 1

    def sample(self, when: float, live: int, per_session: dict[str, tuple[int, float]]) -> None:
        """One point for the node and for each sampled session ((memory bytes, CPU seconds of its process so far))."""
        elapsed = max(when - self._last, 1e-3)
        self._last = when
        used = {}
        for sid, (_, cpu_total) in per_session.items():
            series = self.sessions.get(sid)
            if series is None:
                series = self.sessions[sid] = self.ended.pop(sid, None) or SessionSeries()
            # a new process of the session starts from 0: what it has used is all new
            used[sid] = cpu_total - series.cpu_seen if cpu_total >= series.cpu_seen else cpu_total
            series.cpu_seen = cpu_total
        cpu = sum(used.values())
        self.points.append({
            "t": when, "live": live, "memory_mib": round(sum(m for m, _ in per_session.values()) / MIB, 3),
            "cpu_cores": round(cpu / elapsed, 4), "turns_per_s": round(self._turns / elapsed, 3),
            "ends": dict(self._ends),
        })
        self._turns, self._ends = 0, Counter()
        for sid, (memory, _) in per_session.items():
            self.sessions[sid].add(when, memory / MIB, used[sid] / elapsed)
        for sid in [sid for sid in self.sessions if sid not in per_session]:
            self._retire(sid)

    def _retire(self, sid: str) -> None:
        """Keep a gone session's ring among the last RECENT_ENDED."""
        self.ended[sid] = self.sessions.pop(sid)
        while len(self.ended) > RECENT_ENDED:
            self.ended.popitem(last=False)

    def node(self, since: float | None = None) -> dict:
        """The node's points (after ``since``) as columns for uPlot."""
        points = [p for p in self.points if since is None or p["t"] > since]
        reasons = sorted({r for p in points for r in p["ends"]})
        return {
            "interval": self.interval,
            "t": [p["t"] for p in points],
            "live": [p["live"] for p in points],
            "memory_mib": [p["memory_mib"] for p in points],
            "cpu_cores": [p["cpu_cores"] for p in points],
            "turns_per_s": [p["turns_per_s"] for p in points],
            "ends": {r: [p["ends"].get(r, 0) for p in points] for r in reasons},
        }

    def session(self, sid: str) -> dict | None:
        """One session's ring as columns, or None if this node has none."""
        series = self.sessions.get(sid) or self.ended.get(sid)
        return series.to_dict() if series is not None else None
