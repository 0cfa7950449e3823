"""Lifecycle webhooks: a signed JSON POST per session or node event, at least once, never on a turn's path.

Fed by the events stream (supervisor/events.py): ``spawned`` gives ``session.created`` (a
session's first start: no messages yet) and ``session.restarted`` (a start after a crash or an OOM
kill, which its ``end`` said); ``end`` gives ``session.ended`` (with the reason and the final
usage), and also ``session.oom`` or ``session.crashed`` (with the last lines of its output);
``node`` gives ``node.joined`` and ``node.left``. (Not ``state``: listening to it would make every
turn's idle <-> busy flip build an event.) Each event goes to every ``--webhook`` URL and, for a session's events, to its
tenant's ``webhooks`` in the tenants file.

Headers: ``X-Corral-Event`` (the type), ``X-Corral-Delivery`` (an id kept across retries: a
receiver drops what it has seen), ``X-Corral-Signature: sha256=<hex HMAC-SHA256 of the raw body>``.
A delivery is retried on a timeout, a connection error, 429 or 5xx, with exponential backoff
(0.5 s doubling to at most 30 s), until ``retry_for`` seconds after it was made; then it is given up
(counted, logged). Other 4xx are final. Deliveries wait in one bounded queue served by a few
worker tasks: an event that finds it full is dropped (counted and logged), so a receiver that is
down or slow costs a bounded amount of memory and never slows a chat. The body of a delivery is
built when it is first sent (the usage it carries is then written) and kept for its retries.
"""

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import aiohttp

from corral.supervisor import states
from corral.supervisor.logs import get_logger
from corral.supervisor.session_keys import session_key

log = get_logger(component="webhooks")

QUEUE_BOUND = 1000  # deliveries waiting at most
WORKERS = 4  # deliveries in flight at once
FIRST_BACKOFF, MAX_BACKOFF = 0.5, 30.0
OUTPUT_LINES = 20  # lines of a crashed agent's output a session.crashed event carries
_EVENTS = ("spawned", "end", "node")
CRASHES_KEPT = 10_000  # sessions down after a crash or an OOM kill whose restart would be reported


def sign(secret: bytes, body: bytes) -> str:
    """The X-Corral-Signature of a body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@dataclass(eq=False)
class Delivery:
    """One event to one URL, retried under one id until delivered or given up."""

    url: str
    event: str
    data: dict
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    made: float = field(default_factory=time.monotonic)
    attempts: int = 0
    body: bytes | None = None
    retry: asyncio.TimerHandle | None = None  # the timer of its next try, while it waits


class Webhooks:
    """Turns the supervisor's events into signed POSTs to the configured receivers."""

    def __init__(self, sup, *, urls=(), tenant_urls: dict | None = None, secret: bytes = b"",
                 timeout: float = 5.0, retry_for: float = 300.0, queue_bound: int = QUEUE_BOUND):
        self.sup = sup
        self.urls = tuple(urls)
        self.tenant_urls = {t: tuple(u) for t, u in (tenant_urls or {}).items()}
        self.secret = secret
        self.timeout = timeout
        self.retry_for = retry_for
        self.counters: Counter = sup.counters  # webhooks_delivered / _retried / _dropped / _failed, for /metrics
        self.queue: asyncio.Queue | None = None
        self.queue_bound = queue_bound
        self._session: aiohttp.ClientSession | None = None
        self._workers: list[asyncio.Task] = []
        self._retries: set[asyncio.TimerHandle] = set()
        self._crashed: OrderedDict[str, str] = OrderedDict()  # session id -> crashed | oom, until it starts again
        self._unsubscribe = sup.events.subscribe(self._on_event, types=_EVENTS) if self.enabled else None

    @property
    def enabled(self) -> bool:
        """Whether any receiver is configured."""
        return bool(self.urls or any(self.tenant_urls.values()))

    async def start(self) -> None:
        """Open the HTTP client and start the workers."""
        if not self.enabled:
            return
        self.queue = asyncio.Queue(self.queue_bound)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self._workers = [asyncio.ensure_future(self._work()) for _ in range(WORKERS)]

    def close_now(self) -> None:
        """Stop listening (before start: nothing else to stop)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    async def close(self, drain_for: float = 5.0) -> None:
        """Stop listening, give the queue up to ``drain_for`` seconds to empty, then stop."""
        self.close_now()
        if self.queue is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.queue.join(), drain_for)  # what is queued, not what waits to retry
        for timer in self._retries:
            timer.cancel()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        left = self.queue.qsize() + len(self._retries)
        if left:
            self.counters["webhooks_dropped"] += left
            log.warning("webhooks_dropped_at_close", deliveries=left)
        await self._session.close()

    # ---- events -> deliveries ------------------------------------------------------------------

    def _on_event(self, event: dict) -> None:
        """Enqueue the webhook events one supervisor event makes."""
        for name, data in self._translate(event):
            tenant = data.get("tenant")
            for url in self.urls + (self.tenant_urls.get(tenant, ()) if tenant else ()):
                self._enqueue(Delivery(url, name, data))

    def _translate(self, event: dict) -> list[tuple[str, dict]]:
        """(webhook event, its data) pairs for one supervisor event."""
        kind = event["type"]
        base = {"time": event["time"], "node": self.sup.node}
        if kind == "node":
            return [(f"node.{event['state']}", base)]
        base.update(session_id=event["session_id"], tenant=event.get("tenant"))
        sid = session_key(event.get("tenant"), event["session_id"])  # ids are per tenant: remember by key
        if kind == "spawned":
            after = self._crashed.pop(sid, None)
            if after is not None:
                return [("session.restarted", {**base, "after": after})]
            s = self.sup.sessions.get(sid)
            return [("session.created", base)] if s is not None and s.message_count == 0 else []
        if kind == "end":
            if event.get("reason") in states.UNPLANNED:
                self._crashed[sid] = event["reason"]
                while len(self._crashed) > CRASHES_KEPT:
                    self._crashed.popitem(last=False)
            out = [("session.ended", {**base, "reason": event.get("end_reason") or event.get("reason"),
                                      "state": event.get("reason"), "exit": event.get("exit")})]
            if event.get("reason") == states.OOM:
                out.append(("session.oom", {**base, "exit": event.get("exit")}))
            elif event.get("reason") == states.CRASHED:
                out.append(("session.crashed", {**base, "exit": event.get("exit")}))
            return out
        return []

    def _enqueue(self, delivery: Delivery) -> None:
        """Queue a delivery; a full queue drops it (counted, logged)."""
        if self.queue is None:
            return
        try:
            self.queue.put_nowait(delivery)
        except asyncio.QueueFull:
            self.counters["webhooks_dropped"] += 1
            log.warning("webhook_dropped", event=delivery.event, delivery=delivery.id, url=delivery.url,
                        reason="queue full")

    # ---- sending -------------------------------------------------------------------------------

    async def _work(self) -> None:
        """One worker: send deliveries one after another."""
        while True:
            delivery = await self.queue.get()
            try:
                await self._attempt(delivery)
            except Exception as exc:  # never lose the worker to one bad delivery
                log.error("webhook_error", event=delivery.event, delivery=delivery.id, error=repr(exc))
            finally:
                self.queue.task_done()

    async def _attempt(self, delivery: Delivery) -> None:
        """One POST; on a retryable failure, schedule the next within the retry window."""
        if delivery.body is None:
            delivery.body = await self._body(delivery)
        delivery.attempts += 1
        try:
            async with self._session.post(delivery.url, data=delivery.body, headers=self._headers(delivery)) as resp:
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            status, why = None, repr(exc)
        else:
            why = f"HTTP {status}"
        if status is not None and 200 <= status < 300:
            self.counters["webhooks_delivered"] += 1
            return
        if status is not None and 400 <= status < 500 and status not in (408, 429):
            self._give_up(delivery, why)
            return
        backoff = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (delivery.attempts - 1))
        if time.monotonic() + backoff - delivery.made > self.retry_for:
            self._give_up(delivery, why)
            return
        self.counters["webhooks_retried"] += 1
        handle = asyncio.get_running_loop().call_later(backoff, self._retry_due, delivery)
        self._retries.add(handle)
        delivery.retry = handle

    def _retry_due(self, delivery: Delivery) -> None:
        """A retry's backoff has passed: queue it again."""
        self._retries.discard(delivery.retry)
        self._enqueue(delivery)

    def _give_up(self, delivery: Delivery, why: str) -> None:
        """A delivery that will not succeed: counted and logged."""
        self.counters["webhooks_failed"] += 1
        log.warning("webhook_failed", event=delivery.event, delivery=delivery.id, url=delivery.url,
                    attempts=delivery.attempts, error=why)

    def _headers(self, delivery: Delivery) -> dict:
        """The event, the delivery id and the signature."""
        return {"Content-Type": "application/json", "X-Corral-Event": delivery.event,
                "X-Corral-Delivery": delivery.id, "X-Corral-Signature": sign(self.secret, delivery.body)}

    async def _body(self, delivery: Delivery) -> bytes:
        """The JSON body, with what is known only now: the final usage, the output's last lines."""
        data = dict(delivery.data)
        if delivery.event == "session.ended":
            try:
                data["usage"] = await self.sup.usage.of_session(session_key(data["tenant"], data["session_id"]))
            except Exception as exc:  # the store is down: the event still goes, without usage
                data["usage"] = None
                log.warning("webhook_usage_unavailable", delivery=delivery.id, error=str(exc))
        elif delivery.event == "session.crashed":
            data["output"] = [line["line"] for line in self.sup.agent_output(session_key(data["tenant"], data["session_id"]))[-OUTPUT_LINES:]]
        return json.dumps({"id": delivery.id, "type": delivery.event, **data}, separators=(",", ":")).encode()
