"""GET /api/chat/stream against a real app, real agents and a real HTTP client; and CORS."""

import asyncio
import json
import os
import threading

import pytest
from tests.apihelpers import ALICE, BOB, TENANTS, assert_error, start

from corral.supervisor import errors, states
from corral.web.app import create_app
from corral.web.routes.stream import STREAMS
from corral.web.keys import SUPERVISOR

TIMEOUT = 20.0  # generous: the machine is shared


class SSE:
    """Reads one event stream: events as dicts (id, event, data), comments counted."""

    def __init__(self, response):
        self.response = response
        self.comments = 0

    async def next(self, timeout: float = TIMEOUT) -> dict:
        """The next event (comments and retry lines are skipped and counted)."""
        return await asyncio.wait_for(self._read_event(), timeout)

    async def _read_event(self) -> dict:
        """Read lines up to the blank line that ends an event."""
        event: dict = {}
        while True:
            line = await self.response.content.readline()
            if not line:
                raise EOFError("the stream ended")
            line = line.decode().rstrip("\n")
            if line.startswith(":"):
                self.comments += 1
            elif line == "":
                if "event" in event:
                    return event
                event = {}
            else:
                name, _, value = line.partition(": ")
                event[name] = json.loads(value) if name == "data" else value

    async def until(self, predicate, timeout: float = TIMEOUT) -> list[dict]:
        """Every event up to and including the first that satisfies ``predicate``."""
        seen = []
        while True:
            seen.append(await self.next(timeout))
            if predicate(seen[-1]):
                return seen

    async def comment(self, timeout: float = TIMEOUT) -> None:
        """Wait for a comment line (keep-alive)."""

        async def read():
            while not self.comments:
                line = await self.response.content.readline()
                if not line:
                    raise EOFError("the stream ended")
                if line.startswith(b":"):
                    self.comments += 1

        await asyncio.wait_for(read(), timeout)

    def close(self) -> None:
        """Hang up."""
        self.response.close()


def assistant_message(event: dict) -> bool:
    """Whether the event is a completed reply."""
    return event["event"] == "message" and event["data"]["role"] == "assistant"


@pytest.fixture
async def client(aiohttp_client, make_config):
    """A client of a real app (dev mode, loopback) with quick keep-alives."""
    app = create_app(make_config())
    app[STREAMS].keepalive = 0.2
    return await aiohttp_client(app)


@pytest.fixture
async def demo_client(aiohttp_client, make_config, demo_agent):
    """The same, running the sync and then the async demo agent."""
    app = create_app(make_config(agent=demo_agent))
    app[STREAMS].keepalive = 0.2
    return await aiohttp_client(app)


async def listen(client, sid: str, **headers) -> SSE:
    """Open a stream of the session and check it is one."""
    response = await client.get("/api/chat/stream", params={"session_id": sid}, headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return SSE(response)


async def chat(client, sid: str, message: str) -> dict:
    """Send a message and wait for the reply."""
    response = await client.post("/api/chat", json={"message": message, "session_id": sid})
    assert response.status == 200, await response.text()
    return await response.json()


async def test_deltas_in_order_then_message(demo_client):
    """A listener gets the connect state, then each chunk in order, then the stored reply."""
    client = demo_client
    stream = await listen(client, "alice")
    first = await stream.next()
    assert first["event"] == "state"
    assert first["data"] == {"session_id": "alice", "state": None, "is_processing": False,
                             "message_count": 0, "agent_state": {}, "messages": []}
    reply = (await chat(client, "alice", "my name is Alice"))["reply"]
    events = await stream.until(assistant_message)
    deltas = [e["data"] for e in events if e["event"] == "delta"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d["text"] for d in deltas) == reply
    assert events[-1]["data"]["content"] == reply
    last_delta = max(i for i, e in enumerate(events) if e["event"] == "delta")
    assert last_delta < len(events) - 1
    ids = [int(e["id"]) for e in [first] + events]
    assert ids == sorted(set(ids))
    stream.close()


async def test_deltas_queued_while_the_stream_is_busy_go_out_in_one_write(aiohttp_client, make_config, tmp_path):
    """Deltas that pile up before the stream's writer runs reach the client in one write (one HTTP
    chunk), in order, with their own ids: a stream that falls behind catches up in one write.

    The agent bursts while the loop is held (the test shares it with the server), so every delta
    is on its connection before the server reads one; then they all come in one read.
    """
    burst = 25
    app = create_app(make_config(agent="tests.perf_agents:BurstAgent", sandbox="off"))
    client = await aiohttp_client(app)
    go, sent = tmp_path / "go", tmp_path / "sent"
    os.mkfifo(go)
    os.mkfifo(sent)
    response = await client.get("/api/chat/stream", params={"session_id": "burst"})
    chunks = HTTPChunks(response)
    await chunks.until(b"event: state")
    posted = await client.post("/api/chat", json={"message": f"{burst} {go} {sent}", "session_id": "burst",
                                                  "wait": False})
    assert posted.status == 202
    await chunks.until(b'"state":"busy"')  # the turn has reached the agent, which waits at the gate
    sent_all = threading.Event()

    def open_the_gate() -> None:
        with open(go, "w") as gate:
            gate.write("go")
        with open(sent) as report:
            report.read()
        sent_all.set()

    threading.Thread(target=open_the_gate, daemon=True).start()
    assert sent_all.wait(TIMEOUT)  # holds the loop: the burst waits, unread, on the agent's connection
    await chunks.until(b'"role":"assistant"')
    with_deltas = [chunk for chunk in chunks.seen if b"event: delta" in chunk]
    assert len(with_deltas) == 1, [chunk.count(b"event: delta") for chunk in with_deltas]
    events = [block.split("\n") for block in with_deltas[0].decode().strip().split("\n\n")]
    deltas = [json.loads(lines[2][len("data: "):]) for lines in events if lines[1] == "event: delta"]
    assert [d["text"] for d in deltas] == [f"{i} " for i in range(burst)]
    assert [d["seq"] for d in deltas] == list(range(1, burst + 1))
    ids = [int(lines[0][len("id: "):]) for lines in events]
    assert ids == sorted(set(ids))
    response.close()


class HTTPChunks:
    """Reads an event stream by its HTTP chunks (one per write of the server's)."""

    def __init__(self, response):
        self.response = response
        self.seen: list[bytes] = []
        self._partial = b""

    async def until(self, needle: bytes, timeout: float = TIMEOUT) -> None:
        """Read whole chunks until one holds ``needle``."""

        async def read():
            while True:
                data, end_of_chunk = await self.response.content.readchunk()
                if not data and not end_of_chunk:
                    raise EOFError("the stream ended")
                self._partial += data
                if end_of_chunk:
                    self.seen.append(self._partial)
                    self._partial = b""
                    if needle in self.seen[-1]:
                        return

        await asyncio.wait_for(read(), timeout)


async def test_a_reply_not_waited_for_comes_on_the_stream(client):
    """wait=false answers 202 at once; the reply arrives as events; a new stream starts from /api/state."""
    stream = await listen(client, "hana")
    await stream.next()
    response = await client.post("/api/chat", json={"message": "my name is Hana", "session_id": "hana", "wait": False})
    assert response.status == 202
    events = await stream.until(assistant_message)
    assert events[-1]["data"]["content"] == "Got it: your name is Hana."
    await stream.until(lambda e: e["event"] == "state" and e["data"]["state"] == states.IDLE)
    state = await (await client.get("/api/state", params={"session_id": "hana"})).json()
    second = await listen(client, "hana")
    assert (await second.next())["data"] == state
    stream.close()
    second.close()


async def test_two_listeners_and_resume_without_loss_or_duplicates(client):
    """Two listeners see the same events; one hangs up mid-turn and resumes with Last-Event-ID."""
    steady, dropper = await listen(client, "bob"), await listen(client, "bob")
    assert (await steady.next())["event"] == (await dropper.next())["event"] == "state"
    first_turn = asyncio.ensure_future(chat(client, "bob", "my name is Bob"))
    seen_before = [await dropper.next() for _ in range(4)]
    dropper.close()
    await first_turn
    await chat(client, "bob", "what is my name?")
    everything = await steady.until(lambda e: assistant_message(e) and e["data"]["seq"] == 4)

    resumed = await listen(client, "bob", **{"Last-Event-ID": seen_before[-1]["id"]})
    seen_after = await resumed.until(lambda e: assistant_message(e) and e["data"]["seq"] == 4)
    assert seen_before + seen_after == everything
    assert [m["data"]["content"] for m in everything if m["event"] == "message"] == [
        "my name is Bob", "Got it: your name is Bob.", "what is my name?", "Your name is Bob."]
    steady.close()
    resumed.close()


@pytest.mark.parametrize("last_id", ["1", "not-a-number", "\u00b2", "9" * 5000])
async def test_unknown_last_event_id_starts_with_a_fresh_state(client, last_id):
    """A Last-Event-ID the server no longer buffers (or never issued) gives a full snapshot, not a gap."""
    await chat(client, "carol", "my colour is red")
    stream = await listen(client, "carol", **{"Last-Event-ID": last_id})
    first = await stream.next()
    assert first["event"] == "state"
    assert [m["content"] for m in first["data"]["messages"]] == ["my colour is red", "Got it: your colour is red."]
    stream.close()


async def test_end_arrives_when_the_session_is_killed(client):
    """Killing the session's process sends ``end`` with the reason."""
    await chat(client, "dave", "hello")
    stream = await listen(client, "dave")
    assert (await stream.next())["data"]["state"] == states.IDLE
    sup = client.app[SUPERVISOR]
    await sup.kill(sup.sessions["dave"])
    events = await stream.until(lambda e: e["event"] == "end")
    assert events[-1]["data"]["reason"] == states.KILLED
    assert [e["data"]["state"] for e in events if e["event"] == "state"] == [states.STOPPING, states.KILLED]
    stream.close()


async def test_a_crash_during_a_turn_sends_error_and_end(demo_client):
    """The agent dies mid-request: listeners get ``end`` (crashed) and the turn's ``error``."""
    client = demo_client
    await chat(client, "gina", "hello")
    stream = await listen(client, "gina")
    await stream.next()
    sup = client.app[SUPERVISOR]
    with pytest.raises(errors.AgentDied):
        await sup.command(sup.sessions["gina"], "crash", {"how": "exit"})
    events = await stream.until(lambda e: e["event"] == "error")
    ended = [e["data"] for e in events if e["event"] == "end"]
    assert ended and ended[0]["reason"] == states.CRASHED
    assert events[-1]["data"]["code"] == "agent_crashed" and events[-1]["data"]["message"]
    stream.close()


async def test_state_on_connect_for_a_reaped_session_does_not_spawn(client):
    """A session with no process is answered from the store; connecting starts nothing."""
    sup = client.app[SUPERVISOR]
    await chat(client, "erin", "my name is Erin")
    s = sup.sessions["erin"]
    await sup.stop(s, states.REAPED)
    await sup.settle_store()  # the store records the end in the background
    spawns = sup.counters["spawns"]
    stream = await listen(client, "erin")
    state = (await stream.next())["data"]
    assert state["state"] == states.REAPED and state["is_processing"] is False
    assert [m["role"] for m in state["messages"]] == ["user", "assistant"]
    assert sup.counters["spawns"] == spawns and sup.count() == 0 and "erin" not in sup.sessions
    stream.close()


async def test_keep_alive_comments_on_a_quiet_stream(client):
    """A stream with nothing to say sends comments (keep-alive is 0.2 s in these tests)."""
    stream = await listen(client, "quiet")
    await stream.next()
    await stream.comment()
    stream.close()


async def test_the_last_listener_leaving_unsubscribes_and_releases_the_buffer(client):
    """Once no stream listens (and the linger is over), the bus subscription and the replay buffer go.

    The linger is 0 here, so the channel goes as the last listener leaves (as a stream's handler
    does once its client has hung up); a later stream then starts afresh instead of resuming.
    """
    hub, sup = client.app[STREAMS], client.app[SUPERVISOR]
    hub.linger = 0
    first, second = hub.listen("default", "frank"), hub.listen("default", "frank")
    s = await sup.get_or_create("frank", "default")
    await sup.chat(s, "my name is Frank")  # events are handed out before the reply returns
    before = first.channel.last_id
    assert first.queue.qsize() > 0 and first.channel.events_after(before - 1)
    first.leave()
    assert sup.events.watched("frank")  # the second stream still listens
    second.leave()
    assert not sup.events.watched("frank")
    again = hub.listen("default", "frank")
    assert again.channel.events_after(before - 1) is None  # nothing kept: a resume gets a fresh snapshot
    again.leave()


async def test_a_listener_too_far_behind_is_closed_with_what_it_had_intact(client):
    """Past ``queue_size`` unsent events a stream is ended (its memory is bounded); the events it
    had queued still go out, none dropped, so its resume from the last one it got loses nothing."""
    hub, sup = client.app[STREAMS], client.app[SUPERVISOR]
    hub.queue_size = 3
    slow = hub.listen("default", "gina")  # a stream whose writer never runs
    s = await sup.get_or_create("gina", "default")
    await sup.chat(s, "my name is Gina")  # more than 3 events: state, message, deltas, message, state
    channel = slow.channel
    assert slow.closed and slow.queue.qsize() == 3
    assert [e.id for e in slow.queue.take()] == [e.id for e in channel.buffer][:3]
    assert len(channel.buffer) > 3
    slow.leave()


async def test_stream_refuses_bad_ids_and_another_tenants_id_is_the_callers_own(client):
    """400 for a malformed id; an id another tenant uses is the caller's own (new, empty) session."""
    response = await client.get("/api/chat/stream", params={"session_id": "no spaces"})
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "bad_session_id"
    sup = client.app[SUPERVISOR]
    await sup.chat(await sup.get_or_create("theirs", "acme"), "my name is Mallory")
    stream = await listen(client, "theirs")
    assert (await stream.next())["data"]["messages"] == []
    stream.close()


async def test_listening_on_an_unused_id_shows_nothing_of_another_tenants_session(client):
    """A tenant listening on an id nobody used sees none of the events once another tenant takes it."""
    hub, sup = client.app[STREAMS], client.app[SUPERVISOR]
    stream = await listen(client, "contested")
    await stream.next()
    owner = hub.listen("acme", "contested")  # what acme's own stream would be fed
    s = await sup.get_or_create("contested", "acme")
    await sup.chat(s, "my name is Mallory")  # events are handed out before the reply returns
    assert not owner.queue.empty()
    assert list(hub.channels[("default", "contested")].buffer) == []
    owner.leave()
    stream.close()


async def test_tenants_stream_only_their_own_sessions(aiohttp_client, make_config, tmp_path):
    """With API keys: no key is 401; the same id is each tenant's own session, each sees only its own."""
    client = await start(aiohttp_client, make_config, tmp_path, tenants=TENANTS)
    response = await client.post("/api/chat", json={"message": "my name is Alice", "session_id": "a-1"}, headers=ALICE)
    assert response.status == 200
    await assert_error(await client.get("/api/chat/stream", params={"session_id": "a-1"}), 401, "unauthorized")
    bobs = await listen(client, "a-1", **BOB)
    assert (await bobs.next())["data"]["messages"] == []
    stream = await listen(client, "a-1", **ALICE)
    assert [m["role"] for m in (await stream.next())["data"]["messages"]] == ["user", "assistant"]
    response = await client.post("/api/chat", json={"message": "my name is Bob", "session_id": "a-1"}, headers=BOB)
    assert (await response.json())["reply"] == "Got it: your name is Bob."
    event = await bobs.next()
    while event["event"] != "message":
        event = await bobs.next()
    assert event["data"]["content"] == "my name is Bob"
    # events are handed out before the reply returns: none of Bob's reached Alice's channel
    assert "Bob" not in repr(list(client.app[STREAMS].channels[("alice", "a-1")].buffer))
    stream.close()
    bobs.close()


async def test_stream_without_an_id_gets_a_new_one(client):
    """No session id: a fresh one, in the header, the cookie and the first event."""
    response = await client.get("/api/chat/stream")
    stream = SSE(response)
    sid = response.headers["X-Session-Id"]
    assert response.cookies["corral_session"].value == sid
    assert (await stream.next())["data"]["session_id"] == sid
    stream.close()


# ------------------------------------------------------------------------------------------ CORS


async def cors_client(aiohttp_client, make_config, origins):
    """A client of an app with these CORS origins."""
    return await aiohttp_client(create_app(make_config(cors_origins=origins)))


async def test_cors_default_is_same_origin_only(aiohttp_client, make_config):
    """No origins configured: no CORS headers, preflights are not answered."""
    client = await cors_client(aiohttp_client, make_config, ())
    response = await client.get("/health", headers={"Origin": "https://elsewhere.example"})
    assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers
    preflight = await client.options("/api/chat", headers={
        "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in preflight.headers


async def test_cors_listed_origin(aiohttp_client, make_config):
    """A listed origin may read answers (errors and streams too); others may not."""
    client = await cors_client(aiohttp_client, make_config, ("https://app.example",))
    mine = {"Origin": "https://app.example"}
    response = await client.get("/health", headers=mine)
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert response.headers["Vary"] == "Origin"
    assert "X-Session-Id" in response.headers["Access-Control-Expose-Headers"]
    error = await client.get("/api/sessions/nope", headers=mine)
    assert error.status >= 400 and error.headers["Access-Control-Allow-Origin"] == "https://app.example"
    stream = await client.get("/api/chat/stream", params={"session_id": "x"}, headers=mine)
    assert stream.headers["Access-Control-Allow-Origin"] == "https://app.example"
    stream.close()
    other = await client.get("/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers

    preflight = await client.options("/api/chat", headers={
        **mine, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type, authorization"})
    assert preflight.status == 204
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Allow-Headers"] == "content-type, authorization"


async def test_cors_any_origin(aiohttp_client, make_config):
    """``*`` lets every origin read answers (without credentials)."""
    client = await cors_client(aiohttp_client, make_config, ("*",))
    response = await client.get("/health", headers={"Origin": "https://anyone.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in response.headers
    preflight = await client.options("/api/state", headers={
        "Origin": "https://anyone.example", "Access-Control-Request-Method": "GET"})
    assert preflight.status == 204 and preflight.headers["Access-Control-Allow-Origin"] == "*"
