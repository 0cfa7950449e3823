"""GET /health."""

from aiohttp import web

from web.auth import is_admin
from web.version import VERSION
from web.keys import SUPERVISOR

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """Status, version, live sessions and the memory-limit mechanism; the sandbox layers for the admin."""
    sup = request.app[SUPERVISOR]
    info = sup.health()
    if not is_admin(request):
        info.pop("sandbox", None)  # which layers are missing is a map for an attacker
    return web.json_response({"status": "ok", "version": VERSION, **info})
