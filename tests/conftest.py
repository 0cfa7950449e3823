"""Shared fixtures: real supervisors, real agent processes, real aiohttp servers."""

import asyncio
import os

import asyncpg
import pytest

from corral.supervisor import Config, Supervisor
from corral.supervisor.logs import configure
from tests.procs import TEST_UID_RANGE

configure("warning", json=True)

# Tests that need PostgreSQL read its address from here; .ci/run sets it and checks it is reachable.
POSTGRES_URL = os.environ.get("CORRAL_TEST_DATABASE_URL")


async def drop_schema(schema: str) -> None:
    """Remove a test's PostgreSQL schema and everything in it."""
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


class AgentSays:
    """Waits for an agent to print a line (its captured stdout, published as ``agent_output`` events).

    How a test learns that an agent's hook has begun: a sandboxed agent can reach no socket or file
    of the test's, but what it prints always arrives, on events rather than by polling.
    """

    def __init__(self, sup, line: str):
        self.line = line
        self.heard = asyncio.get_running_loop().create_future()
        self._unsubscribe = sup.events.subscribe(self._on_event, types=("agent_output",))

    def _on_event(self, event) -> None:
        if event.get("line") == self.line and not self.heard.done():
            self.heard.set_result(event)

    async def wait(self, timeout: float = 30.0) -> dict:
        """The event of the line, once printed; then stop listening."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.heard), timeout)
        finally:
            self._unsubscribe()


@pytest.fixture
def make_config(tmp_path):
    """Build a Config for tests: data and run dirs under tmp_path, short timeouts."""

    def make(**overrides) -> Config:
        values = dict(
            data_dir=tmp_path / "data",
            run_dir=tmp_path / "run",
            stop_timeout=2.0,
            spawn_timeout=10.0,
            request_timeout=30.0,
            rate_limit=0,
            sandbox_uid_range=TEST_UID_RANGE,
        )
        values.update(overrides)
        return Config(**values)

    return make


@pytest.fixture
async def make_supervisor(make_config):
    """Start supervisors for a test; every one is closed afterwards."""
    started = []

    async def make(store=None, **overrides) -> Supervisor:
        sup = Supervisor(make_config(**overrides), store=store)
        await sup.start()
        started.append(sup)
        return sup

    yield make
    for sup in started:
        await sup.close()


@pytest.fixture
async def sup(make_supervisor):
    """One started supervisor with default test settings."""
    return await make_supervisor()


# The demo agent written both ways: behaviour tests run for each, since both must behave the same.
DEMO_AGENTS = {"sync": "corral.agent_proc.demo:DemoAgent", "async": "corral.agent_proc.demo:AsyncDemoAgent"}


@pytest.fixture(params=sorted(DEMO_AGENTS))
def demo_agent(request) -> str:
    """The demo agent's class path, once with sync hooks and once with async ones."""
    return DEMO_AGENTS[request.param]


@pytest.fixture
async def demo_sup(make_supervisor, demo_agent):
    """A started supervisor running the sync, then the async demo agent."""
    return await make_supervisor(agent=demo_agent)


async def wait_for_state(sup, session, states, timeout=10.0):
    """Wait (on events, not polling) until a session reaches one of ``states``."""
    if isinstance(states, str):
        states = {states}
    if session.state in states:
        return session.state
    reached = asyncio.get_running_loop().create_future()

    def on_event(event):
        if event["type"] == "state" and event["state"] in states and not reached.done():
            reached.set_result(event["state"])

    unsubscribe = sup.events.subscribe_session(session.key, on_event)
    try:
        return await asyncio.wait_for(reached, timeout)
    finally:
        unsubscribe()
