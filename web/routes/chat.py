"""The seed chat endpoint: POST /api/chat."""

from aiohttp import web

from corral.web import paths
from corral.web.requests import field, json_body, message_of, open_session, session_response
from corral.web.session_json import session_view
from corral.web.keys import BACKGROUND, SUPERVISOR

routes = web.RouteTableDef()


@routes.post(paths.CHAT)
async def chat(request: web.Request) -> web.Response:
    """Send a user message; wait for the reply unless ``wait`` is false."""
    body = await json_body(request)
    message = message_of(body)
    wait = field(body, "wait", bool, default=True)
    sup = request.app[SUPERVISOR]
    s = await open_session(request, body)
    turn = await sup.submit_chat(s, message)
    if not wait:
        request.app[BACKGROUND].spawn(sup.complete(s, turn))
        return session_response(session_view(sup.queries.view(s), status="accepted"), s.id, status=202)
    result = await sup.complete(s, turn)
    return session_response(session_view(sup.queries.view(s), status=result["status"], reply=result.get("reply")), s.id)
