"""GET /metrics: Prometheus text format from the app's own registry."""

from aiohttp import web

from corral.supervisor.metrics import CONTENT_TYPE
from corral.web import paths
from corral.web.keys import METRICS

routes = web.RouteTableDef()


@routes.get(paths.METRICS)
async def metrics(request: web.Request) -> web.Response:
    """Every metric of this server (process figures at most a second old)."""
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
