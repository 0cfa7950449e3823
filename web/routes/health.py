"""GET /health."""

from aiohttp import web

from corral.web import paths
from corral.web.auth import may_administer
from corral.web.version import VERSION
from corral.web.keys import SUPERVISOR

routes = web.RouteTableDef()


@routes.get(paths.HEALTH)
async def health(request: web.Request) -> web.Response:
    """Status and version; to whoever may use the admin API also live sessions, pids and the limit mechanism."""
    if not may_administer(request):  # pids and cgroup paths are the operator's, not the tenants'
        return web.json_response({"status": "ok", "version": VERSION})
    return web.json_response({"status": "ok", "version": VERSION, **request.app[SUPERVISOR].health()})
