"""GET /metrics: Prometheus text format from the app's own registry."""

from aiohttp import web

from corral.supervisor.metrics import CONTENT_TYPE
from corral.web import paths
from corral.web.auth import may_see_tenants
from corral.web.keys import METRICS

routes = web.RouteTableDef()


@routes.get(paths.METRICS)
async def metrics(request: web.Request) -> web.Response:
    """Every metric of this server (process figures at most a second old); tenant names only to the operator."""
    body = request.app[METRICS].exposition(tenants=may_see_tenants(request))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
