"""SQLite group commit: concurrent appends share transactions and lose nothing."""

import asyncio
import sqlite3

import pytest

from corral.supervisor.store import UnknownSession, create_store


@pytest.fixture
async def store(tmp_path):
    """An opened SQLite store."""
    s = create_store(f"sqlite://{tmp_path / 'db.sqlite3'}", None)
    await s.open()
    yield s
    await s.close()


async def test_concurrent_appends_get_consecutive_seqs_and_all_commit(store, tmp_path):
    for sid in ("a", "b"):
        await store.upsert_session(sid, tenant="t", agent="x")
    appends = [store.append_message(sid, "user", f"{sid}{i}") for i in range(300) for sid in ("a", "b")]
    records = await asyncio.gather(*appends)
    for sid in ("a", "b"):
        mine = [r for r in records if r.session_id == sid]
        assert sorted(r.seq for r in mine) == list(range(1, 301))
        assert [r.content for r in sorted(mine, key=lambda r: r.seq)] == [f"{sid}{i}" for i in range(300)]
    # committed: another connection sees every row, and the counters agree with them
    with sqlite3.connect(tmp_path / "db.sqlite3") as other:
        assert other.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 600
        counts = dict(other.execute("SELECT id, message_count FROM sessions").fetchall())
    assert counts == {"a": 300, "b": 300}


async def test_an_append_to_a_missing_session_fails_alone(store):
    await store.upsert_session("here", tenant="t", agent="x")
    results = await asyncio.gather(
        store.append_message("here", "user", "one"),
        store.append_message("gone", "user", "lost"),
        store.append_message("here", "user", "two"),
        return_exceptions=True,
    )
    assert isinstance(results[1], UnknownSession)
    assert [r.seq for r in (results[0], results[2])] == [1, 2]
    assert [m.content for m in await store.history("here")] == ["one", "two"]


async def test_appends_after_close_fail_with_a_store_error(store):
    from corral.supervisor.store import StoreError

    await store.upsert_session("s", tenant="t", agent="x")
    await store.close()
    with pytest.raises(StoreError):
        await store.append_message("s", "user", "late")
