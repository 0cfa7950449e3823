"""GET /health."""

from aiohttp import web

from corral.web import paths
from corral.web.auth import may_administer
from corral.web.version import VERSION
from corral.web.keys import SUPERVISOR

routes = web.RouteTableDef()


@routes.get(paths.HEALTH)
async def health(request: web.Request) -> web.Response:
    """Status and version; to whoever may use the admin API also live sessions, pids and the limit mechanism.

    A stopping server answers 503 (``status`` ``draining``, and the error shape of every 503), so a
    balancer's readiness check sends it no more.
    """
    sup = request.app[SUPERVISOR]
    body = {"status": "ok", "version": VERSION}
    if may_administer(request):  # pids and cgroup paths are the operator's, not the tenants'
        body.update(sup.health())
    if sup.drain.draining:
        body.update(status="draining", error={"code": "shutting_down", "message": "the server is stopping"})
        return web.json_response(body, status=503, headers={"Retry-After": "5"})
    return web.json_response(body)
