"""A server SIGKILLed and started again on the same port serves its sessions at once (issue 20, item 3).

On PostgreSQL the dead run's row in ``nodes`` would otherwise keep its sessions for the rest of its
lease (503 ``session_moved``, naming the dead run); the new run holds the port and the node lock,
so it ends that row at start (supervisor/cluster/membership.py). SQLite's store ends its orphans.
"""

import asyncio
import signal
from urllib.parse import urlsplit

import pytest

from tests.chaos_kit import call, client_session
from tests.cluster_kit import POSTGRES_URL, create_database, drop_database
from tests.procs import descendants, own_sandbox_uids, start_server, wait_gone

LEASE = "60"  # far longer than the test: any wait for the dead run's lease would fail it


@pytest.fixture(params=["sqlite", "postgresql"])
async def store_args(request):
    """The flags of a server on each store (PostgreSQL: a database of its own)."""
    if request.param == "sqlite":
        yield own_sandbox_uids()
        return
    if not POSTGRES_URL:
        pytest.skip("CORRAL_TEST_DATABASE_URL is not set (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    name, url = await create_database()
    try:
        yield ("--database-url", url, "--node-lease", LEASE, *own_sandbox_uids())
    finally:
        await drop_database(name)


async def test_a_crash_restart_on_the_same_port_serves_its_sessions_at_once(tmp_path, store_args):
    proc, url = await asyncio.to_thread(start_server, tmp_path, *store_args)
    async with client_session() as http:
        for sid in ("r1", "r2"):
            status, body = await call(http, "POST", url + "/api/chat", json={"message": f"my name is {sid}", "session_id": sid})
            assert status == 200, body
        children = descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        assert await asyncio.to_thread(wait_gone, children, 2.0) == []
        if "--database-url" in store_args:  # another node of the cluster reads the dead owner's session from the store
            (tmp_path / "other").mkdir()
            other, other_url = await asyncio.to_thread(start_server, tmp_path / "other", *store_args)
            try:
                status, state = await call(http, "GET", other_url + "/api/state?session_id=r1")
                assert status == 200, state  # before: 503 owner_unreachable until the dead run's lease is over
                assert len(state["messages"]) == 2
            finally:
                other.terminate()
                await asyncio.to_thread(other.wait, 30)

        proc, url = await asyncio.to_thread(start_server, tmp_path, *store_args, port=urlsplit(url).port)
        try:
            status, state = await call(http, "GET", url + "/api/state?session_id=r1")
            assert status == 200, state  # before: 503 session_moved, "owned by node" (the dead run)
            assert [m["content"] for m in state["messages"]] == ["my name is r1", "Got it: your name is r1."]
            status, body = await call(http, "POST", url + "/api/chat", json={"message": "what is my name?", "session_id": "r2"})
            assert (status, body.get("reply")) == (200, "Your name is r2."), body
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)
