"""GET /health."""

from aiohttp import web

from web.version import VERSION
from web.keys import SUPERVISOR

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """Status, version, live sessions and the memory-limit mechanism."""
    sup = request.app[SUPERVISOR]
    info = sup.health()
    return web.json_response({"status": "ok", "version": VERSION, **info})
