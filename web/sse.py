"""Server-Sent Events fan-out: one replay buffer per watched session, one queue per open stream.

A ``SessionChannel`` exists only while a session has listeners (and for ``linger`` seconds after
the last one leaves, so a client that reconnects can resume). It subscribes to the supervisor's
EventBus for its session, numbers each event with an id from one process-wide counter, keeps the
last ``buffer_size`` of them for ``Last-Event-ID`` resumes, and hands each one to every listener's
queue. Nothing runs while a session is idle: no task and no timer per session, only the one-shot
drop timer after the last listener has left.
"""

import asyncio
import contextlib
import itertools
import json
import json.encoder
import time
from collections import deque
from collections.abc import Awaitable, Callable

from corral.supervisor.session_keys import session_key

from corral.supervisor.cluster.activation import ACTIVATED_ELSEWHERE

# The EventBus types a stream carries (``spawned`` is an operator event, not a client one).
STREAM_TYPES = frozenset({"state", "delta", "message", "error", "end"})
# Fields of a bus event that are not for clients (the pid is the operator's business).
_PRIVATE_FIELDS = frozenset({"type", "time", "tenant", "pid"})


class StreamEvent:
    """One numbered event, with its frame as it goes on the wire (encoded once, for every listener).

    A plain slotted class: made for every delta, it is cheaper to build than a frozen dataclass.
    """

    __slots__ = ("id", "type", "data", "frame")

    def __init__(self, event_id: int, event_type: str, data: dict):
        self.id, self.type, self.data = event_id, event_type, data
        self.frame = format_event(event_type, data, event_id)

    def __repr__(self) -> str:
        return f"StreamEvent(id={self.id}, type={self.type!r}, data={self.data!r})"


def _compact_json() -> Callable[[object], str]:
    """``json.dumps(value, separators=(",", ":"))`` without the encoder it builds per call.

    json.dumps makes a JSONEncoder, and its encode a C encoder, for every value: twice the work of
    the encoding itself for a delta's small dict. The C encoder is made once here, with the same
    settings (but no circular-reference check: the data comes from msgpack and JSON, never cyclic).
    """
    settings = json.JSONEncoder(separators=(",", ":"))
    if json.encoder.c_make_encoder is None:  # an interpreter without the C accelerator
        return settings.encode
    encode = json.encoder.c_make_encoder(
        None, settings.default, json.encoder.encode_basestring_ascii, None,
        settings.key_separator, settings.item_separator, False, False, True)
    return lambda value: "".join(encode(value, 0))


_to_json = _compact_json()


def format_event(event_type: str, data: dict, event_id: int | None = None) -> bytes:
    """One SSE frame: ``id``, ``event`` and a single-line JSON ``data`` field."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event_type}\ndata: {_to_json(data)}\n\n".encode()


KEEPALIVE_FRAME = b": keep-alive\n\n"
# Headers of every event-stream response.
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass events through at once
}
MOVED = object()  # put on a stream's queue when another node activated its session: follow it there


class EventQueue:
    """A stream's bounded queue, read a batch at a time: the reader takes everything queued at once.

    Unlike an ``asyncio.Queue`` (a wakeup per put, a ``get`` per item), a put costs an append and
    wakes the reader only if it waits, so events that come while it is busy cost it one wakeup
    between them. ``close`` ends it after what is already queued; later puts are ignored.
    """

    __slots__ = ("items", "maxsize", "closed", "_waiter")

    def __init__(self, maxsize: int):
        self.items: deque = deque()
        self.maxsize = maxsize
        self.closed = False
        self._waiter: asyncio.Future | None = None

    def put(self, item) -> bool:
        """Queue an item; False (and nothing queued) when the queue is full."""
        if self.closed:
            return True
        if len(self.items) >= self.maxsize:
            return False
        self.items.append(item)
        self._wake()
        return True

    def close(self) -> None:
        """End the queue: its reader stops once it has taken what is queued."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        """Wake the reader if it waits (once: later puts find its waiter done)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until something is queued or the queue is closed."""
        while not self.items and not self.closed:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def take(self) -> list:
        """Everything queued, oldest first; the queue is left empty."""
        items = list(self.items)
        self.items.clear()
        return items

    def keep(self, predicate: Callable[[object], bool]) -> None:
        """Drop the queued items ``predicate`` refuses."""
        self.items = deque(item for item in self.items if predicate(item))

    def qsize(self) -> int:
        """How many items are queued."""
        return len(self.items)

    def empty(self) -> bool:
        """Whether nothing is queued."""
        return not self.items


async def serve_queue(queue: EventQueue, period: float, on_items: Callable[[list], Awaitable[None]],
                      on_tick: Callable[[], Awaitable[None]], *, steady: bool = False) -> None:
    """The loop of every event stream: hand the queued items to ``on_items`` until the queue is closed
    and empty, or the client leaves.

    Whatever is queued when the stream's task runs goes to ``on_items`` at once, in order: a
    stream whose events come faster than it is scheduled (a burst of deltas, a busy loop, a
    client slow to read) is woken and written once per batch, not once per event. ``on_tick``
    runs when ``period`` seconds pass without an item (a keep-alive), or, ``steady``, every
    ``period`` seconds whatever comes (the dashboard's figures). One timer per open stream, armed
    only while it waits on an empty queue; none at all while no stream is open.
    """
    loop = asyncio.get_running_loop()
    due = loop.time() + period
    with contextlib.suppress(ConnectionError):  # the client went away
        while True:
            if not queue.items and not queue.closed:
                try:
                    async with asyncio.timeout(max(0.0, due - loop.time())):
                        await queue.wait()
                except TimeoutError:
                    pass
            items = queue.take()
            if items:
                await on_items(items)
                if not steady:
                    due = loop.time() + period
            if queue.closed and not queue.items:
                return
            if loop.time() >= due:
                await on_tick()
                due = loop.time() + period


def client_data(event: dict) -> dict:
    """The part of a bus event a client sees."""
    if event["type"] == "message":
        return {"session_id": event["session_id"], **event["message"]}
    return {key: value for key, value in event.items() if key not in _PRIVATE_FIELDS}


class Listener:
    """One open stream's end of a channel: a bounded queue the stream's handler drains."""

    def __init__(self, channel: "SessionChannel", queue_size: int):
        self.channel = channel
        self.queue = EventQueue(queue_size)

    @property
    def closed(self) -> bool:
        """Whether the stream takes no more events."""
        return self.queue.closed

    def deliver(self, item) -> None:
        """Queue an event; a listener too slow to keep up is closed (it resumes on reconnect)."""
        if not self.queue.put(item):
            self.close_stream()

    def close_stream(self) -> None:
        """End the stream after what is already queued (nothing queued is dropped)."""
        self.queue.close()

    def leave(self) -> None:
        """The stream is over: stop receiving events."""
        self.queue.close()
        self.channel.remove(self)


class SessionChannel:
    """One session's events for one tenant: the replay buffer and the listeners."""

    def __init__(self, hub: "StreamHub", tenant: str, session_id: str):
        self.hub, self.tenant, self.session_id = hub, tenant, session_id
        self.session_key = session_key(tenant, session_id)  # the tenant's own session: ids are per tenant
        self.buffer: deque[StreamEvent] = deque(maxlen=hub.buffer_size)
        # Ids up to ``floor`` are not in the buffer (before this channel, or evicted).
        self.floor = hub.last_id
        self.listeners: set[Listener] = set()
        self._drop_timer: asyncio.TimerHandle | None = None
        self._unsubscribe = hub.bus.subscribe_session(self.session_key, self._on_event)

    @property
    def last_id(self) -> int:
        """The id of the newest event in the buffer (or the floor when there is none)."""
        return self.buffer[-1].id if self.buffer else self.floor

    def _on_event(self, event: dict) -> None:
        """Number, buffer and fan out one bus event of this session (run for every delta: kept lean)."""
        event_type = event["type"]
        if event_type == ACTIVATED_ELSEWHERE:
            for listener in list(self.listeners):
                listener.deliver(MOVED)
            return
        if event_type not in STREAM_TYPES or not self.hub.owned_by(self.session_key, self.tenant):
            return
        buffer = self.buffer
        if len(buffer) == buffer.maxlen:
            self.floor = buffer[0].id
        numbered = StreamEvent(self.hub.next_id(), event_type, client_data(event))
        buffer.append(numbered)
        for listener in self.listeners:  # delivering never adds or removes a listener
            listener.deliver(numbered)

    def add(self) -> Listener:
        """A new listener; cancels a pending drop."""
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None
        listener = Listener(self, self.hub.queue_size)
        self.listeners.add(listener)
        return listener

    def remove(self, listener: Listener) -> None:
        """Forget a listener; the last one out arms the drop timer."""
        self.listeners.discard(listener)
        if not self.listeners and self._drop_timer is None and self.hub.channels.get(self.key) is self:
            if self.hub.linger <= 0:
                self.drop()
            else:
                self._drop_timer = asyncio.get_running_loop().call_later(self.hub.linger, self.drop)

    @property
    def key(self) -> tuple[str, str]:
        """The hub's key of this channel."""
        return (self.tenant, self.session_id)

    def events_after(self, last_id: int) -> list[StreamEvent] | None:
        """The buffered events after ``last_id``; None when some of them are no longer kept."""
        if last_id < self.floor or last_id > self.last_id:
            return None
        return [e for e in self.buffer if e.id > last_id]

    def drop(self) -> None:
        """Unsubscribe and release the buffer (nobody listens any more, or the server stops)."""
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None
        self._unsubscribe()
        self.buffer.clear()
        if self.hub.channels.get(self.key) is self:
            del self.hub.channels[self.key]
        for listener in list(self.listeners):
            listener.close_stream()


class StreamHub:
    """Every open session channel of one server, and the stream settings."""

    def __init__(
        self,
        bus,
        owner_of: Callable[[str], str | None],
        *,
        keepalive: float = 15.0,
        linger: float = 60.0,
        buffer_size: int = 256,
        queue_size: int = 1024,
    ):
        self.bus = bus
        self._owner_of = owner_of
        self.keepalive = keepalive  # seconds between keep-alive comments on a quiet stream
        self.linger = linger  # seconds a channel outlives its last listener (for resumes); 0: none
        self.buffer_size = buffer_size  # events kept per session for Last-Event-ID
        self.queue_size = queue_size  # events a listener may fall behind before it is dropped
        self.channels: dict[tuple[str, str], SessionChannel] = {}
        # Seeded from the clock so ids keep increasing across a restart of the server.
        self._ids = itertools.count(time.time_ns() // 1000)
        self.last_id = next(self._ids)

    def next_id(self) -> int:
        """The next event id (process-wide, so a session's ids increase across channel lifetimes)."""
        self.last_id = next(self._ids)
        return self.last_id

    def owned_by(self, key: str, tenant: str) -> bool:
        """Whether the session (if it exists) belongs to the tenant; events of others are not sent."""
        owner = self._owner_of(key)
        return owner is None or owner == tenant

    def listen(self, tenant: str, session_id: str) -> Listener:
        """Join (or open) the session's channel."""
        channel = self.channels.get((tenant, session_id))
        if channel is None:
            channel = self.channels[(tenant, session_id)] = SessionChannel(self, tenant, session_id)
        return channel.add()

    def close(self) -> None:
        """End every stream (server shutdown)."""
        for channel in list(self.channels.values()):
            channel.drop()
