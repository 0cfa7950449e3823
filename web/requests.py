"""Reading requests: JSON bodies, typed fields, the session id and the tenant."""

import json

from aiohttp import hdrs, web

from supervisor import errors

SESSION_COOKIE = "corral_session"
SESSION_HEADER = "X-Session-Id"
_COOKIE_ATTRIBUTES = f"HttpOnly; Max-Age={30 * 86400}; Path=/; SameSite=Lax"


async def json_body(request: web.Request) -> dict:
    """The request's JSON object body; 400 if malformed, 413 if over the size limit."""
    limit = request.app["config"].max_message_bytes * 4 + 4096
    if request.content_length is not None and request.content_length > limit:
        raise errors.TooLarge(f"request body is over {limit} bytes")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise errors.TooLarge(f"request body is over {limit} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.BadRequest(f"malformed JSON: {exc}", code="malformed_json") from None
    if not isinstance(body, dict):
        raise errors.BadRequest("the JSON body must be an object", code="malformed_json")
    return body


def field(body: dict, name: str, kind: type, *, required: bool = False, default=None):
    """One typed field of a JSON body; 400 naming the field when wrong."""
    value = body.get(name, None)
    if value is None:
        if required:
            raise errors.BadRequest(f"'{name}' is required", code="missing_field")
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise errors.BadRequest(f"'{name}' must be {_kind_name(kind)}", code="wrong_type")
    return value


def _kind_name(kind) -> str:
    """How a type reads in an error message."""
    return {str: "a string", bool: "a boolean", dict: "an object", int: "an integer"}.get(kind, str(kind))


def session_id_of(request: web.Request, body: dict | None = None) -> str | None:
    """The session a request names: body, query, header, then cookie (the design's order)."""
    if body is not None and body.get("session_id") is not None:
        sid = body["session_id"]
        if not isinstance(sid, str):
            raise errors.BadRequest("'session_id' must be a string", code="bad_session_id")
        return sid
    return (
        request.query.get("session_id")
        or request.headers.get(SESSION_HEADER)
        or request.cookies.get(SESSION_COOKIE)
        or None
    )


def tenant_of(request: web.Request) -> str:
    """The tenant the request authenticated as."""
    return request.get("tenant", "default")


def remember_session(response: web.StreamResponse, session_id: str) -> None:
    """Give the client its session id in the header and the cookie."""
    response.headers[SESSION_HEADER] = session_id
    # The header aiohttp's set_cookie would write, built directly: session ids are validated to
    # [A-Za-z0-9._-] so need no quoting, and set_cookie's Morsel machinery is ~5% of a warm turn.
    response.headers.add(hdrs.SET_COOKIE, f"{SESSION_COOKIE}={session_id}; {_COOKIE_ATTRIBUTES}")
