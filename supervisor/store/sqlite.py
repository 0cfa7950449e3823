"""SQLite backend: one connection owned by one thread, WAL journal, migrations at open.

Every store call is one function run on that thread, a whole transaction included: one hand-off
to the thread and one back to the loop per call, however many statements it holds. (With a
hand-off per statement, as aiosqlite does, a group commit of five statements waited five times
for a busy loop to come round, and that wait, not SQLite, was the SQLite case's warm latency.)
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from corral.supervisor.node import FileClaim

from .base import (
    SESSION_USAGE_COLS, USAGE_COUNTERS, MessageRecord, SessionRecord, Store, StoreError, UnknownSession, UsageDelta,
    build_stats, load_migrations, session_usage_record, tenant_sums, usage_period, usage_rows, usage_upserts,
)

_BATCH = 256  # appends per group-commit transaction at most (well under SQLite's bound-variable limit)
_USAGE_SQL = tuple(sql.replace("{greatest}", "max") for sql in usage_upserts(lambda i: "?"))
_USAGE_SUMS = ", ".join(f"SUM({c})" for c in USAGE_COUNTERS) + ", MAX(memory_peak_bytes)"
_SESSION_COLS = ("id, tenant, agent, metadata, status, end_reason, message_count, "
                 "created_at, last_activity, ended_at, node")


def _session(row: sqlite3.Row) -> SessionRecord:
    """Row of `sessions` -> record."""
    return SessionRecord(
        id=row["id"], tenant=row["tenant"], agent=row["agent"],
        metadata=json.loads(row["metadata"] or "{}"), status=row["status"],
        end_reason=row["end_reason"], message_count=row["message_count"],
        created_at=row["created_at"], last_activity=row["last_activity"], ended_at=row["ended_at"],
        node=row["node"],
    )


def _message(row: sqlite3.Row) -> MessageRecord:
    """Row of `messages` -> record."""
    return MessageRecord(row["session_id"], row["seq"], row["role"], row["content"], row["created_at"])


class SQLiteStore(Store):
    """SQLite file store.

    Durability: WAL with synchronous=NORMAL. A commit is in the WAL (the OS page cache) before
    the call returns, so it survives the corral process being SIGKILLed; only an OS crash or
    power loss can lose the last few commits. Pass synchronous="FULL" to fsync every commit.
    """

    backend = "sqlite"

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000,
                 synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        self._busy_timeout_ms = int(busy_timeout_ms)
        self._synchronous = synchronous.upper()
        if self._synchronous not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"bad synchronous mode {synchronous!r}")
        # The one thread that touches the connection: calls run one after another, so a
        # transaction (one call) never interleaves with another.
        self._thread: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        # group commit: appends waiting for the next batch transaction, and the task writing them
        self._appends: list[tuple[str, str, str, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Create/open the file, check integrity, apply migrations; StoreError on failure."""
        if self._thread is not None:
            return
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-sqlite")
        try:
            self._prepare_file()
            await self._on_thread(self._open_sync)
        except (sqlite3.Error, OSError, StoreError) as exc:
            await self.close()
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from exc

    def _prepare_file(self) -> None:
        """Make the parent dir (0700) and the file (0600) so WAL/SHM files inherit 0600."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        elif not os.access(self.path, os.R_OK | os.W_OK):
            raise StoreError("file is not readable and writable by this user")

    def _open_sync(self) -> None:
        """On the store's thread: connect, configure, migrate."""
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        try:
            self._configure(db)
            self._migrate(db)
        except BaseException:
            db.close()
            raise
        self._db = db

    def _configure(self, db: sqlite3.Connection) -> None:
        """Pragmas and the integrity check."""
        db.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        db.execute("PRAGMA foreign_keys = ON")
        verdict = "; ".join(str(r[0]) for r in db.execute("PRAGMA quick_check").fetchall())
        if verdict != "ok":
            raise StoreError(f"integrity check failed: {verdict}")
        (mode,), = db.execute("PRAGMA journal_mode = WAL").fetchall()
        if str(mode).lower() != "wal":
            raise StoreError(f"cannot switch to WAL journal (got {mode})")
        db.execute(f"PRAGMA synchronous = {self._synchronous}")

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Apply pending migrations under BEGIN IMMEDIATE, so two processes cannot race."""
        def apply(db: sqlite3.Connection) -> None:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                       "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)")
            done = {r[0] for r in db.execute("SELECT version FROM schema_version").fetchall()}
            for mig in load_migrations("sqlite"):
                if mig.version in done:
                    continue
                for stmt in mig.statements():
                    db.execute(stmt)
                db.execute("INSERT INTO schema_version VALUES (?, ?, ?)", (mig.version, mig.name, time.time()))

        _transaction(db, apply)

    async def close(self) -> None:
        """Close the connection and stop its thread; safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(thread, db.close)
        thread.shutdown(wait=False)

    # ---- plumbing --------------------------------------------------------------------------

    async def _on_thread(self, fn: Callable, *args):
        """Run ``fn(*args)`` on the store's thread."""
        if self._thread is None:
            raise StoreError(f"SQLite store {self.path} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def _call(self, fn: Callable[[sqlite3.Connection], Any]):
        """Run ``fn(connection)`` on the store's thread; driver errors become StoreError."""
        try:
            return await self._on_thread(self._with_db, fn)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path}: {exc}") from exc

    def _with_db(self, fn: Callable[[sqlite3.Connection], Any]):
        """On the store's thread: the open connection, or StoreError."""
        if self._db is None:
            raise StoreError(f"SQLite store {self.path} is not open")
        return fn(self._db)

    async def _tx(self, fn: Callable[[sqlite3.Connection], Any]):
        """Run ``fn(connection)`` in a write transaction, in one call on the store's thread."""
        return await self._call(lambda db: _transaction(db, fn))

    async def _rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        """The rows of a read."""
        return await self._call(lambda db: db.execute(sql, args).fetchall())

    async def _one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        """First row of a read."""
        rows = await self._rows(sql, args)
        return rows[0] if rows else None

    # ---- sessions --------------------------------------------------------------------------

    async def upsert_session(self, session_id: str, *, tenant: str, agent: str,
                             metadata: dict[str, Any] | None = None,
                             status: str = "starting", node: str | None = None) -> SessionRecord:
        """Create, or bring back an existing session (status and node set, end cleared)."""
        now = time.time()
        rows = await self._tx(lambda db: db.execute(
            f"INSERT INTO sessions ({_SESSION_COLS}) VALUES (?, ?, ?, ?, ?, NULL, 0, ?, ?, NULL, ?) "
            "ON CONFLICT (id) DO UPDATE SET status = excluded.status, node = excluded.node, "
            "end_reason = NULL, ended_at = NULL "
            f"RETURNING {_SESSION_COLS}",
            (session_id, tenant, agent, json.dumps(metadata or {}), status, now, now, node)).fetchall())
        return _session(rows[0])

    async def hold_identity(self, node: str) -> FileClaim:
        """The file is the identity: an exclusive flock on ``<file>.lock`` (NodeTaken if another server has it)."""
        claim = FileClaim(self.path)
        claim.acquire()
        return claim

    async def get_session(self, session_id: str) -> SessionRecord | None:
        """The session, or None."""
        row = await self._one(f"SELECT {_SESSION_COLS} FROM sessions WHERE id = ?", (session_id,))
        return _session(row) if row else None

    async def set_status(self, session_id: str, status: str, *, end_reason: str | None = None,
                         ended: bool = False, epoch: int | None = None) -> None:
        """Set status; ended stamps ended_at/end_reason, otherwise both are cleared."""
        ended_at = time.time() if ended else None
        await self._tx(lambda db: db.execute(
            "UPDATE sessions SET status = ?, end_reason = ?, ended_at = ? WHERE id = ?",
            (status, end_reason if ended else None, ended_at, session_id)))

    async def delete_session(self, session_id: str) -> bool:
        """Remove the session; its messages go by ON DELETE CASCADE."""
        return await self._tx(lambda db: db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount) > 0

    async def tenants_of(self, session_id: str) -> list[str]:
        """The tenants that have a session with this id (a key is the id, or tenant/id)."""
        rows = await self._rows("SELECT DISTINCT tenant FROM sessions WHERE id = ? OR id = tenant || '/' || ?",
                                (session_id, session_id))
        return sorted(r[0] for r in rows)

    async def end_orphans(self, node: str | None, *, status: str, end_reason: str) -> int:
        """End the sessions ``node`` (None: any node) left unended."""
        now = time.time()
        return await self._tx(lambda db: db.execute(
            "UPDATE sessions SET status = ?, end_reason = ?, ended_at = ? "
            "WHERE (? IS NULL OR node = ?) AND ended_at IS NULL", (status, end_reason, now, node, node)).rowcount)

    async def purge_ended(self, older_than: float) -> int:
        """Delete sessions whose ended_at is before now - older_than."""
        cutoff = time.time() - older_than
        return await self._tx(lambda db: db.execute("DELETE FROM sessions WHERE ended_at < ?", (cutoff,)).rowcount)

    async def list_sessions(self, *, tenant: str | None = None, status: str | None = None,
                            limit: int = 100, offset: int = 0) -> list[SessionRecord]:
        """Sessions newest first, filtered by tenant/status."""
        where, args = [], []
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        sql = f"SELECT {_SESSION_COLS} FROM sessions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
        rows = await self._rows(sql, (*args, int(limit), int(offset)))
        return [_session(r) for r in rows]

    async def stats(self) -> dict[str, Any]:
        """Totals and per-tenant numbers in one grouped scan."""
        rows = await self._rows(
            "SELECT tenant, COUNT(*), SUM(ended_at IS NULL), SUM(message_count) "
            "FROM sessions GROUP BY tenant ORDER BY tenant")
        return build_stats([tuple(r) for r in rows])

    # ---- usage -----------------------------------------------------------------------------

    async def add_usage(self, deltas: list[UsageDelta]) -> None:
        """One transaction for the whole batch (three executemany)."""
        rows = usage_rows(deltas, time.time())
        await self._tx(lambda db: [db.executemany(sql, args) for sql, args in zip(_USAGE_SQL, rows) if args])

    async def session_usage(self, session_id: str) -> dict[str, Any] | None:
        """The session's sums, or None."""
        row = await self._one(f"SELECT {SESSION_USAGE_COLS} FROM session_usage WHERE session_id = ?", (session_id,))
        return session_usage_record(row) if row is not None else None

    async def tenant_usage(self, *, tenant: str | None = None, since: float | None = None,
                           until: float | None = None) -> dict[str, dict[str, Any]]:
        """Per tenant, the hours of the period summed (two grouped scans)."""
        low, high = usage_period(since, until)
        where = "WHERE (? IS NULL OR tenant = ?) AND hour >= ? AND hour < ?"
        args = (tenant, tenant, low, high)
        sums = await self._rows(f"SELECT tenant, {_USAGE_SUMS} FROM tenant_usage {where} GROUP BY tenant", args)
        ends = await self._rows(f"SELECT tenant, reason, SUM(count) FROM tenant_usage_ends {where} "
                                "GROUP BY tenant, reason", args)
        return tenant_sums([tuple(r) for r in sums], [tuple(r) for r in ends])

    # ---- messages --------------------------------------------------------------------------

    async def append_message(self, session_id: str, role: str, content: str, *,
                             epoch: int | None = None) -> MessageRecord:
        """Bump message_count and insert with it as seq; returns once the row is committed.

        Group commit: appends made while a batch is being written wait for the next one and go
        into a single transaction together, so N concurrent turns cost one commit and a few
        thread hops instead of N commits of four hops each. Nobody is answered before the
        transaction holding their row has committed.
        """
        done = asyncio.get_running_loop().create_future()
        self._appends.append((session_id, role, content, done))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush_appends())
        return await done

    async def _flush_appends(self) -> None:
        """Write queued appends in batches until none are left."""
        try:
            while self._appends:
                batch, self._appends = self._appends[:_BATCH], self._appends[_BATCH:]
                try:
                    records = await self._append_batch(batch)
                except BaseException as exc:
                    failure = exc if isinstance(exc, StoreError) else StoreError(f"SQLite store {self.path}: {exc}")
                    for *_, done in batch:
                        if not done.done():
                            done.set_exception(failure)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (session_id, *_, done), record in zip(batch, records):
                    if done.done():
                        continue
                    if record is None:
                        done.set_exception(UnknownSession(session_id))
                    else:
                        done.set_result(record)
        finally:
            self._flusher = None

    async def _append_batch(self, batch: list) -> list[MessageRecord | None]:
        """One transaction for a batch of appends; None for an append whose session is gone."""
        appends = [(session_id, role, content) for session_id, role, content, _ in batch]
        return await self._tx(lambda db: _append_rows(db, appends, time.time()))

    async def history(self, session_id: str, *, limit: int | None = None) -> list[MessageRecord]:
        """Messages by seq; the last `limit` when given."""
        sql = "SELECT session_id, seq, role, content, created_at FROM messages WHERE session_id = ?"
        if limit is None:
            args: tuple = (session_id,)
            sql += " ORDER BY seq"
        else:
            args = (session_id, max(int(limit), 0))
            sql += " ORDER BY seq DESC LIMIT ?"
        out = [_message(r) for r in await self._rows(sql, args)]
        return out if limit is None else out[::-1]


def _transaction(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]):
    """``fn(db)`` inside BEGIN IMMEDIATE ... COMMIT (a second process waits on busy_timeout)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn(db)
        db.execute("COMMIT")
    except BaseException:
        # also after a failed COMMIT, which leaves the transaction open
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    return result


def _append_rows(db: sqlite3.Connection, appends: list[tuple[str, str, str]], now: float) -> list[MessageRecord | None]:
    """In a transaction: give each append the next seq of its session and write them all."""
    ids = list({session_id for session_id, _, _ in appends})
    rows = db.execute(f"SELECT id, message_count FROM sessions WHERE id IN ({', '.join('?' * len(ids))})", ids)
    counts = {row[0]: row[1] for row in rows}
    records: list[MessageRecord | None] = []
    for session_id, role, content in appends:
        if session_id not in counts:
            records.append(None)
            continue
        counts[session_id] += 1
        records.append(MessageRecord(session_id, counts[session_id], role, content, now))
    written = [r for r in records if r is not None]
    if written:
        db.executemany(
            "INSERT INTO messages (session_id, seq, role, content, created_at) VALUES (?, ?, ?, ?, ?)",
            [(r.session_id, r.seq, r.role, r.content, r.created_at) for r in written])
        db.executemany(
            "UPDATE sessions SET message_count = ?, last_activity = ? WHERE id = ?",
            [(counts[sid], now, sid) for sid in {r.session_id for r in written}])
    return records
