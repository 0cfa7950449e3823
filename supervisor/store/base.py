"""Store interface, records and errors shared by every backend."""
from __future__ import annotations

import abc
import re
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from corral.supervisor.node import NoClaim
from corral.supervisor.session_keys import id_of

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# The channel a claim notifies on a store several nodes share, payload "<session key> <node id>" (neither holds a space)
ACTIVATIONS = "corral_activations"
_MIGRATION_NAME = re.compile(r"^(\d{4})_[A-Za-z0-9_]+\.sql$")


class StoreError(Exception):
    """A store that cannot be opened or reached; message says the cause (file, host, reason)."""


class StaleEpoch(Exception):
    """A write carrying an epoch older than the session's: another node has claimed it (fencing)."""

    def __str__(self) -> str:
        return f"session {self.args[0]!r} was claimed by another node (epoch {self.args[1]} is stale)"


class UnknownSession(KeyError):
    """append_message on a session id the store does not hold."""

    def __str__(self) -> str:
        return f"unknown session {self.args[0]!r}"


@dataclass
class SessionRecord:
    """One row of `sessions`; times are unix seconds."""

    id: str
    tenant: str
    agent: str
    metadata: dict[str, Any] = field(default_factory=dict)
    status: str = "starting"
    end_reason: str | None = None
    message_count: int = 0
    created_at: float = 0.0
    last_activity: float = 0.0
    ended_at: float | None = None
    node: str | None = None  # the server that ran its process last (in a cluster: its owner)
    epoch: int = 0  # grows by one on every claim (cluster fencing token)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (metadata is copied)."""
        return asdict(self)


@dataclass
class MessageRecord:
    """One row of `messages`; seq is 1, 2, 3... within its session (``session_id``: its key, session_keys.py)."""

    session_id: str
    seq: int
    role: str
    content: str
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (built by hand: asdict deep-copies, and this runs twice per turn)."""
        return {"session_id": id_of(self.session_id), "seq": self.seq, "role": self.role,
                "content": self.content, "created_at": self.created_at}


@dataclass
class Placement:
    """A session as the cluster directory sees it: its record, and its owner when another live node has it."""

    record: SessionRecord | None
    owner_url: str | None = None
    owner: str | None = None


@dataclass
class NodeRecord:
    """One row of `nodes` (a member of a cluster), with its lease's age and the live sessions it owns."""

    id: str
    url: str
    alive: bool
    started_at: float  # unix seconds, as the other times
    heartbeat_at: float
    expires_at: float
    lease_age: float  # seconds since its last heartbeat
    sessions_owned: int
    info: dict[str, Any] = field(default_factory=dict)  # what the node reports of itself


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    sql: str

    def statements(self) -> list[str]:
        """Split into single statements (sqlite3 cannot run a script inside our transaction)."""
        out, buf = [], ""
        for line in self.sql.splitlines(keepends=True):
            buf += line
            # complete_statement understands quotes and CREATE TRIGGER ... END bodies
            if sqlite3.complete_statement(buf):
                if buf.strip().strip(";").strip():
                    out.append(buf.strip())
                buf = ""
        if buf.strip():
            out.append(buf.strip())
        return out


def load_migrations(dialect: str) -> list[Migration]:
    """The numbered migrations of one dialect, in order."""
    found = []
    for path in sorted((MIGRATIONS_DIR / dialect).glob("*.sql")):
        m = _MIGRATION_NAME.match(path.name)
        if m:
            found.append(Migration(int(m.group(1)), path.stem, path.read_text("utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise StoreError(f"duplicate migration numbers in {MIGRATIONS_DIR / dialect}")
    return found


def average(messages: int, sessions: int) -> float:
    """Messages per session, 0.0 for no sessions."""
    return messages / sessions if sessions else 0.0


def build_stats(rows: list[tuple[str, int, int, int]]) -> dict[str, Any]:
    """Stats dict from (tenant, sessions_total, sessions_active, messages_total) rows."""
    by_tenant = {}
    for tenant, total, active, messages in rows:
        by_tenant[tenant] = {
            "sessions_total": int(total),
            "sessions_active": int(active),
            "messages_total": int(messages),
            "average_messages_per_session": average(int(messages), int(total)),
        }
    total = sum(t["sessions_total"] for t in by_tenant.values())
    messages = sum(t["messages_total"] for t in by_tenant.values())
    return {
        "sessions_total": total,
        "sessions_active": sum(t["sessions_active"] for t in by_tenant.values()),
        "messages_total": messages,
        "average_messages_per_session": average(messages, total),
        "by_tenant": by_tenant,
    }


# What usage adds up, per session and per tenant-hour (docs/operations.md#usage); the peak is a maximum.
USAGE_COUNTERS = ("starts", "turns", "messages_in", "messages_out", "bytes_in", "bytes_out", "cpu_seconds",
                  "memory_mib_seconds", "egress_bytes", "egress_requests", "ends")
_FLOAT_COUNTERS = frozenset({"cpu_seconds", "memory_mib_seconds"})
HOUR = 3600.0


@dataclass
class UsageDelta:
    """What one session used since the last write: added to its row and to its tenant's hour on ``node``."""

    session_id: str
    tenant: str
    node: str
    hour: float  # unix seconds of the hour's start the amounts fall in
    counts: dict[str, float] = field(default_factory=dict)  # USAGE_COUNTERS name -> amount to add
    memory_peak_bytes: int = 0
    end_reasons: dict[str, int] = field(default_factory=dict)  # reason -> ends with it
    last_end_reason: str | None = None

    def row(self) -> tuple:
        """The counters in USAGE_COUNTERS order, then the peak."""
        return (*(self.counts.get(name, 0) for name in USAGE_COUNTERS), int(self.memory_peak_bytes))


def hour_of(when: float) -> float:
    """The start of the hour ``when`` falls in."""
    return when - when % HOUR


def usage_upserts(mark) -> tuple[str, str, str]:
    """(session, tenant-hour, end-reason) upserts adding a UsageDelta; ``mark(i)`` is the i-th placeholder.

    Column order: session_id/tenant, tenant/hour, node (+ reason), counters, peak (+ last_end_reason, updated_at).
    """
    cols = ", ".join(USAGE_COUNTERS)
    add = lambda table: ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in USAGE_COUNTERS)  # noqa: E731
    n = len(USAGE_COUNTERS)
    marks = lambda first, count: ", ".join(mark(i) for i in range(first, first + count))  # noqa: E731
    session = (f"INSERT INTO session_usage (session_id, tenant, node, {cols}, memory_peak_bytes, last_end_reason, "
               f"updated_at) VALUES ({marks(1, n + 6)}) ON CONFLICT (session_id) DO UPDATE SET "
               f"{add('session_usage')}, memory_peak_bytes = {{greatest}}(session_usage.memory_peak_bytes, "
               "excluded.memory_peak_bytes), node = excluded.node, updated_at = excluded.updated_at, "
               "last_end_reason = coalesce(excluded.last_end_reason, session_usage.last_end_reason)")
    tenant = (f"INSERT INTO tenant_usage (tenant, hour, node, {cols}, memory_peak_bytes) VALUES ({marks(1, n + 4)}) "
              f"ON CONFLICT (tenant, hour, node) DO UPDATE SET {add('tenant_usage')}, memory_peak_bytes = "
              "{greatest}(tenant_usage.memory_peak_bytes, excluded.memory_peak_bytes)")
    ends = (f"INSERT INTO tenant_usage_ends (tenant, hour, node, reason, count) VALUES ({marks(1, 5)}) "
            "ON CONFLICT (tenant, hour, node, reason) DO UPDATE SET count = tenant_usage_ends.count + excluded.count")
    return session, tenant, ends


def usage_rows(deltas: list[UsageDelta], now: float) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """The parameters of usage_upserts' three statements for a batch of deltas (tenant-hours merged)."""
    sessions, tenants, ends = [], {}, {}
    for d in deltas:
        row = d.row()
        sessions.append((d.session_id, d.tenant, d.node, *row, d.last_end_reason, now))
        key = (d.tenant, d.hour, d.node)
        kept = tenants.get(key)
        tenants[key] = row if kept is None else (*(a + b for a, b in zip(kept[:-1], row[:-1])), max(kept[-1], row[-1]))
        for reason, count in d.end_reasons.items():
            ends[(*key, reason)] = ends.get((*key, reason), 0) + count
    return (sessions, [(*key, *row) for key, row in tenants.items()],
            [(*key, count) for key, count in ends.items()])


def usage_dict(values, peak, end_reasons: dict | None = None) -> dict[str, Any]:
    """A usage record as the APIs show it, from the counters in USAGE_COUNTERS order and the peak."""
    values = list(values) + [0] * (len(USAGE_COUNTERS) - len(values))
    out = {name: (float(v or 0) if name in _FLOAT_COUNTERS else int(v or 0)) for name, v in zip(USAGE_COUNTERS, values)}
    out["memory_peak_bytes"] = int(peak or 0)
    if end_reasons is not None:
        out["end_reasons"] = dict(sorted(end_reasons.items()))
    return out


def tenant_sums(sums: list[tuple], ends: list[tuple]) -> dict[str, dict[str, Any]]:
    """(tenant, counters..., peak) and (tenant, reason, count) rows -> usage per tenant."""
    by_reason: dict[str, dict[str, int]] = {}
    for tenant, reason, count in ends:
        by_reason.setdefault(tenant, {})[reason] = int(count)
    return {row[0]: usage_dict(row[1:-1], row[-1], by_reason.get(row[0], {})) for row in sorted(sums)}


SESSION_USAGE_COLS = ", ".join(USAGE_COUNTERS) + ", memory_peak_bytes, tenant, node, last_end_reason, updated_at"


def session_usage_record(row) -> dict[str, Any]:
    """A session_usage row (SESSION_USAGE_COLS) as the APIs show it."""
    values, n = tuple(row), len(USAGE_COUNTERS)
    return {**usage_dict(values[:n], values[n]),
            **dict(zip(("tenant", "node", "last_end_reason", "updated_at"), values[n + 1:]))}


def empty_usage() -> dict[str, Any]:
    """A usage record with nothing used."""
    return usage_dict((), 0, {})


def usage_period(since: float | None, until: float | None) -> tuple[float, float]:
    """The hour bounds a period covers: from the hour ``since`` falls in to before ``until``."""
    return (hour_of(since) if since is not None else float("-inf"), until if until is not None else float("inf"))


class Store(abc.ABC):
    """Durable session and message storage; every method is safe to call concurrently."""

    backend: str = ""

    async def __aenter__(self) -> "Store":
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply pending migrations; StoreError on failure."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; safe to call twice."""

    @abc.abstractmethod
    async def upsert_session(
        self, session_id: str, *, tenant: str, agent: str,
        metadata: dict[str, Any] | None = None, status: str = "starting", node: str | None = None,
    ) -> SessionRecord:
        """Create the session, or set status and node and clear ended_at/end_reason of an existing one."""

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> SessionRecord | None:
        """The session, or None."""

    @abc.abstractmethod
    async def set_status(
        self, session_id: str, status: str, *, end_reason: str | None = None, ended: bool = False,
        epoch: int | None = None,
    ) -> None:
        """Set status; ended=True stamps ended_at=now and end_reason, ended=False clears both.

        ``epoch`` (the writer's claim, see docs/cluster.md) makes the write a no-op for a session
        claimed since; single-node backends ignore it.
        """

    @abc.abstractmethod
    async def append_message(self, session_id: str, role: str, content: str, *,
                             epoch: int | None = None) -> MessageRecord:
        """Append with the next seq, committed before returning; UnknownSession if absent.

        With ``epoch``, StaleEpoch if the session has been claimed since (single-node backends ignore it).
        """

    @abc.abstractmethod
    async def history(self, session_id: str, *, limit: int | None = None) -> list[MessageRecord]:
        """Messages ordered by seq; limit keeps the last N."""

    @abc.abstractmethod
    async def delete_session(self, session_id: str) -> bool:
        """Remove the session and its messages; False if it was not there."""

    @abc.abstractmethod
    async def tenants_of(self, session_id: str) -> list[str]:
        """The tenants that have a session with this id (rows are keyed by tenant and id: session_keys.py)."""

    @abc.abstractmethod
    async def end_orphans(self, node: str | None, *, status: str, end_reason: str) -> int:
        """End every session of ``node`` (None: of any node) not ended yet (its server died with them); how many."""

    @abc.abstractmethod
    async def purge_ended(self, older_than: float) -> int:
        """Delete sessions ended more than older_than seconds ago; returns how many."""

    @abc.abstractmethod
    async def list_sessions(
        self, *, tenant: str | None = None, status: str | None = None,
        limit: int = 100, offset: int = 0,
    ) -> list[SessionRecord]:
        """Sessions newest first (created_at desc, id), optionally filtered."""

    @abc.abstractmethod
    async def add_usage(self, deltas: list[UsageDelta]) -> None:
        """Add a batch of usage deltas to their sessions' rows and their tenants' hours, in one transaction."""

    @abc.abstractmethod
    async def session_usage(self, session_id: str) -> dict[str, Any] | None:
        """One session's usage (usage_dict plus tenant, node, last_end_reason, updated_at), or None."""

    @abc.abstractmethod
    async def tenant_usage(self, *, tenant: str | None = None, since: float | None = None,
                           until: float | None = None) -> dict[str, dict[str, Any]]:
        """Per tenant, usage summed over the hours from the one ``since`` falls in to before ``until``."""

    @abc.abstractmethod
    async def stats(self) -> dict[str, Any]:
        """Totals, active, average messages per session, and the same per tenant."""

    # ---- what the node identity and the cluster ask (supervisor/node.py, supervisor/cluster/) ----
    # A store several nodes share (PostgreSQL) overrides these; a single node's store (SQLite,
    # memory) claims a session by upsert, fences nothing and has no other nodes.

    shared = False  # whether several nodes share this store (a cluster: writes are fenced by epoch)

    async def hold_identity(self, node: str) -> NoClaim:
        """Hold ``node``'s identity in this store (not yet opened) for this process's life; NodeTaken if held."""
        return NoClaim(node)

    async def claim_session(self, session_id: str, *, tenant: str, agent: str, metadata: dict[str, Any],
                            node: str) -> SessionRecord | None:
        """Make ``node`` the session's owner (creating it if new); None when another live node owns it."""
        return await self.upsert_session(session_id, tenant=tenant, agent=agent, metadata=metadata, node=node)

    async def placement(self, session_id: str, node: str) -> Placement:
        """The stored session and, when a live node other than ``node`` owns it, that node."""
        return Placement(await self.get_session(session_id))

    async def stale_claims(self, claims: dict[str, int], node: str) -> list[str]:
        """Of ``node``'s session -> epoch claims, the ones no longer its own (another node claimed them)."""
        return []

    async def node_records(self) -> list[NodeRecord]:
        """The cluster's nodes, oldest first (none in a store no other node shares)."""
        return []

    async def join_node(self, node_id: str, *, url: str, lease: float, info: dict[str, Any]) -> None:
        """Insert this node's row, alive for ``lease`` seconds."""
        raise NotImplementedError(f"a {self.backend} store has no cluster membership")

    async def renew_node(self, node_id: str, *, url: str, lease: float, info: dict[str, Any]) -> bool:
        """Push this node's lease forward; True if the old one still had a margin (no claim could be lost)."""
        raise NotImplementedError(f"a {self.backend} store has no cluster membership")

    async def sweep_dead_nodes(self, lease: float, *, status: str, end_reason: str) -> int:
        """End the sessions of nodes dead for over ``lease`` seconds and delete those nodes; how many sessions."""
        raise NotImplementedError(f"a {self.backend} store has no cluster membership")

    async def leave_node(self, node_id: str) -> None:
        """Delete this node's row: its sessions are free for others at once."""
        raise NotImplementedError(f"a {self.backend} store has no cluster membership")

    async def take_over_previous_runs(self, node_id: str, *, url: str, name: str, status: str, end_reason: str) -> int:
        """End the rows of this server's earlier runs (same ``name`` and ``url``) and their sessions; how many."""
        raise NotImplementedError(f"a {self.backend} store has no cluster membership")
