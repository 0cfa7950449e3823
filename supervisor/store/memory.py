"""In-process store: no durability; the "no store" baseline for benchmarks, and tests."""
from __future__ import annotations

import copy
import time
from typing import Any

from corral.supervisor.session_keys import session_key

from .base import (
    USAGE_COUNTERS, MessageRecord, SessionRecord, Store, UnknownSession, UsageDelta, build_stats, usage_dict,
    usage_period, usage_rows,
)


class MemoryStore(Store):
    """Dicts in this process; every method finishes without awaiting, so no locks are needed."""

    backend = "memory"

    def __init__(self) -> None:
        self._sessions: dict[str, SessionRecord] = {}
        # Messages as plain tuples of (session_id, seq, role, content, created_at): the cycle
        # collector stops tracking a tuple of strings and numbers, so a store holding many
        # messages does not make every full collection longer (records stay tracked).
        self._messages: dict[str, list[tuple]] = {}
        # usage: session id -> [tenant, node, counters + peak (list), last_end_reason, updated_at];
        # (tenant, hour, node) -> counters + peak; (tenant, hour, node, reason) -> ends
        self._session_usage: dict[str, list] = {}
        self._tenant_usage: dict[tuple, list] = {}
        self._tenant_ends: dict[tuple, int] = {}

    async def open(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to release; data stays for a reopen in the same process."""

    async def upsert_session(self, session_id: str, *, tenant: str, agent: str,
                             metadata: dict[str, Any] | None = None,
                             status: str = "starting", node: str | None = None) -> SessionRecord:
        """Create, or bring back an existing session (status and node set, end cleared)."""
        rec = self._sessions.get(session_id)
        if rec is None:
            now = time.time()
            rec = SessionRecord(session_id, tenant, agent, copy.deepcopy(metadata or {}),
                                status, None, 0, now, now, None, node)
            self._sessions[session_id] = rec
            self._messages[session_id] = []
        else:
            rec.status, rec.end_reason, rec.ended_at, rec.node = status, None, None, node
        return copy.deepcopy(rec)  # callers must not mutate our copy

    async def get_session(self, session_id: str) -> SessionRecord | None:
        """A copy of the session, or None."""
        rec = self._sessions.get(session_id)
        return copy.deepcopy(rec) if rec else None

    async def set_status(self, session_id: str, status: str, *, end_reason: str | None = None,
                         ended: bool = False, epoch: int | None = None) -> None:
        """Set status; ended stamps ended_at/end_reason, otherwise both are cleared."""
        rec = self._sessions.get(session_id)
        if rec is not None:
            rec.status = status
            rec.end_reason = end_reason if ended else None
            rec.ended_at = time.time() if ended else None

    async def append_message(self, session_id: str, role: str, content: str, *,
                             epoch: int | None = None) -> MessageRecord:
        """Append with the next seq."""
        rec = self._sessions.get(session_id)
        if rec is None:
            raise UnknownSession(session_id)
        now = time.time()
        rec.message_count += 1
        rec.last_activity = now
        row = (session_id, rec.message_count, role, content, now)
        self._messages[session_id].append(row)
        return MessageRecord(*row)

    async def history(self, session_id: str, *, limit: int | None = None) -> list[MessageRecord]:
        """Messages by seq; the last `limit` when given."""
        msgs = self._messages.get(session_id, [])
        if limit is not None:
            msgs = msgs[-limit:] if limit > 0 else []
        return [MessageRecord(*m) for m in msgs]

    async def delete_session(self, session_id: str) -> bool:
        """Remove the session and its messages."""
        self._messages.pop(session_id, None)
        return self._sessions.pop(session_id, None) is not None

    async def tenants_of(self, session_id: str) -> list[str]:
        """The tenants that have a session with this id."""
        return sorted({r.tenant for key, r in self._sessions.items() if key == session_key(r.tenant, session_id)})

    async def end_orphans(self, node: str | None, *, status: str, end_reason: str) -> int:
        """End the sessions ``node`` (None: any node) left unended."""
        orphans = [r for r in self._sessions.values() if node in (None, r.node) and r.ended_at is None]
        for rec in orphans:
            rec.status, rec.end_reason, rec.ended_at = status, end_reason, time.time()
        return len(orphans)

    async def purge_ended(self, older_than: float) -> int:
        """Delete sessions whose ended_at is before now - older_than."""
        cutoff = time.time() - older_than
        old = [sid for sid, r in self._sessions.items()
               if r.ended_at is not None and r.ended_at < cutoff]
        for sid in old:
            await self.delete_session(sid)
        return len(old)

    async def list_sessions(self, *, tenant: str | None = None, status: str | None = None,
                            limit: int = 100, offset: int = 0) -> list[SessionRecord]:
        """Sessions newest first, filtered by tenant/status."""
        recs = [r for r in self._sessions.values()
                if (tenant is None or r.tenant == tenant) and (status is None or r.status == status)]
        recs.sort(key=lambda r: r.id)
        recs.sort(key=lambda r: r.created_at, reverse=True)  # stable: ties keep id order
        return [copy.deepcopy(r) for r in recs[offset:offset + limit]]

    async def add_usage(self, deltas: list[UsageDelta]) -> None:
        """Add each delta to its session's and its tenant-hour's sums."""
        sessions, tenants, ends = usage_rows(deltas, time.time())
        for session_id, tenant, node, *row, last_end, now in sessions:
            kept = self._session_usage.setdefault(session_id, [tenant, node, [0] * len(row), None, now])
            kept[1], kept[2], kept[3], kept[4] = node, _added(kept[2], row), last_end or kept[3], now
        for tenant, hour, node, *row in tenants:
            key = (tenant, hour, node)
            self._tenant_usage[key] = _added(self._tenant_usage.get(key, [0] * len(row)), row)
        for *key, count in ends:
            self._tenant_ends[tuple(key)] = self._tenant_ends.get(tuple(key), 0) + count

    async def session_usage(self, session_id: str) -> dict[str, Any] | None:
        """The session's sums, or None."""
        kept = self._session_usage.get(session_id)
        if kept is None:
            return None
        tenant, node, row, last_end, updated = kept
        return {**usage_dict(row[:-1], row[-1]), "tenant": tenant, "node": node,
                "last_end_reason": last_end, "updated_at": updated}

    async def tenant_usage(self, *, tenant: str | None = None, since: float | None = None,
                           until: float | None = None) -> dict[str, dict[str, Any]]:
        """Per tenant, the hours of the period summed."""
        low, high = usage_period(since, until)
        within = lambda key: (tenant is None or key[0] == tenant) and low <= key[1] < high  # noqa: E731
        sums: dict[str, list] = {}
        for key, row in self._tenant_usage.items():
            if within(key):
                sums[key[0]] = _added(sums.get(key[0], [0] * len(row)), row)
        ends: dict[str, dict[str, int]] = {}
        for key, count in self._tenant_ends.items():
            if within(key):
                by_reason = ends.setdefault(key[0], {})
                by_reason[key[3]] = by_reason.get(key[3], 0) + count
        return {t: usage_dict(row[:-1], row[-1], ends.get(t, {})) for t, row in sorted(sums.items())}

    async def stats(self) -> dict[str, Any]:
        """Totals and per-tenant numbers."""
        groups: dict[str, list[int]] = {}
        for r in self._sessions.values():
            g = groups.setdefault(r.tenant, [0, 0, 0])
            g[0] += 1
            g[1] += r.ended_at is None
            g[2] += r.message_count
        return build_stats([(t, *g) for t, g in sorted(groups.items())])


def _added(kept: list, row) -> list:
    """Counters added, the last item (the peak) the larger of the two."""
    n = len(USAGE_COUNTERS)
    return [a + b for a, b in zip(kept[:n], row[:n])] + [max(kept[n], row[n])]
