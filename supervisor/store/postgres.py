"""PostgreSQL backend: asyncpg pool, migrations under an advisory lock at open."""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from datetime import datetime
from typing import Any, AsyncIterator
from urllib.parse import unquote, urlsplit

import asyncpg

from .base import (
    SESSION_USAGE_COLS, USAGE_COUNTERS, MessageRecord, SessionNotFound, SessionRecord, StaleEpoch, Store, StoreError,
    UsageDelta, build_stats, load_migrations, session_usage_record, tenant_sums, usage_period, usage_rows,
    usage_upserts,
)

_SESSION_COLS = ("id, tenant, agent, metadata, status, end_reason, message_count, "
                 "created_at, last_activity, ended_at, node, epoch")
_USAGE_SQL = tuple(sql.replace("{greatest}", "greatest") for sql in usage_upserts(lambda i: f"${i}"))
_USAGE_SUMS = ", ".join(f"sum({c})" for c in USAGE_COUNTERS) + ", max(memory_peak_bytes)"
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# any fixed key works; every corral node uses this one, so migrations run one node at a time
_MIGRATION_LOCK = 0x636F7272616C  # "corral"
# errors of a connection the server dropped or that lost track of its protocol state (e.g.
# InternalClientError after pg_terminate_backend, MagicStack/asyncpg#1069): never pooled again
_BROKEN = (asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)
# errors meaning "the database is unreachable or refused us", reported as StoreError (-> 503)
_DB_ERRORS = (asyncpg.PostgresError, *_BROKEN, asyncio.TimeoutError)


def describe_target(url: str) -> str:
    """host:port[/db] of a PostgreSQL URL, never its user or password."""
    parts = urlsplit(url)
    hostport = parts.netloc.rpartition("@")[2] or "localhost"
    if ":" not in hostport.rpartition("]")[2] and "," not in hostport:
        hostport += ":5432"
    db = parts.path.lstrip("/")
    return f"{hostport}/{db}" if db else hostport


def _scrub(text: str, url: str) -> str:
    """Remove the URL's password from an error text, raw or percent-decoded."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    for secret in {password, unquote(password or "")} - {None, ""}:
        text = text.replace(secret, "***")
    return text


def _ts(value: datetime | None) -> float | None:
    """timestamptz -> unix seconds."""
    return value.timestamp() if value is not None else None


def _session(row: asyncpg.Record) -> SessionRecord:
    """Row of `sessions` -> record."""
    return SessionRecord(
        id=row["id"], tenant=row["tenant"], agent=row["agent"], metadata=row["metadata"] or {},
        status=row["status"], end_reason=row["end_reason"], message_count=row["message_count"],
        created_at=_ts(row["created_at"]), last_activity=_ts(row["last_activity"]),
        ended_at=_ts(row["ended_at"]), node=row["node"], epoch=row["epoch"],
    )


def _message(row: asyncpg.Record) -> MessageRecord:
    """Row of `messages` -> record."""
    return MessageRecord(row["session_id"], row["seq"], row["role"], row["content"],
                         _ts(row["created_at"]))


async def _init_connection(conn: asyncpg.Connection) -> None:
    """jsonb <-> dict on every pooled connection."""
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")


class PostgresStore(Store):
    """PostgreSQL store shared by any number of corral nodes. Times come from the server clock."""

    backend = "postgresql"

    def __init__(self, url: str, *, schema: str | None = None, min_size: int = 1,
                 max_size: int = 10, statement_cache_size: int = 256,
                 connect_timeout: float = 5.0, command_timeout: float = 30.0,
                 application_name: str = "corral") -> None:
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise ValueError(f"bad schema name {schema!r}")
        self.url = url
        self.schema = schema
        self.target = describe_target(url)
        self.application_name = application_name
        self._pool_kwargs = dict(
            min_size=min_size, max_size=max_size,
            # 0 is needed behind pgbouncer in transaction mode
            statement_cache_size=statement_cache_size,
            timeout=connect_timeout, command_timeout=command_timeout,
            init=_init_connection,
            # application_name shows corral's connections in pg_stat_activity
            server_settings={"application_name": application_name,
                             **({"search_path": f'"{schema}"'} if schema else {})},
        )
        self._acquire_timeout = connect_timeout * 2
        self._pool: asyncpg.Pool | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the pool and apply pending migrations; StoreError on failure."""
        if self._pool is not None:
            return
        kwargs = {k: v for k, v in self._pool_kwargs.items() if v is not None}
        try:
            self._pool = await asyncpg.create_pool(self.url, **kwargs)
        except Exception as exc:  # bad DSN, refused, auth, timeout: all mean "cannot open"
            raise StoreError(f"cannot connect to PostgreSQL at {self.target}: "
                             f"{self._reason(exc)}") from None
        try:
            await self._migrate()
        except Exception as exc:
            await self.close()
            raise StoreError(f"cannot migrate PostgreSQL store at {self.target}: "
                             f"{self._reason(exc)}") from None

    async def _migrate(self) -> None:
        """Apply pending migrations in one transaction holding the advisory lock."""
        async with self._pool.acquire() as con, con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            if self.schema:
                await con.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await con.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                              "version integer PRIMARY KEY, name text NOT NULL, "
                              "applied_at timestamptz NOT NULL DEFAULT now())")
            done = {r[0] for r in await con.fetch("SELECT version FROM schema_version")}
            for mig in load_migrations("postgresql"):
                if mig.version not in done:
                    await con.execute(mig.sql)
                    await con.execute("INSERT INTO schema_version (version, name) VALUES ($1, $2)",
                                      mig.version, mig.name)

    async def close(self) -> None:
        """Close the pool, forcibly if connections do not come back in time."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=5)
        except Exception:
            pool.terminate()

    async def connect_alone(self, purpose: str) -> asyncpg.Connection:
        """A connection of its own, outside the pool, on the store's schema; StoreError if none."""
        settings = {**self._pool_kwargs["server_settings"], "application_name": f"{self.application_name} {purpose}"}
        try:
            return await asyncpg.connect(self.url, timeout=self._pool_kwargs["timeout"], server_settings=settings)
        except Exception as exc:  # bad DSN, refused, auth, timeout: all mean "cannot connect"
            raise StoreError(f"cannot connect to PostgreSQL at {self.target}: {self._reason(exc)}") from None

    # ---- plumbing --------------------------------------------------------------------------

    def _reason(self, exc: BaseException) -> str:
        """Error text without the password, never empty."""
        return _scrub(str(exc) or type(exc).__name__, self.url)

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; driver/network errors become StoreError."""
        if self._pool is None:
            raise StoreError(f"PostgreSQL store at {self.target} is not open")
        try:
            async with self._pool.acquire(timeout=self._acquire_timeout) as con:
                try:
                    yield con
                except _BROKEN:
                    con.terminate()  # the pool opens a fresh one in its place
                    raise
        except _DB_ERRORS as exc:
            raise StoreError(f"PostgreSQL at {self.target}: {self._reason(exc)}") from None

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Rows of one statement."""
        async with self._conn() as con:
            return await con.fetch(sql, *args)

    async def _execute(self, sql: str, *args: Any) -> str:
        """Status tag of one statement (e.g. 'DELETE 3')."""
        async with self._conn() as con:
            return await con.execute(sql, *args)

    # ---- sessions --------------------------------------------------------------------------

    async def upsert_session(self, session_id: str, *, tenant: str, agent: str,
                             metadata: dict[str, Any] | None = None,
                             status: str = "starting", node: str | None = None) -> SessionRecord:
        """Create, or bring back an existing session (status and node set, end cleared)."""
        rows = await self._fetch(
            "INSERT INTO sessions (id, tenant, agent, metadata, status, node, created_at, last_activity) "
            "VALUES ($1, $2, $3, $4, $5, $6, now(), now()) "
            "ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, node = EXCLUDED.node, "
            "end_reason = NULL, ended_at = NULL "
            f"RETURNING {_SESSION_COLS}",
            session_id, tenant, agent, metadata or {}, status, node)
        return _session(rows[0])

    async def get_session(self, session_id: str) -> SessionRecord | None:
        """The session, or None."""
        rows = await self._fetch(f"SELECT {_SESSION_COLS} FROM sessions WHERE id = $1", session_id)
        return _session(rows[0]) if rows else None

    async def set_status(self, session_id: str, status: str, *, end_reason: str | None = None,
                         ended: bool = False, epoch: int | None = None) -> None:
        """Set status; ended stamps ended_at/end_reason, otherwise both are cleared (fenced by epoch)."""
        await self._execute(
            "UPDATE sessions SET status = $2, end_reason = $3, "
            "ended_at = CASE WHEN $4 THEN now() END "
            "WHERE id = $1 AND ($5::bigint IS NULL OR epoch = $5)",
            session_id, status, end_reason if ended else None, ended, epoch)

    async def delete_session(self, session_id: str) -> bool:
        """Remove the session; its messages go by ON DELETE CASCADE."""
        tag = await self._execute("DELETE FROM sessions WHERE id = $1", session_id)
        return tag.split()[-1] != "0"

    async def tenants_of(self, session_id: str) -> list[str]:
        """The tenants that have a session with this id (a key is the id, or tenant/id)."""
        rows = await self._fetch("SELECT DISTINCT tenant FROM sessions WHERE id = $1 OR id = tenant || '/' || $1",
                                 session_id)
        return sorted(r[0] for r in rows)

    async def end_orphans(self, node: str | None, *, status: str, end_reason: str) -> int:
        """End the sessions ``node`` (None: any node) left unended."""
        tag = await self._execute(
            "UPDATE sessions SET status = $2, end_reason = $3, ended_at = now() "
            "WHERE ($1::text IS NULL OR node = $1) AND ended_at IS NULL", node, status, end_reason)
        return int(tag.split()[-1])

    async def purge_ended(self, older_than: float) -> int:
        """Delete sessions whose ended_at is before now - older_than."""
        tag = await self._execute(
            "DELETE FROM sessions WHERE ended_at < now() - make_interval(secs => $1)",
            float(older_than))
        return int(tag.split()[-1])

    async def list_sessions(self, *, tenant: str | None = None, status: str | None = None,
                            limit: int = 100, offset: int = 0) -> list[SessionRecord]:
        """Sessions newest first, filtered by tenant/status."""
        rows = await self._fetch(
            f"SELECT {_SESSION_COLS} FROM sessions "
            "WHERE ($1::text IS NULL OR tenant = $1) AND ($2::text IS NULL OR status = $2) "
            "ORDER BY created_at DESC, id LIMIT $3 OFFSET $4",
            tenant, status, int(limit), int(offset))
        return [_session(r) for r in rows]

    async def stats(self) -> dict[str, Any]:
        """Totals and per-tenant numbers in one grouped scan."""
        rows = await self._fetch(
            "SELECT tenant, count(*), count(*) FILTER (WHERE ended_at IS NULL), "
            "coalesce(sum(message_count), 0) FROM sessions GROUP BY tenant ORDER BY tenant")
        return build_stats([tuple(r) for r in rows])

    # ---- usage -----------------------------------------------------------------------------

    async def add_usage(self, deltas: list[UsageDelta]) -> None:
        """One transaction for the whole batch (three executemany, the node's clock stamping it)."""
        rows = usage_rows(deltas, time.time())
        async with self._conn() as con, con.transaction():
            for sql, args in zip(_USAGE_SQL, rows):
                if args:
                    await con.executemany(sql, args)

    async def session_usage(self, session_id: str) -> dict[str, Any] | None:
        """The session's sums, or None."""
        rows = await self._fetch(f"SELECT {SESSION_USAGE_COLS} FROM session_usage WHERE session_id = $1", session_id)
        return session_usage_record(rows[0]) if rows else None

    async def tenant_usage(self, *, tenant: str | None = None, since: float | None = None,
                           until: float | None = None) -> dict[str, dict[str, Any]]:
        """Per tenant, the hours of the period summed (two grouped scans)."""
        low, high = usage_period(since, until)
        where = "WHERE ($1::text IS NULL OR tenant = $1) AND hour >= $2 AND hour < $3"
        sums = await self._fetch(f"SELECT tenant, {_USAGE_SUMS} FROM tenant_usage {where} GROUP BY tenant",
                                 tenant, low, high)
        ends = await self._fetch(f"SELECT tenant, reason, sum(count) FROM tenant_usage_ends {where} "
                                 "GROUP BY tenant, reason", tenant, low, high)
        return tenant_sums([tuple(r) for r in sums], [tuple(r) for r in ends])

    # ---- messages --------------------------------------------------------------------------

    async def append_message(self, session_id: str, role: str, content: str, *,
                             epoch: int | None = None) -> MessageRecord:
        """Bump message_count (row lock serialises appenders) and insert with it as seq.

        One statement, so one round trip: the UPDATE and the INSERT of the CTE commit together.
        With ``epoch`` the UPDATE matches only while the session is still claimed at that epoch,
        and a claim takes the same row lock, so a stale owner's append can never land.
        """
        async with self._conn() as con:
            row = await con.fetchrow(
                "WITH bumped AS (UPDATE sessions SET message_count = message_count + 1, "
                "last_activity = clock_timestamp() WHERE id = $1 "
                "AND ($4::bigint IS NULL OR epoch = $4) "
                "RETURNING id, message_count, last_activity) "
                "INSERT INTO messages (session_id, seq, role, content, created_at) "
                "SELECT id, message_count, $2, $3, last_activity FROM bumped "
                "RETURNING seq, created_at", session_id, role, content, epoch)
            if row is None and epoch is not None:
                if await con.fetchval("SELECT 1 FROM sessions WHERE id = $1", session_id):
                    raise StaleEpoch(session_id, epoch)
        if row is None:
            raise SessionNotFound(session_id)
        return MessageRecord(session_id, row["seq"], role, content, row["created_at"].timestamp())

    async def history(self, session_id: str, *, limit: int | None = None) -> list[MessageRecord]:
        """Messages by seq; the last `limit` when given."""
        cols = "SELECT session_id, seq, role, content, created_at FROM messages WHERE session_id = $1"
        if limit is None:
            rows = await self._fetch(cols + " ORDER BY seq", session_id)
            return [_message(r) for r in rows]
        rows = await self._fetch(cols + " ORDER BY seq DESC LIMIT $2", session_id, max(int(limit), 0))
        return [_message(r) for r in reversed(rows)]
