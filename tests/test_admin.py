"""The admin API over real HTTP: list, inspect, kill, interrupt, stats."""

import os

import pytest
from tests.apihelpers import (
    ADMIN, ALICE, BOB, TENANTS, assert_error, interrupted, json_of, start, started_sleep, supervisor_of,
)

from tests.conftest import wait_for_state
from corral.web.keys import BACKGROUND


class FixedProcStats:
    """Stands in for the operators' process statistics: the hook's contract is ``for_session(s) -> dict``."""

    def for_session(self, session) -> dict:
        """A fixed figure for sessions with a process."""
        return {"rss_bytes": 1234 if session.pid else None}


@pytest.fixture
async def client(aiohttp_client, make_config, tmp_path):
    """Tenants alice and bob, the admin token, and a process-stats hook."""
    return await start(aiohttp_client, make_config, tmp_path, tenants=TENANTS, procstats=FixedProcStats())


async def open_sessions(client) -> None:
    """alice-1 (2 messages), alice-2 (4 messages), bob-1 (started, no messages)."""
    for sid, count in (("alice-1", 1), ("alice-2", 2)):
        for _ in range(count):
            await json_of(await client.post("/api/chat", json={"message": "hi", "session_id": sid}, headers=ALICE), 200)
    await json_of(await client.post("/api/sessions", json={"session_id": "bob-1"}, headers=BOB), 201)


async def listed(client, **params) -> dict:
    """GET /admin/sessions with the admin token."""
    return await json_of(await client.get("/admin/sessions", params=params, headers=ADMIN), 200)


async def test_list_rows_filters_and_pages(client):
    """Rows carry pid, tenant, state, times, idle, restarts, messages and the process-stats fields."""
    await open_sessions(client)
    rows = (await listed(client))["sessions"]
    assert [r["session_id"] for r in rows] == ["bob-1", "alice-2", "alice-1"]  # newest first
    row = rows[1]
    assert row["tenant"] == "alice" and row["state"] == "idle" and row["message_count"] == 4
    assert row["pid"] and row["restarts"] == 0 and row["rss_bytes"] == 1234 and row["idle_seconds"] >= 0
    assert row["last_activity"] >= row["created_at"]
    assert {r["session_id"] for r in (await listed(client, tenant="alice"))["sessions"]} == {"alice-1", "alice-2"}
    assert (await listed(client, state="busy"))["sessions"] == []
    assert len((await listed(client, state="live"))["sessions"]) == 3
    page = await listed(client, limit="1", offset="1")
    assert [r["session_id"] for r in page["sessions"]] == ["alice-2"] and page["next_offset"] == 2
    assert (await listed(client, limit="2", offset="1"))["next_offset"] is None


async def test_list_shows_ended_sessions_from_the_store(client):
    """A session ended and forgotten by the supervisor still lists, from the store, by its state."""
    await open_sessions(client)
    await json_of(await client.delete("/api/sessions/alice-1", headers=ALICE), 200)
    ended = (await listed(client, state="ended"))["sessions"]
    assert [(r["session_id"], r["pid"], r["live"]) for r in ended] == [("alice-1", None, False)]
    assert {r["session_id"] for r in (await listed(client))["sessions"]} == {"alice-1", "alice-2", "bob-1"}


async def test_list_filters_sessions_lost_with_their_server(client):
    """``lost`` is a state the API reports (a session whose server died): ?state=lost lists them."""
    await open_sessions(client)
    sup = supervisor_of(client)
    await json_of(await client.delete("/api/sessions/alice-1", headers=ALICE), 200)
    await sup.settle_store()
    await sup.store.set_status("alice/alice-1", "lost", end_reason="server_died", ended=True)  # as a restart leaves it
    lost = (await listed(client, state="lost"))["sessions"]
    assert [(r["session_id"], r["state"], r["end_reason"]) for r in lost] == [("alice-1", "lost", "server_died")]
    spec = await json_of(await client.get("/api/openapi.json"), 200)
    assert "lost" in spec["components"]["schemas"]["SessionView"]["properties"]["state"]["enum"]


async def test_list_refuses_bad_filters(client):
    """Unknown states and bad paging are 400."""
    await assert_error(await client.get("/admin/sessions", params={"state": "asleep"}, headers=ADMIN), 400, "wrong_type")
    await assert_error(await client.get("/admin/sessions", params={"limit": "0"}, headers=ADMIN), 400, "wrong_type")
    await assert_error(await client.get("/admin/sessions", params={"offset": "-1"}, headers=ADMIN), 400, "wrong_type")
    await assert_error(await client.get("/admin/sessions", params={"offset": "9" * 30}, headers=ADMIN), 400, "wrong_type")


async def test_inspect_and_kill(client):
    """DELETE kills: 202 while stopping, then the process is gone; the tenant's next request respawns it."""
    await open_sessions(client)
    row = await json_of(await client.get("/admin/sessions/alice-2", headers=ADMIN), 200)
    pid = row["pid"]
    response = await client.delete("/admin/sessions/alice-2", headers=ADMIN)
    assert (await json_of(response, 202))["state"] == "stopping"
    sup = supervisor_of(client)
    if "alice/alice-2" in sup.sessions:
        await wait_for_state(sup, sup.sessions["alice/alice-2"], "killed", timeout=30)
    gone = await json_of(await client.get("/admin/sessions/alice-2", headers=ADMIN), 200)
    assert gone["state"] == "killed" and gone["pid"] is None and not gone["live"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped by the zygote: no such process
    again = await json_of(await client.delete("/admin/sessions/alice-2", headers=ADMIN), 200)
    assert again["state"] == "killed"
    back = await json_of(await client.post("/api/chat", json={"message": "hi", "session_id": "alice-2"}, headers=ALICE), 200)
    assert back["state"] == "idle" and back["message_count"] == 6
    await assert_error(await client.get("/admin/sessions/nobody", headers=ADMIN), 404, "session_not_found")
    await assert_error(await client.delete("/admin/sessions/bad%20id", headers=ADMIN), 400, "bad_session_id")


async def test_kill_with_purge_deletes_the_data(client):
    """DELETE ?purge=true kills the session and then deletes its record and messages."""
    await open_sessions(client)
    sup = supervisor_of(client)
    session = sup.sessions["alice/alice-1"]
    await json_of(await client.delete("/admin/sessions/alice-1", params={"purge": "1"}, headers=ADMIN), 202)
    await wait_for_state(sup, session, "killed", timeout=30)
    await client.app[BACKGROUND].wait(30)  # the purge after the kill
    await assert_error(await client.get("/admin/sessions/alice-1", headers=ADMIN), 404, "session_not_found")


async def test_admin_interrupt(client):
    """POST /admin/sessions/{id}/interrupt ends a sleep turn; the waiting call says interrupted."""
    call = await started_sleep(client, "bob-sleeps", headers=BOB)
    response = await interrupted(client, call, "/admin/sessions/bob-sleeps/interrupt", headers=ADMIN)
    assert (await json_of(response, 200))["status"] == "interrupted"
    idle = await json_of(await client.post("/admin/sessions/bob-sleeps/interrupt", headers=ADMIN), 200)
    assert idle == {"session_id": "bob-sleeps", "tenant": "bob", "state": "idle", "interrupted": False}


async def test_the_admin_tells_two_tenants_same_id_apart_by_tenant(client):
    """Alice's and Bob's ``twin`` are two rows; the admin names one with ?tenant= (409 without, 404 for neither)."""
    for who in (ALICE, BOB):
        await json_of(await client.post("/api/chat", json={"message": "hi", "session_id": "twin"}, headers=who), 200)
    rows = (await listed(client))["sessions"]
    assert sorted(r["tenant"] for r in rows if r["session_id"] == "twin") == ["alice", "bob"]
    await assert_error(await client.get("/admin/sessions/twin", headers=ADMIN), 409, "ambiguous_session")
    await assert_error(await client.get("/admin/sessions/twin", params={"tenant": "nobody"}, headers=ADMIN),
                       404, "session_not_found")
    bobs = await json_of(await client.get("/admin/sessions/twin", params={"tenant": "bob"}, headers=ADMIN), 200)
    assert bobs["tenant"] == "bob"
    killed = await client.delete("/admin/sessions/twin", params={"tenant": "bob"}, headers=ADMIN)
    assert killed.status == 202
    sup = supervisor_of(client)
    assert await wait_for_state(sup, sup.sessions["bob/twin"], "killed", timeout=30) == "killed"
    assert sup.sessions["alice/twin"].state == "idle"
    # the one left live is found without naming its tenant once Bob's is gone from memory and the store
    await json_of(await client.delete("/admin/sessions/twin", params={"tenant": "bob", "purge": "true"},
                                      headers=ADMIN), 200)
    assert (await json_of(await client.get("/admin/sessions/twin", headers=ADMIN), 200))["tenant"] == "alice"


async def test_stats(client):
    """Totals, live count, by state, by tenant with the average messages per session."""
    await open_sessions(client)
    stats = await json_of(await client.get("/admin/stats", headers=ADMIN), 200)
    assert stats["sessions_total"] == 3 and stats["sessions_active"] == 3 and stats["live_sessions"] == 3
    assert stats["by_state"] == {"idle": 3} and stats["messages_total"] == 6
    alice = stats["by_tenant"]["alice"]
    assert alice["sessions_total"] == 2 and alice["average_messages_per_session"] == 3.0 and alice["live"] == 2
    assert stats["by_tenant"]["bob"]["average_messages_per_session"] == 0.0
    assert stats["counters"]["spawns"] == 3


async def test_only_an_admin_clears_a_failed_session(aiohttp_client, make_config, tmp_path):
    """Past max_restarts a session is failed (503); the tenant's DELETE keeps it so, the admin's clears it."""
    client = await start(aiohttp_client, make_config, tmp_path, tenants=TENANTS, max_restarts=0)
    crash = {"command": "crash", "args": {"how": "exit"}, "session_id": "alice-crashy"}
    await assert_error(await client.post("/api/mcp-command", json=crash, headers=ALICE), 502, "agent_crashed")
    hello = {"message": "hello", "session_id": "alice-crashy"}
    response = await client.post("/api/chat", json=hello, headers=ALICE)
    await assert_error(response, 503, "session_failed")
    assert int(response.headers["Retry-After"]) >= 1
    assert (await json_of(await client.delete("/api/sessions/alice-crashy", headers=ALICE), 200))["state"] == "failed"
    await assert_error(await client.post("/api/chat", json=hello, headers=ALICE), 503, "session_failed")
    assert (await json_of(await client.delete("/admin/sessions/alice-crashy", headers=ADMIN), 200))["state"] == "failed"
    assert (await json_of(await client.post("/api/chat", json=hello, headers=ALICE), 200))["reply"] == "You said: hello"


async def test_health_lists_the_sandbox_layers_to_the_admin_only(client):
    """Which layers are missing (and why) is for the operator, not for tenants or anonymous callers."""
    public = await json_of(await client.get("/health"), 200)
    as_tenant = await json_of(await client.get("/health", headers=ALICE), 200)
    as_admin = await json_of(await client.get("/health", headers=ADMIN), 200)
    assert "sandbox" not in public and "sandbox" not in as_tenant
    layers = as_admin["sandbox"]["layers"]
    assert as_admin["sandbox"]["mode"] == "auto" and {"landlock", "seccomp", "uid"} <= set(layers)
    assert all(("detail" if layer["in_force"] else "reason") in layer for layer in layers.values())
