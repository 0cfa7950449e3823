"""The pages (``/`` chat, ``/admin`` dashboard, ``/static/``) and the admin event stream.

``GET /admin/events`` (admin token, like every ``/admin/`` path) is SSE: a ``sessions`` snapshot
of the live sessions on connect, then the supervisor's ``state``, ``spawned`` and ``end`` events as they happen, and
a ``figures`` event with every live session's process figures every ``FIGURES_EVERY`` seconds
while the stream is open (it doubles as the keep-alive; one timer per watching dashboard, none
when nobody watches). In a cluster the tick sends a whole ``sessions`` snapshot instead, with the
other nodes' live sessions asked of them, so the dashboard shows every node's (docs/cluster.md).
"""

from pathlib import Path

from aiohttp import web

from corral.supervisor.views import LIVE_FILTER
from corral.web import forward, paths
from corral.web.monitoring import refresh_figures
from corral.web.sse import SSE_HEADERS, EventQueue, format_event, serve_queue
from corral.web.session_json import admin_row
from corral.web.keys import EVENT_STREAMS, PROCSTATS, SUPERVISOR

STATIC = Path(__file__).resolve().parent.parent / "static"
FIGURES_EVERY = 2.0
QUEUE_BOUND = 1000  # events a slow dashboard may fall behind before it is sent a fresh snapshot
_FORWARDED = frozenset({"state", "spawned", "end"})
_VENDOR_TYPES = {".js": "text/javascript", ".css": "text/css"}

routes = web.RouteTableDef()


@routes.get(paths.CHAT_PAGE)
async def chat_page(request: web.Request) -> web.FileResponse:
    """The chat page."""
    return _page("index.html")


@routes.get(paths.DASHBOARD_PAGE)
async def admin_page(request: web.Request) -> web.FileResponse:
    """The dashboard page (it asks for the admin token; the data it loads needs it)."""
    return _page("admin.html")


@routes.get(paths.STATIC_FILE)
async def static_file(request: web.Request) -> web.FileResponse:
    """One of the pages' files; a name that is none of them is the JSON 404 of any unknown path.

    A route of its own rather than ``add_static``: aiohttp's static files answer a missing one
    with an empty 404 from inside the response, past the JSON errors.
    """
    path = STATIC / request.match_info["name"]  # {name} holds no "/"
    if not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path)


@routes.get(paths.STATIC_VENDOR_FILE)
async def vendor_file(request: web.Request) -> web.FileResponse:
    """A file of a library shipped with the pages (web/static/vendor/LIBRARY/: uPlot, its license beside it)."""
    vendor = STATIC / "vendor"
    path = (vendor / request.match_info["library"] / request.match_info["name"]).resolve()
    if path.parent.parent != vendor or not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers={"Content-Type": _VENDOR_TYPES.get(path.suffix, "text/plain")})


def _page(name: str) -> web.FileResponse:
    """A page that is never cached stale: it references the static files it needs."""
    return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})


@routes.get(paths.ADMIN_EVENTS)
async def admin_events(request: web.Request) -> web.StreamResponse:
    """SSE of session events for the dashboard."""
    sup = request.app[SUPERVISOR]
    queue = EventQueue(QUEUE_BOUND)
    overflowed = False

    def on_event(event: dict) -> None:
        nonlocal overflowed
        if not overflowed and not queue.put(event):
            overflowed = True  # the writer catches up by sending a fresh snapshot

    async def send(items: list[dict]) -> None:
        """The queued events in one write; once the queue has overflowed, a fresh snapshot instead of what it dropped."""
        nonlocal overflowed
        if overflowed:
            _drain(queue)
            overflowed = False
            await _send_snapshot(request, response)
        else:
            await response.write(b"".join(format_event(item["type"], item) for item in items))

    async def tick() -> None:
        """Every FIGURES_EVERY seconds: the figures (in a cluster, a snapshot: other nodes change too)."""
        if sup.membership is not None:
            await _send_snapshot(request, response)
        else:
            await _send_figures(request, response)

    response = await _open_stream(request)
    streams = request.app[EVENT_STREAMS]
    streams.add(queue)
    unsubscribe = sup.events.subscribe(on_event, types=_FORWARDED)
    try:
        await _send_snapshot(request, response)
        await serve_queue(queue, FIGURES_EVERY, send, tick, steady=True)
    except ConnectionError:
        pass  # the dashboard went away
    finally:
        unsubscribe()
        streams.discard(queue)
    return response


async def _open_stream(request: web.Request) -> web.StreamResponse:
    """Start an SSE response."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    return response


def _drain(queue: EventQueue) -> None:
    """Drop what a slow reader missed (a snapshot replaces it)."""
    queue.take()


async def _send_snapshot(request: web.Request, response: web.StreamResponse) -> None:
    """Every live session, with fresh figures (in a cluster, every node's, asked of each)."""
    await refresh_figures(request.app)
    stats = request.app.get(PROCSTATS)
    sup = request.app[SUPERVISOR]
    sessions = [{**admin_row(v, stats), "node": v.node} for v in sup.queries.held_views(state=LIVE_FILTER)]
    if sup.membership is not None:
        sessions += await forward.live_rows_elsewhere(request, None, 1000)
    await _send(response, "sessions", {"sessions": sessions})


async def _send_figures(request: web.Request, response: web.StreamResponse) -> None:
    """The process figures of every live session."""
    await refresh_figures(request.app)
    stats = request.app[PROCSTATS]
    figures = {v.key: stats.for_session(v) for v in request.app[SUPERVISOR].queries.held_views(state=LIVE_FILTER)}
    await _send(response, "figures", {"figures": figures})


async def _send(response: web.StreamResponse, event: str, data: dict) -> None:
    """Write one SSE event."""
    await response.write(format_event(event, data))


async def close_event_streams(app: web.Application) -> None:
    """On shutdown, end every open dashboard stream so the server can stop at once."""
    for queue in list(app[EVENT_STREAMS]):
        _drain(queue)
        queue.close()


def install(app: web.Application) -> None:
    """Add the pages, their files and the event stream to the app."""
    app[EVENT_STREAMS] = set()
    app.add_routes(routes)
    app.on_shutdown.append(close_event_streams)
