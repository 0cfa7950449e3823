"""The one middleware of the app: metrics around JSON errors around auth (and, in dev mode, the
browser guard of web/browser_guard.py) and fresh figures.

These were four middlewares (metrics, errors, auth, process figures). Every layer costs a
coroutine and a call per request, ~10% of a warm chat request in the profile, so they are
the steps of one. Metrics stay outermost: they time whole requests and see the final JSON
error of every refusal, whichever step or handler produced it. CORS preflights, when origins
are configured, are answered by web/cors.py's middleware inside this one.
"""

import time

from aiohttp import web

from corral.web.auth import refusal
from corral.web.browser_guard import browser_refusal
from corral.web.error_responses import json_error
from corral.web.keys import METRICS
from corral.web.monitoring import count, refresh_figures, shows_figures


@web.middleware
async def front_door(request: web.Request, handler):
    """Time and count the request; answer errors as JSON; let in only who may come."""
    started = time.perf_counter()
    metrics = request.app[METRICS]
    try:
        try:
            response = browser_refusal(request) or refusal(request)
            if response is None:
                if shows_figures(request):
                    await refresh_figures(request.app)
                response = await handler(request)
        except Exception as exc:
            response = json_error(request, exc)
            if response is None:
                raise
    except web.HTTPException as exc:
        count(metrics, request, exc, started)
        raise
    except BaseException:
        metrics.observe_refusal(500, "internal_error")
        raise
    count(metrics, request, response, started)
    return response
