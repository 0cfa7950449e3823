"""The seed chat endpoints: POST /api/chat."""

from aiohttp import web

from web.requests import field, json_body, remember_session, session_id_of, tenant_of

routes = web.RouteTableDef()


@routes.post("/api/chat")
async def chat(request: web.Request) -> web.Response:
    """Send a user message; wait for the reply unless ``wait`` is false."""
    body = await json_body(request)
    message = field(body, "message", str, required=True)
    wait = field(body, "wait", bool, default=True)
    sup = request.app["supervisor"]
    s = await sup.get_or_create(session_id_of(request, body), tenant_of(request), client_metadata(request))
    turn = await sup.submit_chat(s, message)
    if not wait:
        request.app["background"](sup.complete(s, turn))
        response = web.json_response(session_view(s, status="accepted"), status=202)
    else:
        result = await sup.complete(s, turn)
        response = web.json_response(session_view(s, status=result["status"], reply=result.get("reply")))
    remember_session(response, s.id)
    return response


def client_metadata(request: web.Request) -> dict:
    """What the seeds kept about a client: website domain and ip."""
    meta = {"client_ip": request.remote}
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if origin:
        meta["website_domain"] = origin.split("//", 1)[-1].split("/", 1)[0][:255]
    return meta


def session_view(s, **extra) -> dict:
    """The session fields a chat response carries."""
    return {
        "session_id": s.id,
        "state": s.state,
        "is_processing": s.is_processing,
        "message_count": s.message_count,
        "agent_state": s.agent_state,
        **extra,
    }

