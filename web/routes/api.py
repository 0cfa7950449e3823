"""The seed endpoints besides chat (state, interrupt, system, mcp-command) and /api/sessions.

Seed routes get-or-create: an unknown id, or none, names a new session. Only routes that send
the session something (system, mcp-command, and chat) start its process; state and interrupt
answer for a new session without starting one. The /api/sessions/{id} routes answer 404 for an
unknown id. Every route answers 404 for another tenant's session.
"""

from aiohttp import web

from corral.agent_proc import protocol as p
from corral.supervisor import errors
from corral.web import paths
from corral.web.requests import (
    checked_session_id,
    field,
    find_session,
    json_body,
    message_of,
    open_session,
    query_bool,
    query_int,
    requested_session_id,
    session_response,
    tenant_of,
)
from corral.web.session_json import message_view, new_session_view, session_detail, session_view
from corral.web.keys import OWNER_UNREACHABLE, SUPERVISOR

routes = web.RouteTableDef()

_INT_RANGE, _MAX_DEPTH = p.INT_RANGE, p.MAX_DEPTH  # what the wire format carries


@routes.get(paths.STATE)
async def state(request: web.Request) -> web.Response:
    """The session's messages (from the store), ``is_processing`` and agent state; never spawns."""
    sid = requested_session_id(request)
    limit = query_int(request, paths.STATE_LIMIT)
    found, history = await request.app[SUPERVISOR].queries.history(sid, tenant_of(request), limit=limit,
                                                           stored=request.get(OWNER_UNREACHABLE, False))
    if found is None:
        return session_response(new_session_view(sid, messages=[]), sid)
    return session_response(session_view(found, messages=[message_view(m) for m in history]), sid)


@routes.post(paths.INTERRUPT)
async def interrupt(request: web.Request) -> web.Response:
    """Interrupt the turn in progress; the waiting call returns it as ``interrupted``."""
    body = await json_body(request)
    sid = requested_session_id(request, body)
    found = await find_session(request, sid, missing_ok=True)
    if found is None:
        return session_response(new_session_view(sid, interrupted=False), sid)
    done = request.app[SUPERVISOR].queries.interrupt_turn(found.key)
    return session_response(session_view(found, interrupted=done), sid)


@routes.post(paths.SYSTEM)
async def system(request: web.Request) -> web.Response:
    """Put a system message into the session and return the agent's answer."""
    body = await json_body(request)
    message = message_of(body)
    s = await open_session(request, body)
    sup = request.app[SUPERVISOR]
    result = await sup.system(s, message)
    return session_response(session_view(sup.queries.view(s), status=result["status"], reply=result.get("reply")), s.id)


@routes.post(paths.MCP_COMMAND)
async def mcp_command(request: web.Request) -> web.Response:
    """Run an agent command and return its result."""
    body = await json_body(request)
    command = field(body, "command", str, required=True)
    args = body.get("args")
    check_packable("args", args)
    s = await open_session(request, body)
    sup = request.app[SUPERVISOR]
    result = await sup.command(s, command, args)
    return session_response(session_view(sup.queries.view(s), status=result["status"], result=result.get("reply")), s.id)


@routes.post(paths.SESSIONS)
async def create_session(request: web.Request) -> web.Response:
    """Start a session now (id from the body, else a fresh one): 201 if started, 200 if it was live."""
    body = await json_body(request)
    s = await open_session(request, body, body_only=True)
    was_live = s.live
    sup = request.app[SUPERVISOR]
    await sup.ensure_live(s)
    response = session_response(session_detail(sup.queries.view(s)), s.id, status=200 if was_live else 201)
    response.headers["Location"] = f"/api/sessions/{s.id}"
    return response


@routes.get(paths.SESSION)
async def get_session(request: web.Request) -> web.Response:
    """One of the tenant's sessions; 404 if unknown or another tenant's."""
    found = await find_session(request, request.match_info["session_id"])
    return web.json_response(session_detail(found))


@routes.delete(paths.SESSION)
async def delete_session(request: web.Request) -> web.Response:
    """End a session (stop its process); ``?purge=true`` also deletes its messages and record.

    A session that crashed keeps its restart budget: only an admin can clear a ``failed`` one.
    """
    purge = query_bool(request, "purge")
    sid = checked_session_id(request.match_info["session_id"])
    state = await request.app[SUPERVISOR].queries.end(sid, tenant_of(request), purge=purge)
    return web.json_response({"session_id": sid, "state": state, "purged": purge})


def check_packable(name: str, value, depth: int = 0) -> None:
    """Refuse JSON the agent wire format cannot carry (huge integers, very deep nesting)."""
    if depth > _MAX_DEPTH:
        raise errors.InvalidRequest(f"'{name}' nests deeper than {_MAX_DEPTH} levels", code="wrong_type")
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return
    if isinstance(value, int):
        if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
            raise errors.InvalidRequest(f"'{name}' holds an integer beyond 64 bits", code="wrong_type")
    elif isinstance(value, str):
        field({name: value}, name, str)
    elif isinstance(value, list):
        for item in value:
            check_packable(name, item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            field({name: key}, name, str)
            check_packable(name, item, depth + 1)
