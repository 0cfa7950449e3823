"""Cross-origin access: same-origin only unless ``--cors-origins`` names origins (or ``*``).

With no origins configured the server sends no CORS headers at all, so browsers keep pages of
other origins out. Listed origins get their requests' responses marked readable (errors and
event streams included) and their preflight ``OPTIONS`` requests answered here.
"""

from aiohttp import web

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, X-Session-Id, Last-Event-ID"
EXPOSE_HEADERS = "X-Session-Id, Retry-After"
PREFLIGHT_MAX_AGE = "600"


class CorsPolicy:
    """Which origins may read responses, and the headers that say so."""

    def __init__(self, origins):
        self.any = "*" in origins
        self.origins = frozenset(o.rstrip("/") for o in origins if o != "*")

    def allows(self, origin: str | None) -> bool:
        """Whether a request from this origin may read the response."""
        return bool(origin) and (self.any or origin in self.origins)

    def headers(self, origin: str) -> dict:
        """The response headers for an allowed origin."""
        if self.any:
            # "*" cannot carry credentials; listed origins can (cookie-based session ids).
            return {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": EXPOSE_HEADERS}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Expose-Headers": EXPOSE_HEADERS,
            "Vary": "Origin",
        }

    def preflight_headers(self, origin: str, request: web.Request) -> dict:
        """The answer to a preflight: what may be sent, and for how long to remember it."""
        requested = request.headers.get("Access-Control-Request-Headers")
        return {
            **self.headers(origin),
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": requested or ALLOW_HEADERS,
            "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
        }


def setup(app: web.Application, origins) -> None:
    """Install CORS on the app when origins are configured; otherwise leave it same-origin."""
    if not origins:
        return
    policy = CorsPolicy(origins)
    app.middlewares.append(_preflight_middleware(policy))  # inside the front door: counted, never refused
    app.on_response_prepare.append(_marker(policy))


def _is_preflight(request: web.Request) -> bool:
    """An OPTIONS request a browser sends before a cross-origin call."""
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def _preflight_middleware(policy: CorsPolicy):
    """Answer preflights from allowed origins; everything else goes on to the routes."""

    @web.middleware
    async def cors_preflight(request: web.Request, handler):
        """204 with the allowed methods and headers for an allowed origin's preflight."""
        origin = request.headers.get("Origin")
        if _is_preflight(request) and policy.allows(origin):
            return web.Response(status=204, headers=policy.preflight_headers(origin, request))
        return await handler(request)

    return cors_preflight


def _marker(policy: CorsPolicy):
    """A response-prepare hook: mark every response to an allowed origin (streams included)."""

    async def mark(request: web.Request, response: web.StreamResponse) -> None:
        """Add the CORS headers before the response's headers go out."""
        origin = request.headers.get("Origin")
        if policy.allows(origin) and "Access-Control-Allow-Origin" not in response.headers:
            response.headers.update(policy.headers(origin))

    return mark
