"""History survives whatever takes a session's process away, on SQLite and on PostgreSQL.

Real supervisors, real agent processes, real databases: a session is told "my name is Alice",
loses its process (idle reaping, each kind of crash, an OOM kill, an admin kill, a restart of
the supervisor), and the demo agent that comes back still answers "Your name is Alice.".
"""

import asyncio
import uuid

import asyncpg
import pytest

from supervisor import Supervisor, errors, states
from supervisor.store import create_store
from tests.conftest import POSTGRES_URL, wait_for_state

ALICE = "Your name is Alice."

BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.skipif(
        not POSTGRES_URL,
        reason="CORRAL_TEST_DATABASE_URL is not set (e.g. postgresql://postgres@127.0.0.1:5432/test)")),
]


@pytest.fixture(params=BACKENDS)
async def new_store(request, tmp_path):
    """Factory of unopened stores that all share one database (one SQLite file / one PG schema)."""
    schema = f"corral_persist_{uuid.uuid4().hex[:12]}"

    def new():
        if request.param == "sqlite":
            return create_store(None, tmp_path / "data")
        return create_store(POSTGRES_URL, schema=schema)

    new.backend = request.param
    yield new
    if request.param == "postgresql":
        await drop_schema(schema)


async def drop_schema(schema: str) -> None:
    """Remove a test's PostgreSQL schema."""
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def start_supervisor(make_config, new_store):
    """Start supervisors on the test's database; all are closed afterwards."""
    started = []

    async def start(**overrides) -> Supervisor:
        sup = Supervisor(make_config(**overrides), store=new_store())
        await sup.start()
        started.append(sup)
        return sup

    yield start
    for sup in started:
        await sup.close()


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


def record_states(sup: Supervisor, session_id: str) -> list[str]:
    """The states a session goes through from now on (filled in by events)."""
    seen: list[str] = []
    sup.events.subscribe_session(session_id, lambda e: seen.append(e["state"]) if e["type"] == "state" else None)
    return seen


async def test_history_restored_after_idle_reaping(start_supervisor):
    sup = await start_supervisor(idle_timeout=0.3)
    s = await tell_alice(sup)
    pid = s.pid
    assert await wait_for_state(sup, s, states.REAPED) == states.REAPED
    assert await ask_name(sup, s.id) == ALICE
    assert sup.sessions[s.id].pid != pid


@pytest.mark.parametrize("how", ["exit", "signal", "exception"])
async def test_history_restored_after_crash(start_supervisor, how):
    sup = await start_supervisor()
    s = await tell_alice(sup)
    seen = record_states(sup, s.id)
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
    seen = record_states(sup, s.id)
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
    history = await second.store.history(s.id)
    assert [(m.seq, m.role) for m in history] == [(1, "user"), (2, "assistant"), (3, "user"), (4, "assistant")]
    assert history[-1].content == ALICE


async def test_restored_session_keeps_tenant_and_metadata(start_supervisor):
    first = await start_supervisor()
    s = await first.get_or_create(None, "t1", {"website_domain": "example.com", "client_ip": "10.0.0.1"})
    await first.chat(s, "My name is Alice")
    await first.close()
    second = await start_supervisor()
    with pytest.raises(errors.SessionNotFound):
        await second.get_or_create(s.id, "t2")  # another tenant cannot take it over after a restart
    again = await second.get_or_create(s.id, "t1")
    assert again.metadata == {"website_domain": "example.com", "client_ip": "10.0.0.1"}
    assert again.message_count == 2


async def test_status_follows_the_process(start_supervisor):
    sup = await start_supervisor()
    s = await tell_alice(sup)
    with pytest.raises(errors.AgentDied):
        await sup.command(s, "crash", {"how": "exit"})
    await sup.settle_store()
    record = await sup.store.get_session(s.id)
    assert (record.status, record.end_reason) == (states.CRASHED, states.CRASHED)
    assert record.ended_at is not None
    assert await ask_name(sup, s.id) == ALICE
    record = await sup.store.get_session(s.id)
    assert record.ended_at is None and record.end_reason is None
