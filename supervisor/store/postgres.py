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

from corral.supervisor.node import AdvisoryClaim

from .base import (
    ACTIVATIONS, SESSION_USAGE_COLS, USAGE_COUNTERS, MessageRecord, NodeRecord, Placement, SessionRecord, StaleEpoch,
    Store, StoreError, UnknownSession, UsageDelta, build_stats, load_migrations, session_usage_record, tenant_sums,
    usage_period, usage_rows, usage_upserts,
)

_SESSION_COLS = ("id, tenant, agent, metadata, status, end_reason, message_count, "
                 "created_at, last_activity, ended_at, node, epoch")
_USAGE_SQL = tuple(sql.replace("{greatest}", "greatest") for sql in usage_upserts(lambda i: f"${i}"))
_USAGE_SUMS = ", ".join(f"sum({c})" for c in USAGE_COUNTERS) + ", max(memory_peak_bytes)"
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# an owner is alive while its row in `nodes` has not expired (the database's clock)
_OWNER_ALIVE = "EXISTS (SELECT 1 FROM nodes n WHERE n.id = sessions.node AND n.expires_at > now())"
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
    shared = True

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
            raise UnknownSession(session_id)
        return MessageRecord(session_id, row["seq"], role, content, row["created_at"].timestamp())

    async def history(self, session_id: str, *, limit: int | None = None) -> list[MessageRecord]:
        """Messages by seq; the last `limit` when given."""
        cols = "SELECT session_id, seq, role, content, created_at FROM messages WHERE session_id = $1"
        if limit is None:
            rows = await self._fetch(cols + " ORDER BY seq", session_id)
            return [_message(r) for r in rows]
        rows = await self._fetch(cols + " ORDER BY seq DESC LIMIT $2", session_id, max(int(limit), 0))
        return [_message(r) for r in reversed(rows)]

    # ---- the cluster: node identity, claims, membership (docs/cluster.md) ------------------

    async def hold_identity(self, node: str) -> AdvisoryClaim:
        """A session-level advisory lock on (search path, node), on a connection of its own; NodeTaken if held."""
        claim = AdvisoryClaim(self, node)
        await claim.acquire()
        return claim

    async def placement(self, session_id: str, node: str) -> Placement:
        """The session with its owner's URL when a live node other than ``node`` holds it active."""
        rows = await self._fetch(
            f"SELECT {_SESSION_COLS}, "
            "(SELECT url FROM nodes n WHERE n.id = sessions.node AND n.expires_at > now() "
            " AND n.id <> $2 AND sessions.ended_at IS NULL) AS owner_url FROM sessions WHERE id = $1",
            session_id, node)
        if not rows:
            return Placement(None)
        record = _session(rows[0])
        url = rows[0]["owner_url"]
        return Placement(record, url, record.node if url else None)

    async def claim_session(self, session_id: str, *, tenant: str, agent: str, metadata: dict[str, Any],
                            node: str) -> SessionRecord | None:
        """One statement: insert, or take over when unowned, ours, ended (passivated), or the owner is dead.

        Concurrent claims of one row serialise on its lock and the loser re-reads the winner's
        row (READ COMMITTED re-checks the WHERE), so at most one node wins each epoch.
        """
        rows = await self._fetch(
            "INSERT INTO sessions (id, tenant, agent, metadata, status, node, epoch, created_at, last_activity) "
            "VALUES ($1, $2, $3, $4, 'starting', $5, 1, now(), now()) "
            "ON CONFLICT (id) DO UPDATE SET status = 'starting', node = EXCLUDED.node, "
            "epoch = sessions.epoch + 1, end_reason = NULL, ended_at = NULL "
            "WHERE sessions.node IS NULL OR sessions.node = EXCLUDED.node OR sessions.ended_at IS NOT NULL "
            f"OR NOT {_OWNER_ALIVE} "
            # every node's streams of the session learn where it lives now (sent at commit)
            f"RETURNING {_SESSION_COLS}, pg_notify('{ACTIVATIONS}', sessions.id || ' ' || sessions.node)",
            session_id, tenant, agent, metadata or {}, node)
        return _session(rows[0]) if rows else None

    async def stale_claims(self, claims: dict[str, int], node: str) -> list[str]:
        """Sessions whose epoch moved on (or that are gone) since ``node`` claimed them."""
        if not claims:
            return []
        rows = await self._fetch(
            "SELECT mine.id FROM unnest($1::text[], $2::bigint[]) AS mine (id, epoch) "
            "LEFT JOIN sessions s ON s.id = mine.id "
            "WHERE s.id IS NULL OR s.epoch <> mine.epoch OR s.node IS DISTINCT FROM $3",
            list(claims), list(claims.values()), node)
        return [r[0] for r in rows]

    async def node_records(self) -> list[NodeRecord]:
        """Every node row with its lease age, liveness and live session count."""
        rows = await self._fetch(
            "SELECT n.id, n.url, n.started_at, n.heartbeat_at, n.expires_at, n.info, "
            "extract(epoch FROM now() - n.heartbeat_at) AS lease_age, n.expires_at > now() AS alive, "
            "(SELECT count(*) FROM sessions s WHERE s.node = n.id AND s.ended_at IS NULL) AS sessions_owned "
            "FROM nodes n ORDER BY n.started_at, n.id")
        return [NodeRecord(
            id=r["id"], url=r["url"], alive=r["alive"], started_at=r["started_at"].timestamp(),
            heartbeat_at=r["heartbeat_at"].timestamp(), expires_at=r["expires_at"].timestamp(),
            lease_age=float(r["lease_age"]), sessions_owned=r["sessions_owned"], info=r["info"] or {},
        ) for r in rows]

    async def join_node(self, node_id: str, *, url: str, lease: float, info: dict[str, Any]) -> None:
        """Insert this node's row, alive for ``lease`` seconds of the database's clock."""
        await self._execute(
            "INSERT INTO nodes (id, url, expires_at, info) "
            "VALUES ($1, $2, now() + make_interval(secs => $3::float8), $4)",
            node_id, url, lease, info)

    async def renew_node(self, node_id: str, *, url: str, lease: float, info: dict[str, Any]) -> bool:
        """Push expires_at forward; True if the old lease still had a margin left (no other node saw it lapse)."""
        rows = await self._fetch(
            "WITH old AS (SELECT expires_at > now() + make_interval(secs => $3::float8 / 6) AS valid "
            "FROM nodes WHERE id = $1) "
            "INSERT INTO nodes (id, url, expires_at, info) "
            "VALUES ($1, $2, now() + make_interval(secs => $3::float8), $4) "
            "ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), expires_at = EXCLUDED.expires_at, "
            "info = EXCLUDED.info RETURNING coalesce((SELECT valid FROM old), false)",
            node_id, url, lease, info)
        return rows[0][0]

    async def sweep_dead_nodes(self, lease: float, *, status: str, end_reason: str) -> int:
        """End the sessions of nodes dead for over ``lease`` and delete those nodes (the epoch moves on)."""
        tag = await self._execute(
            "WITH dead AS (DELETE FROM nodes WHERE expires_at < now() - make_interval(secs => $1::float8) "
            "RETURNING id) UPDATE sessions SET status = $2, end_reason = $3, "
            "ended_at = now(), epoch = epoch + 1 WHERE ended_at IS NULL AND node IN (SELECT id FROM dead)",
            lease, status, end_reason)
        return int(tag.split()[-1])

    async def leave_node(self, node_id: str) -> None:
        """Delete this node's row."""
        await self._execute("DELETE FROM nodes WHERE id = $1", node_id)

    async def take_over_previous_runs(self, node_id: str, *, url: str, name: str, status: str, end_reason: str) -> int:
        """End the rows of this server's earlier runs and their sessions (their epoch moves on); how many sessions."""
        tag = await self._execute(
            "WITH previous AS (DELETE FROM nodes WHERE id <> $1 AND url = $2 AND info->>'name' = $3 RETURNING id) "
            "UPDATE sessions SET status = $4, end_reason = $5, ended_at = now(), epoch = epoch + 1 "
            "WHERE ended_at IS NULL AND node IN (SELECT id FROM previous)",
            node_id, url, name, status, end_reason)
        return int(tag.split()[-1])
