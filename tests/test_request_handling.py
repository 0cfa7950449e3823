"""Requests as a real network delivers them and as a hostile client writes them, over raw sockets.

A body split over TCP segments or sent chunked is read whole; aiohttp's own refusals (bad
request line, unknown method, oversized headers) answer in the JSON error shape like every
other error, without echoing the input.
"""

import json

import pytest
from tests.apihelpers import ALICE, BOB, TENANTS, assert_error, json_of, start, supervisor_of
from rawhttp import NETWORK_PAUSE, chunked, exchange, json_error_of, json_post, pieces_of, request_head

MSS = 1448  # a typical TCP segment's payload


@pytest.fixture
async def client(aiohttp_client, make_config, tmp_path):
    """A client of a real server on a loopback port (dev mode, demo agent)."""
    return await start(aiohttp_client, make_config, tmp_path, max_message_bytes=32 * 1024)


@pytest.fixture
def server(client):
    """The real server itself, for raw sockets."""
    return client.server


def reply_of(status: int, body: bytes) -> str:
    """The reply of a successful chat answer."""
    assert status == 200, body[:300]
    return json.loads(body)["reply"]


async def test_a_body_split_by_a_pause_is_read_whole(server):
    """20 bytes of the body with the headers, a pause, then the rest: one valid request."""
    head, body = json_post("/api/chat", {"message": "split in two", "session_id": "s-split"})
    status, _, answer = await exchange(server, head + body[:20], body[20:], pause=NETWORK_PAUSE)
    assert reply_of(status, answer) == "You said: split in two"


async def test_a_20_kb_body_in_segments_is_read_whole(server):
    """A 20 kB body written in 1,448-byte pieces."""
    message = "x" * 20_000
    head, body = json_post("/api/chat", {"message": message, "session_id": "s-segments"})
    status, _, answer = await exchange(server, head, *pieces_of(body, MSS), pause=NETWORK_PAUSE / 10)
    assert reply_of(status, answer) == f"You said: {message}"


async def test_a_chunked_upload_is_read_whole(server):
    """A body in chunked transfer coding, each chunk its own write."""
    data = json.dumps({"message": "sent in chunks", "session_id": "s-chunked"}).encode()
    head = request_head("POST", "/api/chat", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    status, _, answer = await exchange(server, head, *chunked(data, 7), pause=NETWORK_PAUSE / 5)
    assert reply_of(status, answer) == "You said: sent in chunks"


async def test_an_over_limit_chunked_body_is_413(server):
    """A chunked body past the request limit (no Content-Length to refuse it by) is 413 too_large."""
    data = json.dumps({"message": "y" * 200_000, "session_id": "s-huge"}).encode()
    head = request_head("POST", "/api/chat", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    status, headers, answer = await exchange(server, head, *chunked(data, 16 * 1024), pause=NETWORK_PAUSE / 5)
    assert status == 413
    assert json_error_of(status, headers, answer)["code"] == "too_large"


MALFORMED = {
    "unknown method": b"BREW /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "not HTTP": b"\x16\x03\x01 hello-SECRET-INPUT\r\n\r\n",
    "header over 8 KiB": request_head("GET", "/health", {"X-Padding": "SECRET-INPUT" + "a" * 9000}),
    "too many cookies": request_head("GET", "/health", {"Cookie": "; ".join(f"SECRET-INPUT{i}=1" for i in range(2000))}),
    "too many headers": request_head("GET", "/health", {f"X-SECRET-INPUT-{i}": "1" for i in range(300)}),
    "bad request line": b"GET /health HTTP/1.1 trailing-SECRET-INPUT\r\nHost: 127.0.0.1\r\n\r\n",
}


@pytest.mark.parametrize("what", MALFORMED)
async def test_what_the_http_parser_refuses_is_a_json_400(server, what):
    """aiohttp's own refusals answer in the JSON error shape and never echo the input."""
    status, headers, body = await exchange(server, MALFORMED[what])
    assert status == 400
    assert json_error_of(status, headers, body)["code"] == "bad_request"
    assert b"SECRET-INPUT" not in body and b"BREW" not in body


async def test_an_empty_message_is_400_and_nothing_is_stored(client):
    """An empty chat or system message is refused before any session is made or anything stored."""
    for path in ("/api/chat", "/api/system"):
        await assert_error(await client.post(path, json={"message": "", "session_id": "s-empty"}), 400, "empty_message")
    assert not supervisor_of(client).sessions
    state = await json_of(await client.get("/api/state", params={"session_id": "s-empty"}), 200)
    assert state["messages"] == [] and state["state"] is None


@pytest.mark.parametrize("sid", [".", ".."])
async def test_dot_session_ids_are_refused(client, sid):
    """"." and ".." are no session id, wherever the request names one."""
    named = [
        client.post("/api/chat", json={"message": "hi", "session_id": sid}),
        client.post("/api/sessions", json={"session_id": sid}),
        client.get("/api/state", params={"session_id": sid}),
        client.get("/api/state", headers={"X-Session-Id": sid}),
        client.get("/api/chat/stream", headers={"X-Session-Id": sid}),
    ]
    for request in named:
        await assert_error(await request, 400, "bad_session_id")
    for path in ("/api/sessions/", "/admin/sessions/"):  # percent-encoded, as a client would not normalise it
        answer = await exchange(client.server, request_head("GET", path + sid.replace(".", "%2E")))
        assert json_error_of(*answer)["code"] == "bad_session_id", answer
    assert not supervisor_of(client).sessions
    cookie_jar = client.session.cookie_jar
    cookie_jar.update_cookies({"corral_session": sid})
    await assert_error(await client.get("/api/state"), 400, "bad_session_id")


async def test_a_405_names_the_allowed_methods(client):
    """A route called with the wrong method answers 405 with an Allow header."""
    response = await assert_error_response(client.get("/api/chat"), 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"
    response = await assert_error_response(client.post("/health"), 405, "method_not_allowed")
    assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD"}


async def test_a_missing_static_file_is_the_json_404(client):
    """/static/ answers its files, and the JSON 404 of any unknown path for a name that is none of them."""
    assert (await client.get("/static/chat.js")).status == 200
    for name in ("nope.js", "index.html.bak", "%2E%2E", "%2E"):
        answer = await exchange(client.server, request_head("GET", f"/static/{name}"))
        assert answer[0] == 404 and json_error_of(*answer)["code"] == "not_found", answer


async def assert_error_response(request, status: int, code: str):
    """Await a request, assert its JSON error, and return the response (for its headers)."""
    response = await request
    await assert_error(response, status, code)
    return response


PROBES = 300


async def test_a_foreign_tenants_probes_load_nothing_of_the_other_tenant(aiohttp_client, make_config, tmp_path):
    """Bob reading Alice's stored ids reads his own (unknown) sessions: nothing of hers is loaded or shown."""
    client = await start(aiohttp_client, make_config, tmp_path, tenants=TENANTS)
    sup = supervisor_of(client)
    await json_of(await client.post("/api/chat", json={"message": "my name is Alice", "session_id": "a-real"},
                                    headers=ALICE), 200)
    await json_of(await client.delete("/api/sessions/a-real", headers=ALICE), 200)  # ended: in the store only
    for n in range(PROBES - 1):
        await sup.store.upsert_session(f"alice/a-{n}", tenant="alice", agent=sup.config.agent, status="ended")
    held = sup.health()["sessions_in_memory"]
    for sid in ["a-real"] + [f"a-{n}" for n in range(PROBES - 1)]:
        await assert_error(await client.get(f"/api/sessions/{sid}", headers=BOB), 404, "session_not_found")
        state = await json_of(await client.get("/api/state", params={"session_id": sid}, headers=BOB), 200)
        assert (state["state"], state["messages"]) == (None, [])
    assert sup.health()["sessions_in_memory"] == held
    assert "alice/a-real" not in sup.sessions
    answer = await json_of(await client.post("/api/chat", json={"message": "what is my name?", "session_id": "a-real"},
                                             headers=ALICE), 200)
    assert answer["reply"] == "Your name is Alice."


async def test_a_result_json_cannot_carry_is_a_502_and_the_agent_lives(aiohttp_client, make_config, tmp_path):
    """bytes, a set, an object, NaN, ... from on_command: 502 agent_bad_reply; the same process answers on."""
    client = await start(aiohttp_client, make_config, tmp_path, agent="tests.agents.odd:OddAgent")
    sup = supervisor_of(client)

    async def odd(kind: str, status: int = 502):
        """Run ``odd {kind}`` in session s-odd; return the answer's JSON."""
        response = await client.post("/api/mcp-command", json={"command": "odd", "args": {"kind": kind}, "session_id": "s-odd"})
        return await json_of(response, status)

    await odd("fix", 200)
    pid = sup.sessions["s-odd"].pid
    for kind in ("bytes", "set", "object", "nan", "nested", "tuple-key", "huge", "surrogate", "state"):
        error = (await odd(kind))["error"]
        assert error["code"] == "agent_bad_reply", (kind, error)
        assert "JSON cannot carry" in error["message"] or "cannot be sent" in error["message"], (kind, error)
    assert "snapshot()" in error["message"]  # the broken state is named as such
    assert (await odd("fix", 200))["result"] == "done"
    state = await json_of(await client.get("/api/state", params={"session_id": "s-odd"}), 200)
    assert "blob" not in state["agent_state"]
    assert sup.sessions["s-odd"].pid == pid and not sup.sessions["s-odd"].restarts  # never died


async def test_a_raw_agents_bytes_are_a_502_too(aiohttp_client, make_config, tmp_path):
    """A DONE frame with bytes sent past the agent-side check is refused by the supervisor as well."""
    client = await start(aiohttp_client, make_config, tmp_path, agent="tests.agents.odd:RawOdd")
    response = await client.post("/api/mcp-command", json={"command": "raw", "session_id": "s-raw"})
    await assert_error(response, 502, "agent_bad_reply")
    answer = await json_of(await client.post("/api/chat", json={"message": "still there?", "session_id": "s-raw"}), 200)
    assert answer["reply"] == "You said: still there?"
