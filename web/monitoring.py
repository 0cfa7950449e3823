"""Wires process stats and Prometheus metrics into the app: instruments and middleware.

``app[PROCSTATS]`` (admin rows merge its figures) and ``app[METRICS]`` are created here.
The metrics middleware is the outermost one, so it times whole requests and sees the final JSON
error of every refusal, whichever middleware or handler produced it.
"""

import json
import time

from aiohttp import web

from supervisor.metrics import Metrics
from supervisor.procstats import ProcStats
from web.keys import METRICS, PROCSTATS, SUPERVISOR

# Requests under these paths show process figures: make them fresh (at most one pass a second).
_FIGURE_PATHS = ("/admin/sessions", "/admin/stats", "/metrics")


def install(app: web.Application) -> None:
    """Create the instruments for the app's supervisor and put the middleware in front."""
    sup = app[SUPERVISOR]
    app[PROCSTATS] = ProcStats(sup)
    app[METRICS] = Metrics(sup, app[PROCSTATS])
    app.middlewares.insert(0, metrics_middleware)
    app.middlewares.append(procstats_middleware)  # innermost: after auth has let the request in
    app.on_cleanup.append(_close_metrics)


async def _close_metrics(app: web.Application) -> None:
    """Stop the metrics listening to the supervisor."""
    app[METRICS].close()


@web.middleware
async def procstats_middleware(request: web.Request, handler):
    """Refresh the process figures before a request that shows them."""
    if request.method == "GET" and request.path.startswith(_FIGURE_PATHS):
        await refresh_figures(request.app)
    return await handler(request)


async def refresh_figures(app: web.Application) -> None:
    """Make the process figures fresh (at most a second old), if the app's hook can refresh."""
    refresh = getattr(app.get(PROCSTATS), "refresh", None)  # the admin hook's contract is for_session
    if refresh is not None:
        await refresh()


@web.middleware
async def metrics_middleware(request: web.Request, handler):
    """Time each request by route and count refusals by status and error code."""
    started = time.perf_counter()
    metrics = request.app[METRICS]
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _count(metrics, request, exc, started)
        raise
    except BaseException:
        metrics.observe_refusal(500, "internal_error")
        raise
    _count(metrics, request, response, started)
    return response


def _count(metrics: Metrics, request: web.Request, response: web.StreamResponse, started: float) -> None:
    """Record one answered request (streams are long-lived: they are not timed)."""
    if isinstance(response, web.Response):
        metrics.observe_request(route_of(request), request.method, time.perf_counter() - started)
    if response.status >= 400:
        metrics.observe_refusal(response.status, error_code(response))


def route_of(request: web.Request) -> str:
    """The route template (``/admin/sessions/{id}``), so labels stay few."""
    resource = request.match_info.route.resource
    if resource is None:
        return "unmatched"
    return resource.canonical


def error_code(response: web.StreamResponse) -> str:
    """The ``error.code`` of a JSON error body, else ``http_<status>``."""
    body = getattr(response, "body", None)
    if isinstance(body, (bytes, bytearray)) and response.content_type == "application/json":
        try:
            code = json.loads(body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        if isinstance(code, str) and len(code) <= 64:
            return code
    return f"http_{response.status}"
