"""Lifecycle webhooks to receivers on loopback: signed, retried under one delivery id, never slowing a chat."""

import asyncio
import hashlib
import hmac
import json

from aiohttp import web

from corral.web.app import create_app
from corral.web.keys import SUPERVISOR, WEBHOOKS
from tests.apihelpers import ALICE, BOB, TENANTS, json_of

SECRET = "webhook-test-secret"


class Receiver:
    """A webhook receiver on loopback: records every request; may fail the first tries or hang."""

    def __init__(self, *, fail_first: int = 0):
        self.fail_first = fail_first
        self.hang: asyncio.Event | None = None  # set: requests wait on it
        self.hanging = asyncio.Event()  # a request is waiting on the hang
        self.requests: list[tuple[str, dict, bytes]] = []  # (path, headers, raw body)
        self.arrived = asyncio.Condition()
        self.app = web.Application()
        self.app.router.add_post("/{name}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        async with self.arrived:
            self.requests.append((request.path, dict(request.headers), body))
            self.arrived.notify_all()
        if self.hang is not None:
            self.hanging.set()
            await self.hang.wait()
        tries = [h for _, h, _ in self.requests if h["X-Corral-Delivery"] == request.headers["X-Corral-Delivery"]]
        return web.Response(status=503 if len(tries) <= self.fail_first else 200)

    async def wait_for(self, check, timeout: float = 15.0):
        """Wait until ``check(requests)`` is true (woken by each arrival)."""
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: check(self.requests)), timeout)

    def events(self, path: str | None = None) -> list[dict]:
        """The bodies received (at ``path``), parsed."""
        return [json.loads(b) for p, _, b in self.requests if path is None or p == path]


def verified(headers: dict, body: bytes) -> bool:
    """What a receiver does: recompute the HMAC of the raw body and compare in constant time."""
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers["X-Corral-Signature"])


async def corral_with(aiohttp_client, make_config, tmp_path, receiver_url: str, *, tenant_hook: str | None = None):
    """A corral app sending webhooks to ``receiver_url`` (and alice's to ``tenant_hook``)."""
    tenants = TENANTS.replace('keys = ["alice-key-1", "alice-key-2"]',
                              f'keys = ["alice-key-1", "alice-key-2"]\nwebhooks = ["{tenant_hook}"]') if tenant_hook else TENANTS
    path = tmp_path / "tenants.toml"
    path.write_text(tenants)
    secret = tmp_path / "webhook.key"
    secret.write_text(SECRET + "\n")
    app = create_app(make_config(tenants=path, webhook=(receiver_url,), webhook_secret_file=secret, max_restarts=5,
                                 memory_limit=64 << 20))
    return await aiohttp_client(app)


async def test_lifecycle_events_are_signed_and_go_to_the_tenants_own_hook(aiohttp_client, aiohttp_server, make_config, tmp_path):
    """created, crashed (with output), oom, restarted, ended (with usage), node.joined: each signed; alice's hook gets only hers."""
    receiver = Receiver()
    server = await aiohttp_server(receiver.app)
    client = await corral_with(aiohttp_client, make_config, tmp_path, str(server.make_url("/all")),
                               tenant_hook=str(server.make_url("/alice")))
    await json_of(await client.post("/api/chat", json={"message": "hi", "session_id": "w1"}, headers=ALICE), 200)
    crash = await client.post("/api/mcp-command", headers=ALICE, json={
        "session_id": "w1", "command": "crash", "args": {"how": "exception"}})
    assert crash.status == 502
    await json_of(await client.post("/api/chat", json={"message": "again", "session_id": "w1"}, headers=ALICE), 200)
    await json_of(await client.post("/api/chat", json={"message": "hi", "session_id": "w2"}, headers=BOB), 200)
    hog = await client.post("/api/mcp-command", headers=BOB, json={
        "session_id": "w2", "command": "allocate", "args": {"mib": 200}})
    assert hog.status == 502
    await json_of(await client.delete("/api/sessions/w1", headers=ALICE), 200)
    want = {"node.joined", "session.created", "session.crashed", "session.restarted", "session.ended", "session.oom"}
    await receiver.wait_for(lambda rs: want <= {json.loads(b)["type"] for p, _, b in rs if p == "/all"}
                            and sum(json.loads(b)["type"] == "session.ended" for p, _, b in rs if p == "/alice") == 2)

    for path, headers, body in receiver.requests:
        assert verified(headers, body), (path, headers)
        event = json.loads(body)
        assert headers["X-Corral-Event"] == event["type"] and headers["X-Corral-Delivery"] == event["id"]
    seen = receiver.events("/all")
    crashed = next(e for e in seen if e["type"] == "session.crashed")
    assert any("demo agent crashed on request" in line for line in crashed["output"])
    ended = [e for e in seen if e["type"] == "session.ended" and e["session_id"] == "w1"]
    assert [e["reason"] for e in ended] == ["crashed", "ended"]
    assert ended[-1]["usage"]["turns"] == 3 and ended[-1]["usage"]["starts"] == 2
    assert next(e for e in seen if e["type"] == "session.restarted")["after"] == "crashed"
    oom = next(e for e in seen if e["type"] == "session.oom")
    assert oom["session_id"] == "w2" and oom["tenant"] == "bob"
    mine = receiver.events("/alice")
    assert {e["tenant"] for e in mine} == {"alice"} and not [e for e in mine if e["type"].startswith("node.")]


async def test_a_receiver_failing_twice_gets_the_event_with_one_delivery_id(aiohttp_client, aiohttp_server, make_config, tmp_path):
    """503, 503, then 200: three tries of the same delivery id and body."""
    receiver = Receiver(fail_first=2)
    server = await aiohttp_server(receiver.app)
    client = await corral_with(aiohttp_client, make_config, tmp_path, str(server.make_url("/all")))
    await receiver.wait_for(lambda rs: len(rs) >= 3)
    joined = [(h, b) for _, h, b in receiver.requests if h["X-Corral-Event"] == "node.joined"]
    assert len(joined) == 3 and len({h["X-Corral-Delivery"] for h, _ in joined}) == 1
    assert len({b for _, b in joined}) == 1 and all(verified(h, b) for h, b in joined)
    counters = client.server.app[SUPERVISOR].counters
    assert (counters["webhooks_retried"], counters["webhooks_failed"]) == (2, 0)
    # the third try's 200 is read after it arrived: its worker marks the queue done then
    await asyncio.wait_for(client.server.app[WEBHOOKS].queue.join(), 10)
    assert counters["webhooks_delivered"] == 1
    text = await (await client.get("/metrics")).text()
    assert "corral_webhooks_retried_total 2.0" in text


async def test_a_hanging_receiver_does_not_slow_a_chat(aiohttp_client, aiohttp_server, make_config, tmp_path):
    """While the receiver holds every webhook request open, chats answer at their usual pace."""
    receiver = Receiver()
    receiver.hang = asyncio.Event()
    server = await aiohttp_server(receiver.app)
    client = await corral_with(aiohttp_client, make_config, tmp_path, str(server.make_url("/all")))
    await asyncio.wait_for(receiver.hanging.wait(), 10)  # node.joined is held by the receiver
    for i in range(5):
        reply = await asyncio.wait_for(client.post("/api/chat", json={"message": f"m{i}", "session_id": f"h{i}"},
                                                   headers=ALICE), 5)
        await json_of(reply, 200)
    assert not receiver.hang.is_set() and len(receiver.requests) >= 1  # still hanging while every chat answered
    receiver.hang.set()


def test_webhooks_without_a_key_or_with_a_bad_url_refuse_to_start(make_config, tmp_path):
    """No signing key: the app is not built (one line why); a URL that is not http(s) is refused by the flag."""
    import pytest

    from corral.web.auth import AuthConfigError
    from corral.web.cli import build_parser, config_from

    with pytest.raises(AuthConfigError, match="--webhook-secret"):
        create_app(make_config(webhook=("http://127.0.0.1:9/hook",)))
    args = build_parser().parse_args(["serve", "--webhook", "http://a.example/x", "--webhook", "https://b.example/y"])
    assert config_from(args, {}).webhook == ("http://a.example/x", "https://b.example/y")
    env = config_from(build_parser().parse_args(["serve"]), {"CORRAL_WEBHOOK": "http://a.example/x, http://c"})
    assert env.webhook == ("http://a.example/x", "http://c")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--webhook", "ftp://a.example/x"])
