"""GET /admin/nodes: the cluster's nodes with their lease age, sessions and memory (admin token)."""

from aiohttp import web

from corral.web import paths
from corral.web.keys import SUPERVISOR

routes = web.RouteTableDef()


@routes.get(paths.ADMIN_NODES)
async def list_nodes(request: web.Request) -> web.Response:
    """Every node in the membership table (just this one without a cluster)."""
    sup = request.app[SUPERVISOR]
    return web.json_response({"node": sup.node, "nodes": await sup.queries.cluster_nodes()})
