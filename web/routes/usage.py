"""Usage and the plots' data: per-tenant totals (admin and a tenant's own), the node's timeline, a session's.

``GET /admin/usage`` sums every tenant's usage over a period from the store (every node's share);
``GET /api/usage`` is the same for the calling tenant only. ``GET /admin/timeline`` is this node's
last hour and ``GET /admin/sessions/{id}/timeline`` one session's life, from the in-memory rings
(supervisor/timeline.py).
"""

import time
from datetime import datetime, timezone

from aiohttp import web

from corral.supervisor import errors
from corral.supervisor.session_keys import session_key
from corral.web import forward, paths
from corral.web.requests import checked_session_id, tenant_of
from corral.web.keys import SUPERVISOR

routes = web.RouteTableDef()

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, *, now: float | None = None) -> float:
    """Unix seconds from a number of seconds, an ISO 8601 date or time (UTC unless it says), or an age (30m, 24h, 7d)."""
    text = text.strip()
    now = time.time() if now is None else now
    if text[-1:] in _UNITS and text[:-1].replace(".", "", 1).isdigit():
        return now - float(text[:-1]) * _UNITS[text[-1]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("expected unix seconds, an ISO 8601 time or an age such as 24h or 7d") from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def _period(request: web.Request) -> tuple[float | None, float | None]:
    """The ``since`` and ``until`` query parameters; 400 naming the bad one."""
    bounds = []
    for name in ("since", "until"):
        raw = request.query.get(name)
        try:
            bounds.append(parse_time(raw) if raw else None)
        except ValueError as exc:
            raise errors.InvalidRequest(f"query parameter '{name}': {exc}", code="wrong_type") from None
    since, until = bounds
    if since is not None and until is not None and until < since:
        raise errors.InvalidRequest("query parameter 'until' is before 'since'", code="wrong_type")
    return since, until


def _answer(tenants: dict, since, until) -> web.Response:
    """The usage body: the period and each tenant's sums."""
    return web.json_response({"since": since, "until": until, "hour_granularity": True, "tenants": tenants})


@routes.get(paths.ADMIN_USAGE)
async def admin_usage(request: web.Request) -> web.Response:
    """Per-tenant usage over a period (``tenant`` narrows it to one)."""
    since, until = _period(request)
    tenant = request.query.get("tenant") or None
    sup = request.app[SUPERVISOR]
    found = await sup.usage.by_tenant(tenant=tenant, since=since, until=until)
    return _answer(found, since, until)


@routes.get(paths.USAGE)
async def tenant_usage(request: web.Request) -> web.Response:
    """The calling tenant's own usage over a period."""
    since, until = _period(request)
    tenant = tenant_of(request)
    sup = request.app[SUPERVISOR]
    found = await sup.usage.by_tenant(tenant=tenant, since=since, until=until)
    return _answer({tenant: found[tenant]} if tenant in found else {}, since, until)


@routes.get(paths.ADMIN_TIMELINE)
async def node_timeline(request: web.Request) -> web.Response:
    """This node's last hour: live sessions, memory, CPU, turns a second, ends by reason (in a cluster, every node's too)."""
    sup = request.app[SUPERVISOR]
    own = {"node": sup.node, **sup.usage.timeline.node()}
    if sup.membership is None or forward.FORWARDED_BY in request.headers:
        return web.json_response(own)
    others = await forward.ask_peers(request, paths.ADMIN_TIMELINE)
    return web.json_response({**own, "cluster": [own, *sorted(others, key=lambda n: n.get("node", ""))]})


@routes.get(paths.ADMIN_SESSION_TIMELINE)
async def session_timeline(request: web.Request) -> web.Response:
    """One session's memory and CPU over its life (this node's ring), and its usage."""
    sid = checked_session_id(request.match_info["session_id"])
    sup = request.app[SUPERVISOR]
    # whose session: ?tenant=, else the one tenant with that id (409 if several), as every admin route
    tenant = await sup.queries.tenant_of(sid, request.query.get("tenant") or None)
    series = sup.usage.timeline.session(session_key(tenant, sid))
    if series is None:
        raise errors.SessionNotFound(f"no timeline of session {sid} on this node")
    return web.json_response({"session_id": sid, **series})
