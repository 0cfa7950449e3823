"""Store interface, records and errors shared by every backend."""
from __future__ import annotations

import abc
import re
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from corral.supervisor.session_keys import id_of

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_MIGRATION_NAME = re.compile(r"^(\d{4})_[A-Za-z0-9_]+\.sql$")


class StoreError(Exception):
    """A store that cannot be opened or reached; message says the cause (file, host, reason)."""


class StaleEpoch(Exception):
    """A write carrying an epoch older than the session's: another node has claimed it (fencing)."""

    def __str__(self) -> str:
        return f"session {self.args[0]!r} was claimed by another node (epoch {self.args[1]} is stale)"


class SessionNotFound(KeyError):
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
        """Append with the next seq, committed before returning; SessionNotFound if absent.

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
    async def stats(self) -> dict[str, Any]:
        """Totals, active, average messages per session, and the same per tenant."""
