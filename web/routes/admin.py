"""The admin API (admin token): list, inspect, kill and interrupt sessions, read their agents' output; stats.

Rows merge the sessions this node holds in memory (live, or recently crashed) with the ones only
the store knows (ended, or live on another node), newest first. In a cluster, ``?state=live``
also asks every other live node for its own live sessions (web/forward.py), so any node shows
every process with its pid and memory.
"""

from aiohttp import web

from corral.supervisor import errors, states
from corral.supervisor.views import LIVE_FILTER, SessionView
from corral.web import forward, paths
from corral.web.requests import checked_session_id, query_bool, query_int
from corral.web.session_json import admin_row
from corral.web.keys import BACKGROUND, OWNER_UNREACHABLE, PROCSTATS, SUPERVISOR

routes = web.RouteTableDef()


@routes.get(paths.ADMIN_SESSIONS)
async def list_sessions(request: web.Request) -> web.Response:
    """Sessions, filtered by ``tenant`` and ``state`` (a state or ``live``), paginated."""
    tenant = request.query.get("tenant") or None
    state = request.query.get("state") or None
    if state is not None and state not in states.ALL and state != LIVE_FILTER:
        raise errors.InvalidRequest(f"state must be one of {sorted(states.ALL)} or '{LIVE_FILTER}'", code="wrong_type")
    limit = query_int(request, paths.ADMIN_LIMIT)
    offset = query_int(request, paths.ADMIN_OFFSET)
    rows = await _rows(request, tenant, state, limit + 1, offset)
    more = len(rows) > limit
    return web.json_response(
        {"sessions": rows[:limit], "limit": limit, "offset": offset, "next_offset": offset + limit if more else None}
    )


async def _rows(request: web.Request, tenant: str | None, state: str | None, want: int, offset: int) -> list[dict]:
    """Rows ``offset .. offset+want`` of memory and store merged, newest first (live: from every node)."""
    app = request.app
    sup = app[SUPERVISOR]
    rows = [{**admin_row(v, app.get(PROCSTATS)), "node": v.node} for v in sup.queries.held_views(tenant, state)]
    if state == LIVE_FILTER and forward.FORWARDED_BY not in request.headers:
        rows += await forward.live_rows_elsewhere(request, tenant, offset + want)
    if state != LIVE_FILTER:
        rows += [admin_row(v) for v in await sup.queries.stored_views(tenant, state, offset + want)]
    rows.sort(key=lambda row: (-row["created_at"], row["session_id"], row["tenant"]))
    return rows[offset : offset + want]


async def _named(request: web.Request) -> tuple[str, str]:
    """The session id in the path and its tenant: ``?tenant=``, else the one tenant with that id (409 if several)."""
    sid = checked_session_id(request.match_info["session_id"])
    return sid, await request.app[SUPERVISOR].queries.tenant_of(sid, request.query.get("tenant") or None)


async def _found(request: web.Request) -> SessionView:
    """The session named in the path (memory, else store), any tenant; 404 if unknown."""
    sid, tenant = await _named(request)
    found = await request.app[SUPERVISOR].queries.find(sid, tenant, stored=request.get(OWNER_UNREACHABLE, False))
    if found is None:
        raise errors.SessionNotFound(f"no session {sid}")
    return found


@routes.get(paths.ADMIN_SESSION)
async def get_session(request: web.Request) -> web.Response:
    """One session's row."""
    found = await _found(request)
    usage = await request.app[SUPERVISOR].usage.of_session(found.key)
    return web.json_response({**admin_row(found, request.app.get(PROCSTATS)), "node": found.node, "usage": usage})


@routes.get(paths.ADMIN_SESSION_LOGS)
async def session_logs(request: web.Request) -> web.Response:
    """The last lines its agent processes wrote to stdout and stderr, oldest first (``?lines=N``: the last N)."""
    sup = request.app[SUPERVISOR]
    want = query_int(request, paths.LOG_LINES, sup.config.agent_log_lines)
    found = await _found(request)
    lines = sup.agent_output(found.key)
    return web.json_response({
        "session_id": found.id,
        "tenant": found.tenant,
        "lines": lines[-want:] if want else [],
        "kept": sup.config.agent_log_lines,
    })


@routes.delete(paths.ADMIN_SESSION)
async def kill_session(request: web.Request) -> web.Response:
    """Kill a live session (202 while it stops); a down one is forgotten (its restart budget too).

    ``?purge=true`` also deletes the session's messages and record.
    """
    purge = query_bool(request, "purge")
    sid, tenant = await _named(request)
    found, stopping = await request.app[SUPERVISOR].queries.discard(sid, tenant, purge=purge,
                                                            run=request.app[BACKGROUND].spawn)
    if stopping:
        return web.json_response({**admin_row(found), "state": states.STOPPING}, status=202)
    return web.json_response({**admin_row(found), "purged": purge})


@routes.post(paths.ADMIN_SESSION_INTERRUPT)
async def interrupt_session(request: web.Request) -> web.Response:
    """Interrupt the session's turn in progress, if any."""
    found = await _found(request)
    done = request.app[SUPERVISOR].queries.interrupt_turn(found.key)
    return web.json_response({"session_id": found.id, "tenant": found.tenant, "state": found.state,
                              "interrupted": done})


@routes.get(paths.ADMIN_STATS)
async def stats(request: web.Request) -> web.Response:
    """Totals from the store (sessions, active, messages, averages, per tenant) and this node's live view."""
    sup = request.app[SUPERVISOR]
    return web.json_response({
        **await sup.queries.stats(),
        **_agent_memory(request.app.get(PROCSTATS)),
        **await sup.queries.cluster_totals(),
    })


def _agent_memory(procstats) -> dict:
    """All agents' memory together, when the process figures can total it."""
    if not hasattr(procstats, "total_rss"):
        return {}
    return {"agent_memory": {"rss_bytes": procstats.total_rss(), "uss_bytes": procstats.total_uss()}}
