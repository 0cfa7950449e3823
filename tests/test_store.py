"""One suite over every Store backend (SQLite file, PostgreSQL, in-memory), against real databases."""
from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import asyncpg
import pytest

from corral.supervisor.store import (
    MessageRecord, Placement, UnknownSession, SessionRecord, Store, StoreError, create_store,
)
from corral.supervisor.store.base import load_migrations
from corral.supervisor.store.postgres import PostgresStore
from corral.supervisor.store.sqlite import SQLiteStore
from tests.conftest import drop_schema

PG_URL = os.environ.get("CORRAL_TEST_DATABASE_URL", "")
REPO = Path(__file__).resolve().parents[1]

BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.skipif(
        not PG_URL, reason="CORRAL_TEST_DATABASE_URL is not set (e.g. postgresql://postgres@127.0.0.1:5432/test)")),
    "memory",
]


# ---- fixtures ------------------------------------------------------------------------------

@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Name of the backend under test."""
    return request.param


@pytest.fixture
async def make_store(backend, tmp_path):
    """Factory of opened stores that all share one database (same file / same PG schema)."""
    schema = f"corral_test_{uuid.uuid4().hex[:12]}"
    memory = create_store("memory:", None)
    opened: list[Store] = []

    async def new(open_it: bool = True) -> Store:
        if backend == "sqlite":
            store = create_store(f"sqlite://{tmp_path / 'db.sqlite3'}", None)
        elif backend == "postgresql":
            store = create_store(PG_URL, None, schema=schema)
        else:
            store = memory
        if open_it:
            await store.open()
        opened.append(store)
        return store

    yield new
    for store in opened:
        await store.close()
    if backend == "postgresql":
        await drop_schema(schema)


@pytest.fixture
async def store(make_store) -> Store:
    """One opened store."""
    return await make_store()


async def applied_versions(store: Store) -> list[int]:
    """Rows of schema_version, read straight from the database."""
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as db:
            return [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY version")]
    conn = await asyncpg.connect(PG_URL)
    try:
        rows = await conn.fetch(f'SELECT version FROM "{store.schema}".schema_version ORDER BY 1')
        return [r[0] for r in rows]
    finally:
        await conn.close()


# ---- sessions ------------------------------------------------------------------------------

async def test_create_get_and_upsert_back(store):
    meta = {"website_domain": "example.com", "ip": "1.2.3.4", "nested": {"ü": [1, 2]}}
    rec = await store.upsert_session("s1", tenant="acme", agent="demo", metadata=meta)
    assert isinstance(rec, SessionRecord)
    assert (rec.id, rec.tenant, rec.agent, rec.status) == ("s1", "acme", "demo", "starting")
    assert rec.metadata == meta and rec.message_count == 0
    assert rec.ended_at is None and rec.end_reason is None
    assert rec.created_at == pytest.approx(rec.last_activity)
    assert await store.get_session("s1") == rec
    assert await store.get_session("nope") is None

    await store.append_message("s1", "user", "hi")
    await store.set_status("s1", "crashed", end_reason="oom", ended=True)
    back = await store.upsert_session("s1", tenant="other", agent="x", metadata={"a": 1},
                                      status="idle")
    # only status and the end fields change when a session comes back
    assert (back.tenant, back.agent, back.metadata) == ("acme", "demo", meta)
    assert (back.status, back.ended_at, back.end_reason) == ("idle", None, None)
    assert back.message_count == 1 and back.created_at == rec.created_at
    assert back.to_dict()["metadata"] == meta


async def test_set_status_ended_then_cleared(store):
    await store.upsert_session("s", tenant="t", agent="a")
    await store.set_status("s", "busy")
    rec = await store.get_session("s")
    assert rec.status == "busy" and rec.ended_at is None
    await store.set_status("s", "ended", end_reason="reaped", ended=True)
    rec = await store.get_session("s")
    assert (rec.status, rec.end_reason) == ("ended", "reaped")
    assert rec.ended_at == pytest.approx(rec.created_at, abs=5)
    await store.set_status("s", "idle", end_reason="ignored")
    rec = await store.get_session("s")
    assert (rec.status, rec.end_reason, rec.ended_at) == ("idle", None, None)
    await store.set_status("missing", "idle")  # unknown ids are a no-op


# ---- messages ------------------------------------------------------------------------------

async def test_append_order_seq_and_counters(store):
    rec = await store.upsert_session("s", tenant="t", agent="a")
    await asyncio.sleep(0.02)
    sent = [("user", "hello"), ("assistant", "hi there"), ("user", "ünïcode ✓\n" * 3)]
    out = [await store.append_message("s", role, text) for role, text in sent]
    assert [m.seq for m in out] == [1, 2, 3]
    assert all(isinstance(m, MessageRecord) for m in out)
    hist = await store.history("s")
    assert [(m.role, m.content) for m in hist] == sent
    assert [m.seq for m in hist] == [1, 2, 3]
    assert [m.created_at for m in hist] == pytest.approx([m.created_at for m in out])
    after = await store.get_session("s")
    assert after.message_count == 3
    assert after.last_activity > rec.last_activity
    assert after.last_activity == pytest.approx(out[-1].created_at, abs=0.01)
    assert hist[0].to_dict() == {"session_id": "s", "seq": 1, "role": "user",
                                 "content": "hello", "created_at": hist[0].created_at}


async def test_concurrent_appends_get_gapless_seqs(store):
    await store.upsert_session("s", tenant="t", agent="a")
    out = await asyncio.gather(*(store.append_message("s", "user", f"m{i}") for i in range(50)))
    assert sorted(m.seq for m in out) == list(range(1, 51))
    hist = await store.history("s")
    assert [m.seq for m in hist] == list(range(1, 51))
    # each message is stored under the seq it was returned with
    assert {m.seq: m.content for m in hist} == {m.seq: m.content for m in out}
    assert (await store.get_session("s")).message_count == 50


async def test_history_limit(store):
    await store.upsert_session("s", tenant="t", agent="a")
    await store.upsert_session("other", tenant="t", agent="a")
    for i in range(1, 8):
        await store.append_message("s", "user", f"m{i}")
    await store.append_message("other", "user", "x")
    assert [m.content for m in await store.history("s", limit=3)] == ["m5", "m6", "m7"]
    assert len(await store.history("s", limit=100)) == 7
    assert await store.history("s", limit=0) == []
    assert await store.history("nope") == []


async def test_append_to_unknown_session(store):
    with pytest.raises(UnknownSession):
        await store.append_message("ghost", "user", "boo")
    with pytest.raises(KeyError):  # UnknownSession is a KeyError
        await store.append_message("ghost", "user", "boo")


# ---- listing, stats, deletion --------------------------------------------------------------

async def test_list_filters_and_pagination(store):
    for i in range(7):
        await store.upsert_session(f"a{i}", tenant="acme", agent="demo",
                                   status="idle" if i % 2 else "busy")
    for i in range(3):
        await store.upsert_session(f"b{i}", tenant="beta", agent="demo", status="idle")
    everything = await store.list_sessions()
    assert len(everything) == 10
    keys = [(-r.created_at, r.id) for r in everything]
    assert keys == sorted(keys)  # newest first, id breaks ties
    acme = await store.list_sessions(tenant="acme")
    assert {r.id for r in acme} == {f"a{i}" for i in range(7)}
    idle_acme = await store.list_sessions(tenant="acme", status="idle")
    assert {r.id for r in idle_acme} == {"a1", "a3", "a5"}
    assert {r.id for r in await store.list_sessions(status="idle")} == {
        "a1", "a3", "a5", "b0", "b1", "b2"}
    pages = [await store.list_sessions(limit=4, offset=o) for o in (0, 4, 8)]
    assert [len(p) for p in pages] == [4, 4, 2]
    assert [r.id for p in pages for r in p] == [r.id for r in everything]
    assert await store.list_sessions(tenant="nobody") == []


async def test_stats_totals_and_per_tenant(store):
    assert await store.stats() == {"sessions_total": 0, "sessions_active": 0, "messages_total": 0,
                                   "average_messages_per_session": 0.0, "by_tenant": {}}
    for sid, tenant, n in [("a1", "acme", 4), ("a2", "acme", 1), ("a3", "acme", 0), ("b1", "beta", 3)]:
        await store.upsert_session(sid, tenant=tenant, agent="demo")
        for i in range(n):
            await store.append_message(sid, "user", str(i))
    await store.set_status("a2", "ended", end_reason="killed", ended=True)
    stats = await store.stats()
    assert stats["sessions_total"] == 4
    assert stats["sessions_active"] == 3
    assert stats["messages_total"] == 8
    assert stats["average_messages_per_session"] == pytest.approx(2.0)
    assert stats["by_tenant"] == {
        "acme": {"sessions_total": 3, "sessions_active": 2, "messages_total": 5,
                 "average_messages_per_session": pytest.approx(5 / 3)},
        "beta": {"sessions_total": 1, "sessions_active": 1, "messages_total": 3,
                 "average_messages_per_session": pytest.approx(3.0)},
    }


async def test_delete_cascades_to_messages(store):
    await store.upsert_session("s", tenant="t", agent="a")
    await store.upsert_session("keep", tenant="t", agent="a")
    for i in range(3):
        await store.append_message("s", "user", str(i))
    await store.append_message("keep", "user", "stay")
    assert await store.delete_session("s") is True
    assert await store.delete_session("s") is False
    assert await store.get_session("s") is None
    assert await store.history("s") == []
    # a new session under the same id starts at seq 1: no orphan rows hold (s, 1)
    await store.upsert_session("s", tenant="t", agent="a")
    assert (await store.append_message("s", "user", "again")).seq == 1
    assert [m.content for m in await store.history("keep")] == ["stay"]


async def test_end_orphans_ends_only_that_nodes_unended_sessions(store):
    await store.upsert_session("a", tenant="t", agent="x", node="n1")
    await store.upsert_session("b", tenant="t", agent="x", node="n2")
    await store.upsert_session("c", tenant="t", agent="x", node="n1")
    await store.set_status("c", "reaped", end_reason="reaped", ended=True)
    assert await store.end_orphans("n1", status="lost", end_reason="server_died") == 1
    a, b, c = [await store.get_session(sid) for sid in "abc"]
    assert (a.status, a.end_reason, a.node) == ("lost", "server_died", "n1") and a.ended_at is not None
    assert b.ended_at is None and (c.status, c.end_reason) == ("reaped", "reaped")
    assert (await store.stats())["sessions_active"] == 1
    back = await store.upsert_session("a", tenant="t", agent="x", node="n2")  # resumed on another node
    assert (back.node, back.ended_at) == ("n2", None)
    assert await store.end_orphans("n1", status="lost", end_reason="server_died") == 0


async def test_cluster_methods_claim_and_place_sessions(store):
    """What the directory asks of every backend: a shared store fences and knows owners; a single node's does not."""
    first = await store.claim_session("s", tenant="t", agent="x", metadata={"k": 1}, node="n1")
    assert (first.id, first.tenant, first.node, first.metadata) == ("s", "t", "n1", {"k": 1})
    placed = await store.placement("s", "n1")
    assert placed.record.id == "s" and placed.owner_url is None  # its own session
    assert await store.placement("none", "n1") == Placement(None)
    if not store.shared:
        # a single node's store: every claim wins, nothing goes stale, no node rows
        assert (await store.claim_session("s", tenant="t", agent="x", metadata={}, node="n2")).node == "n2"
        assert await store.stale_claims({"s": first.epoch}, "n1") == []
        assert await store.node_records() == []
        return
    # n1 is not a live node (no row in nodes), so n2 may take the session over: the epoch moves on
    second = await store.claim_session("s", tenant="t", agent="x", metadata={}, node="n2")
    assert (second.node, second.epoch) == ("n2", first.epoch + 1)
    assert await store.stale_claims({"s": first.epoch}, "n1") == ["s"]
    assert await store.stale_claims({"s": second.epoch}, "n2") == []
    await store.join_node("n2", url="http://n2", lease=30, info={"pid": 7})
    assert await store.claim_session("s", tenant="t", agent="x", metadata={}, node="n1") is None  # n2 is alive
    placed = await store.placement("s", "n1")
    assert (placed.owner, placed.owner_url) == ("n2", "http://n2")
    assert await store.renew_node("n2", url="http://n2", lease=30, info={"pid": 7}) is True
    [row] = await store.node_records()
    assert (row.id, row.url, row.alive, row.sessions_owned, row.info) == ("n2", "http://n2", True, 1, {"pid": 7})
    await store.leave_node("n2")
    assert await store.node_records() == []


async def test_purge_ended_removes_only_old_ended(store):
    for sid in ("old", "recent", "live"):
        await store.upsert_session(sid, tenant="t", agent="a")
        await store.append_message(sid, "user", "x")
    await store.set_status("old", "ended", end_reason="reaped", ended=True)
    await asyncio.sleep(0.4)
    await store.set_status("recent", "ended", end_reason="killed", ended=True)
    assert await store.purge_ended(3600) == 0
    assert await store.purge_ended(0.2) == 1
    assert await store.get_session("old") is None
    assert await store.history("old") == []
    assert {r.id for r in await store.list_sessions()} == {"recent", "live"}
    assert await store.purge_ended(0) == 1
    assert [r.id for r in await store.list_sessions()] == ["live"]


# ---- migrations, reopening, failures -------------------------------------------------------

async def test_migrations_idempotent_and_concurrent(make_store, backend):
    if backend == "memory":
        pytest.skip("memory store has no migrations")
    first, second = await asyncio.gather(make_store(), make_store())  # two opens racing
    third = await make_store()
    await third.open()  # opening an open store again is harmless
    expected = [m.version for m in load_migrations(backend)]
    assert expected and await applied_versions(first) == expected
    await first.upsert_session("s", tenant="t", agent="a")
    await second.append_message("s", "user", "from second")
    assert [m.content for m in await third.history("s")] == ["from second"]


async def forget_migration(store: Store, name: str) -> None:
    """Make the store's database look as if migration ``name`` had never run (the rows stay as they are)."""
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as db:
            db.execute("DELETE FROM schema_version WHERE name = ?", (name,))
        return
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'DELETE FROM "{store.schema}".schema_version WHERE name = $1', name)
    finally:
        await conn.close()


async def test_the_session_keys_migration_puts_each_tenant_in_front_of_its_ids(make_store, backend):
    """Rows written before ids were per tenant: acme's "s1" becomes "acme/s1" with its messages; default's stays."""
    if backend == "memory":
        pytest.skip("memory store has no migrations")
    store = await make_store()
    for tenant in ("acme", "default"):
        key = "s1" if tenant == "default" else f"{tenant}-s1"  # one id per row, as the old namespace had
        await store.upsert_session(key, tenant=tenant, agent="a")
        await store.append_message(key, "user", f"from {tenant}")
    await store.close()
    name = "0003_session_keys" if backend == "sqlite" else "0004_session_keys"
    await forget_migration(store, name)
    again = await make_store()
    assert [m.content for m in await again.history("acme/acme-s1")] == ["from acme"]
    assert [m.content for m in await again.history("s1")] == ["from default"]
    assert await again.get_session("acme-s1") is None
    assert await again.tenants_of("acme-s1") == ["acme"] and await again.tenants_of("s1") == ["default"]
    assert await again.delete_session("acme/acme-s1") and await again.history("acme/acme-s1") == []


async def test_tenants_of_names_every_tenant_with_that_id(store):
    for key, tenant in (("s1", "default"), ("acme/s1", "acme"), ("globex/s1", "globex"), ("acme/s2", "acme")):
        await store.upsert_session(key, tenant=tenant, agent="a")
    assert await store.tenants_of("s1") == ["acme", "default", "globex"]
    assert await store.tenants_of("s2") == ["acme"] and await store.tenants_of("s3") == []


async def test_reopen_keeps_data(make_store, backend):
    if backend == "memory":
        pytest.skip("memory store does not persist")
    store = await make_store()
    await store.upsert_session("s", tenant="t", agent="a", metadata={"k": "v"})
    await store.append_message("s", "user", "remember me")
    await store.close()
    again = await make_store()
    assert (await again.get_session("s")).metadata == {"k": "v"}
    assert [m.content for m in await again.history("s")] == ["remember me"]
    assert (await again.append_message("s", "assistant", "ok")).seq == 2


async def test_closed_store_raises_store_error(make_store, backend):
    if backend == "memory":
        pytest.skip("memory store has nothing to lose")
    store = await make_store()
    await store.close()
    with pytest.raises(StoreError):
        await store.get_session("s")


async def test_sqlite_append_survives_sigkill(tmp_path):
    db = tmp_path / "crash.sqlite3"
    child = textwrap.dedent(f"""
        import asyncio, os, signal
        from corral.supervisor.store import create_store
        async def main():
            s = create_store("sqlite://{db}", None)
            await s.open()
            await s.upsert_session("s", tenant="t", agent="a")
            await s.append_message("s", "user", "durable")
            os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint
        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = SQLiteStore(db)
    await store.open()
    try:
        assert [m.content for m in await store.history("s")] == ["durable"]
    finally:
        await store.close()


async def test_sqlite_corrupt_file_fails_at_open(tmp_path):
    path = tmp_path / "corrupt.sqlite3"
    path.write_bytes(b"this is not a database" * 500)
    store = SQLiteStore(path)
    with pytest.raises(StoreError) as err:
        await store.open()
    assert str(path) in str(err.value) and "not a database" in str(err.value)


async def test_sqlite_damaged_pages_fail_quick_check(tmp_path):
    path = tmp_path / "damaged.sqlite3"
    good = SQLiteStore(path)
    await good.open()
    for i in range(200):
        await good.upsert_session(f"s{i}", tenant="t", agent="a", metadata={"pad": "x" * 200})
    await good.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("PRAGMA journal_mode=DELETE")
    data = bytearray(path.read_bytes())
    page = 4096
    data[page * 3:page * 6] = b"\xff" * (page * 3)  # scribble over b-tree pages, keep the header
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as err:
        await SQLiteStore(path).open()
    assert str(path) in str(err.value)


async def test_sqlite_unopenable_path_fails_at_open(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = create_store(f"sqlite://{blocker / 'sub' / 'db.sqlite3'}", None)
    with pytest.raises(StoreError) as err:
        await store.open()
    assert str(blocker) in str(err.value)


async def test_sqlite_locked_file_fails_at_open(tmp_path):
    path = tmp_path / "locked.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE x (y)")
    holder.execute("BEGIN EXCLUSIVE")  # rollback journal + exclusive lock: nobody else may read
    try:
        with pytest.raises(StoreError) as err:
            await SQLiteStore(path, busy_timeout_ms=100).open()
        assert str(path) in str(err.value) and "locked" in str(err.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


async def test_postgres_unreachable_hides_password():
    store = create_store("postgresql://corral:s3cret-pw@127.0.0.1:1/corral", None)
    assert store.backend == "postgresql"
    with pytest.raises(StoreError) as err:
        await store.open()
    text = str(err.value)
    assert "127.0.0.1:1" in text and "s3cret-pw" not in text
    assert err.value.__cause__ is None or "s3cret-pw" not in str(err.value.__cause__)


# ---- create_store --------------------------------------------------------------------------

def test_create_store_default_is_private_sqlite(tmp_path):
    data_dir = tmp_path / "data" / "dir"
    for url in (None, ""):
        store = create_store(url, data_dir)
        assert isinstance(store, SQLiteStore) and store.backend == "sqlite"
        assert store.path == data_dir / "corral.sqlite3"
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700


def test_create_store_urls(tmp_path, monkeypatch):
    assert create_store(f"sqlite://{tmp_path}/x.db", None).path == tmp_path / "x.db"
    assert create_store(f"sqlite:///{tmp_path}/x.db", None).path == tmp_path / "x.db"
    monkeypatch.chdir(tmp_path)
    assert create_store("sqlite:rel.db", None).path == Path("rel.db")
    for url in ("postgresql://u@h:5/db", "postgres://u@h/db"):
        pg = create_store(url, None, schema="s1")
        assert isinstance(pg, PostgresStore) and pg.schema == "s1"
    assert create_store("memory:", None).backend == "memory"
    with pytest.raises(StoreError) as err:
        create_store("mysql://root:hunter2@db/x", None)
    assert "mysql" in str(err.value) and "hunter2" not in str(err.value)


async def test_sqlite_files_are_private(tmp_path):
    store = create_store(None, tmp_path / "d")
    await store.open()
    try:
        await store.upsert_session("s", tenant="t", agent="a")
        assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    finally:
        await store.close()


# ---- usage ---------------------------------------------------------------------------------

async def test_usage_adds_per_session_and_per_tenant_hour(make_store, backend):
    """Deltas add up per session and per tenant-hour (peak: the largest), survive a reopen and the session's purge."""
    from corral.supervisor.store.base import HOUR, UsageDelta
    store = await make_store()
    await store.upsert_session("u1", tenant="acme", agent="a")
    hour = 100 * HOUR
    await store.add_usage([
        UsageDelta("u1", "acme", "n1", hour, {"turns": 2, "bytes_in": 10, "cpu_seconds": 0.5}, 1000),
        UsageDelta("u2", "acme", "n2", hour, {"turns": 1, "memory_mib_seconds": 3.0}, 5000),
        UsageDelta("u3", "beta", "n1", hour + HOUR, {"starts": 1}, 10),
    ])
    await store.add_usage([UsageDelta("u1", "acme", "n1", hour + HOUR, {"turns": 1, "ends": 1, "cpu_seconds": 0.25},
                                      2000, {"idle": 1}, "idle")])
    await store.set_status("u1", "reaped", end_reason="idle", ended=True)
    await store.purge_ended(-1)  # the session's rows go; its usage stays
    if backend != "memory":
        await store.close()
        store = await make_store()
    one = await store.session_usage("u1")
    assert (one["turns"], one["bytes_in"], one["cpu_seconds"], one["ends"]) == (3, 10, 0.75, 1)
    assert (one["memory_peak_bytes"], one["last_end_reason"], one["node"], one["tenant"]) == (2000, "idle", "n1", "acme")
    assert await store.session_usage("nobody") is None
    every = await store.tenant_usage()
    assert every["acme"]["turns"] == 4 and every["acme"]["memory_peak_bytes"] == 5000
    assert every["acme"]["end_reasons"] == {"idle": 1} and every["beta"]["starts"] == 1
    first_hour = await store.tenant_usage(since=hour + 10, until=hour + HOUR)
    assert first_hour["acme"]["turns"] == 3 and first_hour["acme"]["end_reasons"] == {} and "beta" not in first_hour
    assert list(await store.tenant_usage(tenant="beta")) == ["beta"]
