"""The seed endpoints and /api/sessions over real HTTP, real agents, and every error code."""

import asyncio

import pytest
from tests.apihelpers import assert_error, interrupted, json_of, start, started_sleep, supervisor_of

from tests.conftest import wait_for_state


@pytest.fixture
async def client(aiohttp_client, make_config, tmp_path):
    """A dev-mode app (no keys, loopback) with default test settings."""
    return await start(aiohttp_client, make_config, tmp_path)


@pytest.fixture
async def demo_client(aiohttp_client, make_config, tmp_path, demo_agent):
    """The same, running the sync and then the async demo agent."""
    return await start(aiohttp_client, make_config, tmp_path, agent=demo_agent)


async def chat(client, message: str, session_id: str | None = None, **kwargs) -> dict:
    """POST /api/chat and return the 200 body."""
    body = {"message": message}
    if session_id is not None:
        body["session_id"] = session_id
    return await json_of(await client.post("/api/chat", json=body, **kwargs), 200)


async def test_two_sessions_stay_isolated(demo_client):
    """The seeds' Alice/Bob exchange: each session remembers only what it was told."""
    client = demo_client
    assert (await chat(client, "my name is Alice", "s-alice"))["reply"] == "Got it: your name is Alice."
    assert (await chat(client, "my name is Bob", "s-bob"))["reply"] == "Got it: your name is Bob."
    assert (await chat(client, "what is my name?", "s-alice"))["reply"] == "Your name is Alice."
    bob = await chat(client, "what is my name?", "s-bob")
    assert bob["reply"] == "Your name is Bob." and bob["agent_state"]["facts"] == {"name": "Bob"}
    state = await json_of(await client.get("/api/state", params={"session_id": "s-alice"}), 200)
    assert [m["content"] for m in state["messages"]] == [
        "my name is Alice", "Got it: your name is Alice.", "what is my name?", "Your name is Alice.",
    ]
    sup = supervisor_of(client)
    assert sup.sessions["s-alice"].pid != sup.sessions["s-bob"].pid


async def test_client_without_id_gets_one_and_keeps_it_via_cookie(client):
    """No id: a fresh uuid4 in body, header and cookie; the cookie brings the client back."""
    response = await client.post("/api/chat", json={"message": "my name is Carol"})
    first = await json_of(response, 200)
    sid = first["session_id"]
    assert len(sid) == 36 and response.headers["X-Session-Id"] == sid
    assert response.cookies["corral_session"].value == sid
    again = await chat(client, "what is my name?")  # the cookie jar sends corral_session
    assert again["session_id"] == sid and again["reply"] == "Your name is Carol."
    state = await json_of(await client.get("/api/state"), 200)
    assert state["session_id"] == sid and state["message_count"] == 4


async def test_session_id_sources_in_order(client):
    """Body beats query beats X-Session-Id header beats cookie (each answer re-sets the cookie)."""
    async def named(**kwargs) -> str:
        """The session id /api/interrupt resolved for these request parts."""
        return (await json_of(await client.post("/api/interrupt", **kwargs), 200))["session_id"]

    header = {"X-Session-Id": "from-header"}
    assert await named(json={"session_id": "from-body"}, params={"session_id": "q"}, headers=header) == "from-body"
    assert await named(json={}, params={"session_id": "from-query"}, headers=header) == "from-query"
    jar, url = client.session.cookie_jar, client.make_url("/")
    jar.update_cookies({"corral_session": "from-cookie"}, response_url=url)
    assert await named(headers=header) == "from-header"
    jar.update_cookies({"corral_session": "from-cookie"}, response_url=url)
    assert await named() == "from-cookie"


async def test_state_reads_the_store_without_spawning(client):
    """A new id has an empty state; an ended session answers from the store and stays down."""
    fresh = await json_of(await client.get("/api/state", params={"session_id": "nobody-yet"}), 200)
    assert fresh == {"session_id": "nobody-yet", "state": None, "is_processing": False, "message_count": 0,
                     "agent_state": {}, "messages": []}
    await chat(client, "my name is Dora", "s-dora")
    ended = await json_of(await client.delete("/api/sessions/s-dora"), 200)
    assert ended["state"] == "ended"
    state = await json_of(await client.get("/api/state", params={"session_id": "s-dora", "limit": "1"}), 200)
    assert state["state"] == "ended" and state["message_count"] == 2 and not state["is_processing"]
    assert [m["role"] for m in state["messages"]] == ["assistant"]
    sup = supervisor_of(client)
    assert sup.count() == 0 and "s-dora" not in sup.sessions and "nobody-yet" not in sup.sessions


async def test_wait_false_answers_202_and_the_reply_is_kept(client):
    """wait:false returns at once; the reply is committed and shows up in the state."""
    response = await client.post("/api/chat", json={"message": "my name is Eve", "session_id": "s-eve", "wait": False})
    assert (await json_of(response, 202))["status"] == "accepted"
    # Same mailbox: the second turn runs after the first, whose reply is committed meanwhile.
    assert (await chat(client, "what is my name?", "s-eve"))["reply"] == "Your name is Eve."
    state = await json_of(await client.get("/api/state", params={"session_id": "s-eve"}), 200)
    assert "Got it: your name is Eve." in [m["content"] for m in state["messages"]]


async def test_interrupt_ends_a_sleep_turn(demo_client):
    """POST /api/interrupt during a sleep: the waiting mcp-command returns status interrupted."""
    client = demo_client
    call = await started_sleep(client, "s-sleepy")
    other = await chat(client, "still here", "s-awake")  # another session is not held up
    assert other["reply"] == "You said: still here"
    response = await interrupted(client, call, "/api/interrupt", json={"session_id": "s-sleepy"})
    body = await json_of(response, 200)
    assert body["status"] == "interrupted" and body["result"] is None
    assert (await chat(client, "hello", "s-sleepy"))["reply"] == "You said: hello"  # the process lives on


async def test_system_and_mcp_command_reach_the_right_session(demo_client):
    """A system message and a command land in the named session only."""
    client = demo_client
    await chat(client, "my colour is green", "s-one")
    await chat(client, "my colour is red", "s-two")
    system = await json_of(await client.post("/api/system", json={"message": "network=testnet", "session_id": "s-one"}), 200)
    assert system["status"] == "done" and system["reply"] == "noted"
    assert system["agent_state"]["system_notes"] == ["network=testnet"]
    facts = await json_of(await client.post("/api/mcp-command", json={"command": "facts", "session_id": "s-two"}), 200)
    assert facts["result"] == {"colour": "red"}
    two = await json_of(await client.get("/api/state", params={"session_id": "s-two"}), 200)
    assert two["agent_state"]["system_notes"] == []


async def test_sessions_create_inspect_end_purge(client):
    """POST creates and spawns, GET inspects, DELETE ends, ?purge=true deletes the data."""
    response = await client.post("/api/sessions", json={"session_id": "s-new"})
    created = await json_of(response, 201)
    assert response.headers["Location"] == "/api/sessions/s-new" and created["state"] == "idle" and created["live"]
    assert (await json_of(await client.post("/api/sessions", json={"session_id": "s-new"}), 200))["live"]
    generated = await json_of(await client.post("/api/sessions"), 201)
    assert len(generated["session_id"]) == 36
    await chat(client, "hi", "s-new")
    detail = await json_of(await client.get("/api/sessions/s-new"), 200)
    assert detail["message_count"] == 2 and detail["last_activity"] >= detail["created_at"]
    ended = await json_of(await client.delete("/api/sessions/s-new"), 200)
    assert ended == {"session_id": "s-new", "state": "ended", "purged": False}
    assert (await json_of(await client.get("/api/sessions/s-new"), 200))["state"] == "ended"
    assert (await json_of(await client.delete("/api/sessions/s-new", params={"purge": "true"}), 200))["purged"]
    await assert_error(await client.get("/api/sessions/s-new"), 404, "session_not_found")



async def test_delete_records_the_end_of_a_session_a_gone_server_left_live(client):
    """A session stored live by a server that is gone (no process anywhere) ends when its owner deletes it."""
    sup = supervisor_of(client)
    await sup.store.upsert_session("s-left", tenant="default", agent="gone:Agent", status="idle", node="gone-node")
    assert (await json_of(await client.get("/api/sessions/s-left"), 200))["state"] == "idle"
    ended = await json_of(await client.delete("/api/sessions/s-left"), 200)
    assert ended == {"session_id": "s-left", "state": "ended", "purged": False}
    record = await sup.store.get_session("s-left")
    assert record.status == "ended" and record.end_reason == "ended" and record.ended_at is not None
    assert "s-left" not in sup.sessions  # nothing was started or registered for it

# ---------------------------------------------------------------- errors, provoked for real


async def test_400_malformed_wrong_missing_and_bad_ids(client):
    """Malformed JSON, wrong types, missing fields and bad ids are 400 with a code, never a 500."""
    post = client.post
    await assert_error(await post("/api/chat", data=b"{not json"), 400, "malformed_json")
    await assert_error(await post("/api/chat", data=b"[1, 2]"), 400, "malformed_json")
    await assert_error(await post("/api/chat", data=b"[" * 100_000), 400, "malformed_json")
    await assert_error(await post("/api/chat", json={"message": 5}), 400, "wrong_type")
    await assert_error(await post("/api/chat", json={"message": "hi", "wait": "yes"}), 400, "wrong_type")
    await assert_error(await post("/api/chat", data=b'{"message": "\\ud800"}'), 400, "wrong_type")
    await assert_error(await post("/api/chat", json={}), 400, "missing_field")
    await assert_error(await post("/api/mcp-command", json={"args": {}}), 400, "missing_field")
    await assert_error(await post("/api/system", json={"session_id": "s"}), 400, "missing_field")
    await assert_error(await post("/api/mcp-command", json={"command": "x", "args": 2**70}), 400, "wrong_type")
    await assert_error(await post("/api/chat", json={"message": "hi", "session_id": "bad id!"}), 400, "bad_session_id")
    await assert_error(await post("/api/chat", json={"message": "hi", "session_id": 7}), 400, "bad_session_id")
    await assert_error(await client.get("/api/state", params={"session_id": "x" * 129}), 400, "bad_session_id")
    await assert_error(await client.get("/api/state", headers={"X-Session-Id": "a/b"}), 400, "bad_session_id")
    await assert_error(await client.get("/api/sessions/bad%20id"), 400, "bad_session_id")
    await assert_error(await client.get("/api/state", params={"limit": "lots"}), 400, "wrong_type")
    await assert_error(await client.delete("/api/sessions/s", params={"purge": "maybe"}), 400, "wrong_type")
    await assert_error(await post("/api/mcp-command", json={"command": "nope", "session_id": "s-cmd"}), 400, "unknown_command")
    await assert_error(await post("/api/mcp-command", json={"command": "sleep", "args": {"seconds": -1}, "session_id": "s-cmd"}), 400, "bad_request")
    sup = supervisor_of(client)
    assert set(sup.sessions) == {"s-cmd"}  # refused requests left nothing behind


async def test_404_unknown_session(client):
    """The resource routes answer 404 for an id nobody created."""
    await assert_error(await client.get("/api/sessions/never-made"), 404, "session_not_found")
    await assert_error(await client.delete("/api/sessions/never-made"), 404, "session_not_found")


async def test_413_message_and_body_too_large(aiohttp_client, make_config, tmp_path):
    """A message over max_message_bytes, and a body over the request limit, are 413."""
    client = await start(aiohttp_client, make_config, tmp_path, max_message_bytes=1024)
    await assert_error(await client.post("/api/chat", json={"message": "x" * 1025, "session_id": "s-big"}), 413, "too_large")
    await assert_error(await client.post("/api/chat", json={"message": "x" * 20_000}), 413, "too_large")
    assert not supervisor_of(client).sessions
    assert (await json_of(await client.post("/api/chat", json={"message": "x" * 1000, "session_id": "s-big"}), 200))


async def test_429_rate_limit_with_retry_after(aiohttp_client, make_config, tmp_path):
    """Past the per-session rate limit: 429 rate_limited with Retry-After; other sessions are fine."""
    client = await start(aiohttp_client, make_config, tmp_path, rate_limit=0.01, rate_burst=1)
    await chat(client, "one", "s-rate")
    response = await client.post("/api/chat", json={"message": "two", "session_id": "s-rate"})
    await assert_error(response, 429, "rate_limited")
    assert int(response.headers["Retry-After"]) >= 1
    await chat(client, "one", "s-other")


async def test_429_mailbox_full_with_retry_after(aiohttp_client, make_config, tmp_path):
    """A full mailbox: 429 mailbox_full with Retry-After while the turn in flight runs on."""
    client = await start(aiohttp_client, make_config, tmp_path, mailbox_size=1)
    call = await started_sleep(client, "s-full")
    response = await client.post("/api/chat", json={"message": "queued?", "session_id": "s-full"})
    await assert_error(response, 429, "mailbox_full")
    assert response.headers["Retry-After"] == "1"
    assert (await json_of(await interrupted(client, call, "/api/interrupt", json={"session_id": "s-full"}), 200))["status"] == "interrupted"


async def test_502_agent_crashed_then_respawned_with_history(client):
    """The agent dies during the request: 502 agent_crashed; the next request respawns it."""
    await chat(client, "my name is Frank", "s-crash")
    crash = {"command": "crash", "args": {"how": "exit"}, "session_id": "s-crash"}
    await assert_error(await client.post("/api/mcp-command", json=crash), 502, "agent_crashed")
    assert (await chat(client, "what is my name?", "s-crash"))["reply"] == "Your name is Frank."
    assert supervisor_of(client).sessions["s-crash"].restarts


async def test_502_agent_oom(aiohttp_client, make_config, tmp_path):
    """The agent runs out of memory during the request: 502 agent_oom, and it comes back."""
    client = await start(aiohttp_client, make_config, tmp_path, memory_limit=96 * 1024 * 1024)
    hog = {"command": "allocate", "args": {"mib": 512}, "session_id": "s-oom"}
    await assert_error(await client.post("/api/mcp-command", json=hog), 502, "agent_oom")
    assert (await chat(client, "still alive?", "s-oom"))["reply"] == "You said: still alive?"


async def test_503_at_max_sessions_with_retry_after(aiohttp_client, make_config, tmp_path):
    """At max_sessions a new session is refused with 503 and Retry-After; the existing one is untouched."""
    client = await start(aiohttp_client, make_config, tmp_path, max_sessions=1)
    await chat(client, "first", "s-first")
    response = await client.post("/api/chat", json={"message": "second", "session_id": "s-second"})
    await assert_error(response, 503, "at_capacity")
    assert int(response.headers["Retry-After"]) >= 1
    await assert_error(await client.post("/api/sessions", json={"session_id": "s-third"}), 503, "at_capacity")
    assert (await chat(client, "again", "s-first"))["reply"] == "You said: again"


async def test_504_request_timeout_interrupts_the_turn(aiohttp_client, make_config, tmp_path):
    """A turn past request_timeout: 504 request_timeout, the turn is interrupted, the session serves on."""
    client = await start(aiohttp_client, make_config, tmp_path, request_timeout=1.0)
    await json_of(await client.post("/api/sessions", json={"session_id": "s-slow"}), 201)
    sleep = {"command": "sleep", "args": {"seconds": 600}, "session_id": "s-slow"}
    await assert_error(await client.post("/api/mcp-command", json=sleep), 504, "request_timeout")
    sup = supervisor_of(client)
    await wait_for_state(sup, sup.sessions["s-slow"], "idle", timeout=30)
    assert (await chat(client, "awake", "s-slow"))["reply"] == "You said: awake"


async def test_no_500_for_unknown_routes_and_methods(client):
    """Unknown paths and methods are JSON 404/405."""
    await assert_error(await client.get("/api/nothing-here"), 404, "not_found")
    await assert_error(await client.get("/api/chat"), 405, "method_not_allowed")
    await asyncio.gather(*(chat(client, f"n{i}", "s-many") for i in range(5)))  # concurrent turns queue up


async def test_a_background_task_that_fails_is_logged_not_dropped(client):
    """The app's background registry logs what a task raised (a client's own error it leaves alone)."""
    from structlog.testing import capture_logs

    from corral.supervisor.errors import SessionNotFound
    from corral.web.keys import BACKGROUND

    async def broken():
        raise RuntimeError("disk on fire")

    async def refused():
        raise SessionNotFound("gone")  # already answered to whoever asked

    with capture_logs() as logs:
        await asyncio.gather(client.app[BACKGROUND].spawn(broken()), client.app[BACKGROUND].spawn(refused()),
                             return_exceptions=True)
    failed = [e for e in logs if e["event"] == "background_task_failed"]
    assert [e["error"] for e in failed] == ["RuntimeError('disk on fire')"]
