"""History survives whatever takes a session's process away, on SQLite and on PostgreSQL.

Real supervisors, real agent processes, real databases: a session is told "my name is Alice",
loses its process (idle reaping, each kind of crash, an OOM kill, an admin kill, a restart of
the supervisor), and the demo agent that comes back still answers "Your name is Alice.".
"""

import asyncio
import sqlite3
import uuid

import asyncpg
import pytest

from corral.supervisor import Supervisor, errors, states
from corral.supervisor.store import create_store
from corral.supervisor.store.sqlite import SQLiteStore
from tests.conftest import POSTGRES_URL, drop_schema, wait_for_state
from corral.web.app import create_app
from corral.web.keys import SUPERVISOR

ALICE = "Your name is Alice."

BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.skipif(
        not POSTGRES_URL,
        reason="CORRAL_TEST_DATABASE_URL is not set (e.g. postgresql://postgres@127.0.0.1:5432/test)")),
]


def new_schema() -> str:
    """A fresh PostgreSQL schema name for one test."""
    return f"corral_persist_{uuid.uuid4().hex[:12]}"


def pg_store(schema: str):
    """An unopened PostgreSQL store in ``schema``."""
    # its own application_name, so a test can find (and kill) exactly its own connections
    return create_store(POSTGRES_URL, schema=schema, application_name=f"corral-{schema}")


@pytest.fixture(params=BACKENDS)
async def new_store(request, tmp_path):
    """Factory of unopened stores that all share one database (one SQLite file / one PG schema)."""
    schema = new_schema()

    def new():
        if request.param == "sqlite":
            return create_store(None, tmp_path / "data")
        return pg_store(schema)

    new.backend = request.param
    yield new
    if request.param == "postgresql":
        await drop_schema(schema)


@pytest.fixture
def start_supervisor(make_supervisor, new_store):
    """Start supervisors on the test's database; all are closed afterwards."""

    async def start(**overrides) -> Supervisor:
        return await make_supervisor(store=new_store(), **overrides)

    start.backend = new_store.backend
    return start


async def tell_alice(sup: Supervisor, session_id: str | None = None, tenant: str = "t1"):
    """A session that has been told the name."""
    s = await sup.get_or_create(session_id, tenant)
    result = await sup.chat(s, "My name is Alice")
    assert result["reply"] == "Got it: your name is Alice."
    return s


async def ask_name(sup: Supervisor, session_id: str, tenant: str = "t1") -> str:
    """Ask the session (fetched again by id, as a new request would) for the name."""
    s = await sup.get_or_create(session_id, tenant)
    return (await sup.chat(s, "What is my name?"))["reply"]


def record_states(sup: Supervisor, key: str) -> list[str]:
    """The states a session goes through from now on (filled in by events)."""
    seen: list[str] = []
    sup.events.subscribe_session(key, lambda e: seen.append(e["state"]) if e["type"] == "state" else None)
    return seen


async def test_history_restored_after_idle_reaping(start_supervisor):
    sup = await start_supervisor(idle_timeout=0.3)
    s = await tell_alice(sup)
    pid = s.pid
    assert await wait_for_state(sup, s, states.REAPED) == states.REAPED
    assert await ask_name(sup, s.id) == ALICE
    assert sup.sessions[s.key].pid != pid


@pytest.mark.parametrize("how", ["exit", "signal", "exception"])
async def test_history_restored_after_crash(start_supervisor, how):
    sup = await start_supervisor()
    s = await tell_alice(sup)
    seen = record_states(sup, s.key)
    with pytest.raises(errors.AgentDied) as died:
        await sup.command(s, "crash", {"how": how})
    assert died.value.code == "agent_crashed"
    # asked at once: the request must wait for the dying process, not be sent to it
    assert await ask_name(sup, s.id) == ALICE
    assert states.CRASHED in seen and seen[-1] == states.IDLE
    assert sup.counters["restarts"] == 1


async def test_history_restored_after_oom_kill(start_supervisor):
    sup = await start_supervisor(memory_limit=64 * 1024 * 1024)
    if sup.limiter.describe().get("mechanism") in (None, "none"):
        pytest.skip("no memory limit mechanism on this host")
    s = await tell_alice(sup)
    seen = record_states(sup, s.key)
    with pytest.raises(errors.AgentDied) as died:
        await sup.command(s, "allocate", {"mib": 256})
    assert died.value.code == "agent_oom"
    assert await ask_name(sup, s.id) == ALICE
    assert states.OOM in seen


async def test_history_restored_after_admin_kill(start_supervisor):
    sup = await start_supervisor()
    s = await tell_alice(sup)
    assert await sup.kill(s) == states.KILLED
    assert s.id not in sup.sessions  # nothing in memory: the answer must come from the store
    assert await ask_name(sup, s.id) == ALICE


async def test_history_restored_after_supervisor_restart(start_supervisor):
    first = await start_supervisor()
    s = await tell_alice(first)
    await first.close()
    second = await start_supervisor()
    assert await ask_name(second, s.id) == ALICE
    history = await second.store.history(s.key)
    assert [(m.seq, m.role) for m in history] == [(1, "user"), (2, "assistant"), (3, "user"), (4, "assistant")]
    assert history[-1].content == ALICE


async def test_restart_ends_the_sessions_its_dead_predecessor_left_live(start_supervisor, new_store):
    if new_store.backend == "postgresql":
        pytest.skip("on PostgreSQL each run is a new cluster node; tests/test_cluster.py covers a dead node's sessions")
    first = await start_supervisor()
    s = await tell_alice(first)
    await first.close()
    # What a SIGKILLed server leaves behind: its session still live in the store.
    await first.store.open()
    await first.store.set_status(s.key, states.IDLE)
    await first.store.upsert_session("elsewhere", tenant="t1", agent="x", node="another-host:8080")
    await first.store.close()
    second = await start_supervisor()
    assert second.node == first.node
    lost = await second.store.get_session(s.key)
    assert (lost.status, lost.end_reason) == ("lost", "server_died") and lost.ended_at is not None
    elsewhere = await second.store.get_session("elsewhere")
    if start_supervisor.backend == "postgresql":  # a shared store: another node's is left alone
        assert elsewhere.ended_at is None and (await second.store.stats())["sessions_active"] == 1
    else:  # one server per SQLite file: whatever is left live in it, its server is dead
        assert elsewhere.status == "lost" and (await second.store.stats())["sessions_active"] == 0
    assert await ask_name(second, s.id) == ALICE


async def test_restored_session_keeps_tenant_and_metadata(start_supervisor):
    first = await start_supervisor()
    s = await first.get_or_create(None, "t1", {"website_domain": "example.com", "client_ip": "10.0.0.1"})
    await first.chat(s, "My name is Alice")
    await first.close()
    second = await start_supervisor()
    theirs = await second.get_or_create(s.id, "t2")  # another tenant's same id is its own, after a restart too
    assert (theirs.metadata, theirs.message_count) == ({}, 0)
    again = await second.get_or_create(s.id, "t1")
    assert again.metadata == {"website_domain": "example.com", "client_ip": "10.0.0.1"}
    assert again.message_count == 2


async def test_status_follows_the_process(start_supervisor):
    sup = await start_supervisor()
    s = await tell_alice(sup)
    with pytest.raises(errors.AgentDied):
        await sup.command(s, "crash", {"how": "exit"})
    await sup.settle_store()
    record = await sup.store.get_session(s.key)
    assert (record.status, record.end_reason) == (states.CRASHED, states.CRASHED)
    assert record.ended_at is not None
    assert await ask_name(sup, s.id) == ALICE
    record = await sup.store.get_session(s.key)
    assert record.ended_at is None and record.end_reason is None


async def test_retention_timer_deletes_ended_sessions(start_supervisor):
    sup = await start_supervisor(retention=0.2)
    purged = asyncio.get_running_loop().create_future()
    sup.events.subscribe(lambda e: e["type"] == "purged" and not purged.done() and purged.set_result(e))
    ended = await tell_alice(sup)
    live = await tell_alice(sup)
    await sup.remove(ended)
    event = await asyncio.wait_for(purged, 15)  # the timer runs every max(1 s, retention / 4)
    assert event["sessions"] == 1
    assert await sup.store.get_session(ended.key) is None
    assert await sup.store.history(ended.key) == []
    assert (await sup.store.get_session(live.key)).ended_at is None  # live sessions are never purged
    assert await ask_name(sup, live.id) == ALICE


async def test_purge_removes_data_at_once(start_supervisor):
    sup = await start_supervisor()
    s = await tell_alice(sup)
    kept = await tell_alice(sup)
    await sup.remove(s, purge=True)
    assert s.id not in sup.sessions
    assert await sup.store.get_session(s.key) is None
    assert await sup.store.history(s.key) == []
    # the id is free again: a new session with no memory of Alice
    assert await ask_name(sup, s.id) == "I don't know your name yet."
    assert await ask_name(sup, kept.id) == ALICE


async def test_stats_count_sessions_messages_and_tenants(start_supervisor):
    sup = await start_supervisor()
    a1 = await tell_alice(sup, tenant="a")
    await tell_alice(sup, tenant="a")
    b1 = await tell_alice(sup, tenant="b")
    await sup.chat(b1, "What is my name?")
    await sup.kill(a1)
    await sup.settle_store()
    stats = await sup.store.stats()  # what /admin/stats serves, beside this node's live counts
    assert stats["sessions_total"] == 3
    assert stats["sessions_active"] == 2
    assert stats["messages_total"] == 8
    assert stats["average_messages_per_session"] == pytest.approx(8 / 3)
    assert stats["by_tenant"]["a"] == {
        "sessions_total": 2, "sessions_active": 1, "messages_total": 4, "average_messages_per_session": 2.0,
    }
    assert stats["by_tenant"]["b"]["messages_total"] == 4
    assert sup.count() == 2 and dict(sup.live_by_tenant) == {"a": 1, "b": 1}


# ---------------------------------------------------------------- over HTTP


@pytest.fixture
async def start_app(aiohttp_client, make_config, new_store):
    """Start a corral app (a test client for it) on the test's database."""

    async def start(**overrides):
        client = await aiohttp_client(create_app(make_config(**overrides), store=new_store()))
        client.sup = client.app[SUPERVISOR]
        return client

    return start


async def http_chat(client, message: str, session_id: str | None = None) -> dict:
    """POST /api/chat; the JSON answer (asserting 200)."""
    body = {"message": message} if session_id is None else {"message": message, "session_id": session_id}
    resp = await client.post("/api/chat", json=body)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def http_command(client, sid: str, command: str, args: dict):
    """POST /api/mcp-command; the response."""
    return await client.post("/api/mcp-command", json={"command": command, "args": args, "session_id": sid})


async def test_http_history_survives_every_way_a_process_goes(start_app):
    client = await start_app(idle_timeout=0.5, memory_limit=64 * 1024 * 1024, max_restarts=10)
    sup = client.sup
    sid = (await http_chat(client, "My name is Alice"))["session_id"]

    async def ask():
        answer = await http_chat(client, "What is my name?", sid)
        assert answer["reply"] == ALICE

    for how in ("exit", "signal", "exception"):
        resp = await http_command(client, sid, "crash", {"how": how})
        assert resp.status == 502 and (await resp.json())["error"]["code"] == "agent_crashed"
        await ask()
    if sup.limiter.describe().get("mechanism") not in (None, "none"):
        resp = await http_command(client, sid, "allocate", {"mib": 256})
        assert resp.status == 502 and (await resp.json())["error"]["code"] == "agent_oom"
        await ask()
    s = sup.sessions[sid]
    resp = await client.delete(f"/admin/sessions/{sid}")  # admin kill; history kept
    assert resp.status == 202
    await wait_for_state(sup, s, states.KILLED)
    await ask()
    await wait_for_state(sup, sup.sessions[sid], states.REAPED)
    await ask()
    state = await (await client.get("/api/state", params={"session_id": sid})).json()
    assert [m["content"] for m in state["messages"][-2:]] == ["What is my name?", ALICE]


async def test_http_purge_and_stats(start_app):
    client = await start_app()
    sid = (await http_chat(client, "My name is Alice"))["session_id"]
    kept = (await http_chat(client, "My name is Alice", "kept"))["session_id"]
    stats = await (await client.get("/admin/stats")).json()
    assert (stats["sessions_total"], stats["sessions_active"], stats["messages_total"]) == (2, 2, 4)
    assert stats["average_messages_per_session"] == 2.0
    resp = await client.delete(f"/api/sessions/{sid}", params={"purge": "true"})
    assert resp.status == 200 and (await resp.json())["purged"] is True
    assert await client.sup.store.get_session(sid) is None and await client.sup.store.history(sid) == []
    stats = await (await client.get("/admin/stats")).json()
    assert (stats["sessions_total"], stats["messages_total"]) == (1, 2)
    assert (await http_chat(client, "What is my name?", sid))["reply"] == "I don't know your name yet."
    assert (await http_chat(client, "What is my name?", kept))["reply"] == ALICE


async def test_http_history_survives_a_server_restart(start_app):
    first = await start_app()
    sid = (await http_chat(first, "My name is Alice"))["session_id"]
    await first.close()
    second = await start_app()
    answer = await http_chat(second, "What is my name?", sid)
    assert answer["reply"] == ALICE and answer["message_count"] == 4


@pytest.fixture
async def pg_app(aiohttp_client, make_config):
    """A corral app on its own PostgreSQL schema (the store under it is broken by the test)."""
    if not POSTGRES_URL:
        pytest.skip("CORRAL_TEST_DATABASE_URL is not set (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    schema = new_schema()
    client = await aiohttp_client(create_app(make_config(), store=pg_store(schema)))
    client.sup = client.app[SUPERVISOR]
    yield client
    await client.close()  # before the schema goes, so closing sessions can record their ends
    await drop_schema(schema)


async def test_http_store_gone_at_runtime_is_503(pg_app):
    client = pg_app
    sid = (await http_chat(client, "My name is Alice"))["session_id"]
    store = client.sup.store
    await drop_schema(store.schema)
    for body in ({"message": "What is my name?", "session_id": sid}, {"message": "hello"}):
        resp = await client.post("/api/chat", json=body)
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "unavailable"
        assert "Retry-After" in resp.headers
    for path in ("/api/state", "/admin/stats"):  # routes that read the store directly
        resp = await client.get(path, params={"session_id": sid})
        error = (await resp.json())["error"]
        assert resp.status == 503 and error["code"] == "unavailable" and store.schema not in error["message"]
    assert (await client.get("/health")).status == 200
    # The store comes back (here: its schema is migrated again) and the server serves again.
    await store.close()
    await store.open()
    assert (await http_chat(client, "My name is Bob", "bob"))["reply"] == "Got it: your name is Bob."


async def test_http_broken_connections_heal(pg_app):
    client = pg_app
    store = client.sup.store
    sid = (await http_chat(client, "My name is Alice"))["session_id"]
    conn = await asyncpg.connect(POSTGRES_URL)
    statuses, killed = [], 0
    try:
        for _ in range(5):
            killed += await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
                store.application_name)
            # a dead pooled connection costs at most a 503, never a 500 or a crash
            chats = [client.post("/api/chat", json={"message": "What is my name?", "session_id": sid})
                     for _ in range(3)]
            for resp in await asyncio.gather(*chats):
                statuses.append(resp.status)
                if resp.status == 200:
                    assert (await resp.json())["reply"] == ALICE
    finally:
        await conn.close()
    assert killed >= 1 and set(statuses) <= {200, 503}
    assert (await http_chat(client, "What is my name?", sid))["reply"] == ALICE


async def test_http_sqlite_locked_at_runtime_is_503_then_serves_again(aiohttp_client, make_config, tmp_path):
    path = tmp_path / "locked.sqlite3"
    store = SQLiteStore(path, busy_timeout_ms=200)  # give up on the lock quickly
    client = await aiohttp_client(create_app(make_config(), store=store))
    sid = (await http_chat(client, "My name is Alice", "alice"))["session_id"]
    holder = sqlite3.connect(path, isolation_level=None)  # another process's writer, say a backup tool
    try:
        holder.execute("BEGIN EXCLUSIVE")
        resp = await client.post("/api/chat", json={"message": "What is my name?", "session_id": sid})
        assert resp.status == 503
        error = (await resp.json())["error"]
        assert error["code"] == "unavailable" and str(tmp_path) not in error["message"]
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    assert (await http_chat(client, "What is my name?", sid))["reply"] == ALICE
