"""The OpenAI-compatible chat agent in real agent processes, against a fake API served in the test.

The fake speaks the chat completions protocol (streamed server-sent events) on loopback; what it does
depends on the last user message: stream a reply, fail mid-stream, rate-limit once, or stream slowly.
"""

import asyncio
import json

import pytest
from aiohttp import web

from corral.supervisor import errors, states
from tests.conftest import wait_for_state

AGENT = "corral.agent_proc.contrib.openai_chat:OpenAIChat"
SLOW_CHUNK_EVERY = 0.05  # the fake's pace for the slow stream (the test waits on events, not on this)


class FakeOpenAI:
    """A chat completions endpoint whose answer the last user message picks."""

    def __init__(self):
        self.requests: list[dict] = []  # every request body, in order
        self.slow_started = asyncio.Event()
        self.slow_client_gone = asyncio.Event()
        self.rate_limited = 0

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        body = await request.json()
        self.requests.append({"body": body, "auth": request.headers.get("Authorization")})
        last = body["messages"][-1]["content"]
        if last == "busy" and self.rate_limited == 0:
            self.rate_limited += 1
            return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "0"})
        if last == "always busy":
            return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "0.2"})
        if last == "bad key":
            return web.json_response({"error": {"message": "Incorrect API key provided"}}, status=401)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if last == "slow":
            await self.stream_slowly(response)
            return response
        for token in ["Hel", "lo", ", ", last]:
            await send(response, chunk(token))
        if last == "break":
            await send(response, {"error": {"message": "the model fell over", "type": "server_error"}})
            return response
        await response.write(b"data: [DONE]\n\n")
        return response

    async def stream_slowly(self, response: web.StreamResponse) -> None:
        """Stream tokens forever until the client hangs up; note when it does."""
        self.slow_started.set()
        try:
            while True:
                await send(response, chunk("tick "))
                await asyncio.sleep(SLOW_CHUNK_EVERY)
        except (ConnectionError, asyncio.CancelledError):
            self.slow_client_gone.set()


def chunk(token: str) -> dict:
    """One chat.completion.chunk carrying a token."""
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": token}}]}


async def send(response: web.StreamResponse, event: dict) -> None:
    """Write one server-sent event."""
    await response.write(f"data: {json.dumps(event)}\n\n".encode())


@pytest.fixture
async def fake(aiohttp_server):
    """The fake API, listening on loopback."""
    fake = FakeOpenAI()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.completions)
    fake.server = await aiohttp_server(app)
    return fake


@pytest.fixture
async def sup(make_supervisor, fake, monkeypatch):
    """A supervisor running the OpenAI agent against the fake, its ``openai`` upstream on the egress gateway.

    The key is the server's (its environment): the gateway adds it, the agent never sees it.
    """
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test")
    monkeypatch.setenv("CORRAL_OPENAI_MODEL", "fake-model")
    monkeypatch.setenv("CORRAL_OPENAI_SYSTEM_PROMPT", "You are terse.")
    monkeypatch.setenv("CORRAL_OPENAI_RETRY_FOR", "1")
    return await make_supervisor(agent=AGENT, upstream=(f"openai={fake.server.make_url('/v1')}",),
                                 upstream_header=("openai=Authorization: Bearer env:TEST_OPENAI_KEY",))


async def test_replies_stream_token_by_token_and_history_is_the_conversation(sup, fake):
    s = await sup.get_or_create("chat", "default")
    chunks = []
    first = await sup.chat(s, "Ada", on_chunk=chunks.append)
    assert chunks == ["Hel", "lo", ", ", "Ada"] and first["reply"] == "Hello, Ada"
    await sup.chat(s, "again")
    sent = fake.requests[-1]
    assert sent["auth"] == "Bearer sk-test"
    assert sent["body"]["model"] == "fake-model" and sent["body"]["stream"] is True
    assert sent["body"]["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Ada"},
        {"role": "assistant", "content": "Hello, Ada"},
        {"role": "user", "content": "again"},
    ]
    # A new process for the session rebuilds the conversation from corral's store.
    await sup.kill(s)
    await sup.chat(await sup.get_or_create("chat", "default"), "third")
    assert [m["content"] for m in fake.requests[-1]["body"]["messages"]] == [
        "You are terse.", "Ada", "Hello, Ada", "again", "Hello, again", "third"]


async def test_an_error_mid_stream_fails_the_turn_not_the_agent(sup, fake):
    s = await sup.get_or_create("broken", "default")
    await sup.chat(s, "Ada")
    pid = s.pid
    chunks = []
    with pytest.raises(errors.UpstreamFailed) as info:
        await sup.chat(s, "break", on_chunk=chunks.append)
    assert info.value.status == 502 and "the model fell over" in info.value.message
    assert chunks == ["Hel", "lo", ", ", "break"]  # what arrived before the error was streamed
    assert s.pid == pid and s.state == states.IDLE
    assert (await sup.chat(s, "still here?"))["reply"] == "Hello, still here?"


async def test_a_rejected_request_is_a_clear_turn_error(sup, fake):
    s = await sup.get_or_create("unauthorised", "default")
    with pytest.raises(errors.UpstreamFailed) as info:
        await sup.chat(s, "bad key")
    assert info.value.message == "the model's API answered 401: Incorrect API key provided"
    assert len(fake.requests) == 1  # not retried


async def test_a_rate_limit_is_retried(sup, fake):
    s = await sup.get_or_create("patient", "default")
    result = await sup.chat(s, "busy")
    assert result["reply"] == "Hello, busy" and result["state"]["retries"] == 1
    assert len(fake.requests) == 2


async def test_rate_limit_retries_are_bounded_in_time(sup, fake):
    s = await sup.get_or_create("rebuffed", "default")
    with pytest.raises(errors.UpstreamFailed) as info:
        await sup.chat(s, "always busy")
    assert info.value.message == "the model's API answered 429: slow down"
    assert 2 <= len(fake.requests) <= 6  # retried (every 0.2 s, for CORRAL_OPENAI_RETRY_FOR=1 s), then given up


async def test_an_interrupt_closes_the_upstream_stream(sup, fake):
    s = await sup.get_or_create("hasty", "default")
    chunks = []
    turn = asyncio.ensure_future(sup.chat(s, "slow", on_chunk=chunks.append))
    await asyncio.wait_for(fake.slow_started.wait(), 30)
    await wait_for_state(sup, s, states.BUSY)
    assert sup.interrupt(s)
    assert (await asyncio.wait_for(turn, 10))["status"] == "interrupted"
    await asyncio.wait_for(fake.slow_client_gone.wait(), 10)  # the server saw the connection close
    assert (await sup.chat(s, "Ada"))["reply"] == "Hello, Ada"
    # The interrupted turn's user message is in the conversation; its partial reply is not.
    assert [m["content"] for m in fake.requests[-1]["body"]["messages"]][-2:] == ["slow", "Ada"]


async def test_the_api_unreachable_is_a_clear_turn_error(make_supervisor, monkeypatch, unused_tcp_port):
    monkeypatch.setenv("CORRAL_OPENAI_BASE_URL", f"http://127.0.0.1:{unused_tcp_port}/v1")
    monkeypatch.setenv("CORRAL_OPENAI_MODEL", "fake-model")
    sup = await make_supervisor(agent=AGENT, agent_network="host")  # the agent's own error, no gateway between
    s = await sup.get_or_create("lonely", "default")
    with pytest.raises(errors.UpstreamFailed) as info:
        await sup.chat(s, "anyone?")
    assert info.value.message.startswith("cannot reach the model's API at http://127.0.0.1:")
    assert s.state == states.IDLE
