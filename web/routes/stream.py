"""GET /api/chat/stream: a session's events as Server-Sent Events, pushed as they happen.

On connect the stream sends a ``state`` snapshot (read from memory and the store; a session
with no process is not spawned), then ``state``, ``delta``, ``message``, ``error`` and ``end``
events as the supervisor publishes them. A client that reconnects with ``Last-Event-ID`` gets
exactly the events it missed while they are still buffered, else a fresh snapshot.
"""

import contextlib

from aiohttp import web

from corral.web import forward, paths
from corral.web.requests import find_session, remember_session, requested_session_id, tenant_of
from corral.web.sse import (
    KEEPALIVE_FRAME, MOVED, SSE_HEADERS, Listener, StreamEvent, StreamHub, format_event, serve_queue,
)
from corral.web.session_json import message_view, new_session_view, session_view
from corral.web.keys import SUPERVISOR

routes = web.RouteTableDef()
STREAMS = web.AppKey("streams", StreamHub)
RETRY_MS = 2000  # how long an EventSource waits before reconnecting


def setup(app: web.Application) -> StreamHub:
    """Give the app its stream hub; every open stream ends when the app shuts down."""
    sup = app[SUPERVISOR]

    def owner_of(key: str) -> str | None:
        """The tenant of a session the supervisor holds (by its key)."""
        s = sup.sessions.get(key)
        return s.tenant if s is not None else None

    hub = app[STREAMS] = StreamHub(sup.events, owner_of)
    app.on_shutdown.append(_close_streams)
    return hub


async def _close_streams(app: web.Application) -> None:
    """End open streams so shutdown does not wait on them."""
    app[STREAMS].close()


@routes.get(paths.STREAM, allow_head=False)  # an endless body has no HEAD form
async def chat_stream(request: web.Request) -> web.StreamResponse:
    """Stream one session's events until the client goes away."""
    sid = requested_session_id(request)
    await find_session(request, sid, missing_ok=True)  # 404 here for another tenant's session
    # Join before reading anything, so no event falls between the snapshot and the live stream.
    listener = request.app[STREAMS].listen(tenant_of(request), sid)
    try:
        backlog = await _first_frames(request, listener, sid)
        response = await _open(request, sid)
        moved = await _pump(response, listener, backlog, request.app[STREAMS].keepalive)
    finally:
        listener.leave()
    if moved:  # another node activated the session: its events are there now
        owner = await request.app[SUPERVISOR].activation.owner_url(sid)
        if owner is not None:
            await forward.follow_stream(request, response, owner)
    return response


def last_event_id(request: web.Request) -> int | None:
    """The client's ``Last-Event-ID`` as a number, or None (absent or not one of ours)."""
    raw = request.headers.get("Last-Event-ID", "").strip()
    # ASCII and short: headers may carry other Unicode digits, and int() refuses very long numbers.
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 20 else None


async def _first_frames(request: web.Request, listener: Listener, sid: str) -> list[bytes]:
    """What the stream starts with: the missed events on a resume, else a state snapshot."""
    channel = listener.channel
    resume_from = last_event_id(request)
    if resume_from is not None:
        missed = channel.events_after(resume_from)
        if missed is not None:
            return [event.frame for event in missed]
    snapshot_id = channel.last_id
    snapshot = await _snapshot(request, sid)
    _drop_covered_messages(listener, snapshot)
    return [format_event("state", snapshot, snapshot_id)]


async def _snapshot(request: web.Request, sid: str) -> dict:
    """What ``GET /api/state`` answers, read after joining (never starts a process)."""
    found, history = await request.app[SUPERVISOR].queries.history(sid, tenant_of(request))
    if found is None:
        return new_session_view(sid, messages=[])
    return session_view(found, messages=[message_view(m) for m in history])


def _drop_covered_messages(listener: Listener, snapshot: dict) -> None:
    """Drop queued ``message`` events the snapshot already holds (they arrived while it was read)."""
    newest = snapshot["messages"][-1]["seq"] if snapshot["messages"] else 0
    listener.queue.keep(lambda item: not (isinstance(item, StreamEvent) and item.type == "message"
                                          and item.data.get("seq", 0) <= newest))


async def _open(request: web.Request, sid: str) -> web.StreamResponse:
    """Send the headers of the event stream."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    remember_session(response, sid)
    await response.prepare(request)
    await response.write(f"retry: {RETRY_MS}\n\n".encode())
    return response


async def _pump(response: web.StreamResponse, listener: Listener, backlog: list[bytes], keepalive: float) -> bool:
    """Write the backlog, then the events as they come, with a keep-alive comment when quiet.

    The events queued since the last write go out in one write (one HTTP chunk, one send): a
    stream that falls behind catches up at the cost of one write, not one per event.
    True when it stopped because another node activated the session (the stream follows it there).
    """
    moved = False

    async def write(items: list) -> None:
        nonlocal moved
        frames = []
        for item in items:
            if item is MOVED:
                moved = True
                listener.close_stream()  # what is queued before the move still goes out
            else:
                frames.append(item.frame)
        if frames:
            await response.write(b"".join(frames))

    async def keep_alive() -> None:
        await response.write(KEEPALIVE_FRAME)

    with contextlib.suppress(ConnectionError):
        await response.write(b"".join(backlog))
        await serve_queue(listener.queue, keepalive, write, keep_alive)
    return moved
