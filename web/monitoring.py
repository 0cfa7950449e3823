"""Wires process stats and Prometheus metrics into the app: the instruments and what feeds them.

``app[PROCSTATS]`` (admin rows merge its figures) and ``app[METRICS]`` are created here; the
front door (web/middleware.py) times every request and counts every refusal with ``count``.
"""

import time

from aiohttp import web

from corral.supervisor.metrics import Metrics
from corral.supervisor.procstats import ProcStats
from corral.web.keys import ERROR_CODE, METRICS, PROCSTATS, SUPERVISOR

# Requests under these paths show process figures: make them fresh (at most one pass a second).
_FIGURE_PATHS = ("/admin/sessions", "/admin/stats", "/metrics")


def install(app: web.Application) -> None:
    """Create the instruments for the app's supervisor (web.middleware.front_door feeds them)."""
    sup = app[SUPERVISOR]
    app[PROCSTATS] = ProcStats(sup)
    app[METRICS] = Metrics(sup, app[PROCSTATS])
    app.cleanup_ctx.append(_metrics_listening)


async def _metrics_listening(app: web.Application):
    """The metrics listen to the supervisor while the app runs; at cleanup they stop."""
    yield
    app[METRICS].close()


def shows_figures(request: web.Request) -> bool:
    """Whether a request shows process figures, which must then be fresh."""
    return request.method == "GET" and request.path.startswith(_FIGURE_PATHS)


async def refresh_figures(app: web.Application) -> None:
    """Make the process figures fresh (at most a second old), if the app's hook can refresh."""
    refresh = getattr(app.get(PROCSTATS), "refresh", None)  # the admin hook's contract is for_session
    if refresh is not None:
        await refresh()


def count(metrics: Metrics, request: web.Request, response: web.StreamResponse, started: float) -> None:
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
    """The ``error.code`` a JSON error answer was made with (web/error_responses.py), else ``http_<status>``."""
    return response.get(ERROR_CODE) or f"http_{response.status}"
