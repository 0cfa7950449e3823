"""Reading requests: JSON bodies, typed fields, the session id and the tenant."""

import json

from aiohttp import hdrs, web

from corral.supervisor import errors
from corral.supervisor.session import bad_session_id, new_session_id, valid_session_id
from corral.web.paths import IntQuery
from corral.web.keys import CONFIG, OWNER_UNREACHABLE, RAW_BODY, SUPERVISOR, TENANT

SESSION_COOKIE = "corral_session"
SESSION_HEADER = "X-Session-Id"
_COOKIE_ATTRIBUTES = f"HttpOnly; Max-Age={30 * 86400}; Path=/; SameSite=Lax"


async def json_body(request: web.Request) -> dict:
    """The request's JSON object body; 400 if malformed, 413 if over the size limit."""
    limit = request.app[CONFIG].max_message_bytes * 4 + 4096
    if request.content_length is not None and request.content_length > limit:
        raise errors.TooLarge(f"request body is over {limit} bytes")
    raw = await _read_body(request, limit)
    request[RAW_BODY] = raw  # a session another node owns gets the same bytes (web/forward.py)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise errors.InvalidRequest(f"malformed JSON: {exc}", code="malformed_json") from None
    if not isinstance(body, dict):
        raise errors.InvalidRequest("the JSON body must be an object", code="malformed_json")
    return body


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The whole body however it arrives (segments, chunked); 413 as soon as it passes ``limit``."""
    pieces, size = [], 0
    while piece := await request.content.readany():  # b"" only at the body's end
        size += len(piece)
        if size > limit:
            raise errors.TooLarge(f"request body is over {limit} bytes")
        pieces.append(piece)
    return b"".join(pieces)


def field(body: dict, name: str, kind: type, *, required: bool = False, default=None):
    """One typed field of a JSON body; 400 naming the field when wrong."""
    value = body.get(name, None)
    if value is None:
        if required:
            raise errors.InvalidRequest(f"'{name}' is required", code="missing_field")
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise errors.InvalidRequest(f"'{name}' must be {_kind_name(kind)}", code="wrong_type")
    if kind is str and not _is_utf8(value):
        raise errors.InvalidRequest(f"'{name}' must be valid Unicode text (no lone surrogates)", code="wrong_type")
    return value


def message_of(body: dict) -> str:
    """The body's ``message``: required, text, not empty (an empty turn is nobody's message)."""
    message = field(body, "message", str, required=True)
    if not message:
        raise errors.InvalidRequest("'message' must not be empty", code="empty_message")
    return message


def _is_utf8(text: str) -> bool:
    """Whether a decoded JSON string can be encoded again (JSON allows lone surrogate escapes)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def query_int(request: web.Request, query: IntQuery, default: int | None = None) -> int | None:
    """An integer query parameter within its declared bounds (web/paths.py); 400 naming it when wrong.

    Absent, it is ``default`` if given (a default that is a setting), else the declared one.
    """
    raw = request.query.get(query.name)
    if raw is None or raw == "":
        return query.default if default is None else default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not query.low <= value <= query.high:
        raise errors.InvalidRequest(f"query parameter '{query.name}' must be an integer from {query.low} to {query.high}",
                                code="wrong_type")
    return value


def query_bool(request: web.Request, name: str) -> bool:
    """A boolean query parameter (true/false/1/0, absent = false); 400 when it is anything else."""
    raw = request.query.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0", ""):
        raise errors.InvalidRequest(f"query parameter '{name}' must be true or false", code="wrong_type")
    return raw in ("true", "1")


def _kind_name(kind) -> str:
    """How a type reads in an error message."""
    return {str: "a string", bool: "a boolean", dict: "an object", int: "an integer"}.get(kind, str(kind))


def session_id_of(request: web.Request, body: dict | None = None) -> str | None:
    """The session a request names: body, query, header, then cookie (the design's order)."""
    if body is not None and body.get("session_id") is not None:
        sid = body["session_id"]
        if not isinstance(sid, str):
            raise errors.InvalidRequest("'session_id' must be a string", code="bad_session_id")
        return sid
    return (
        request.query.get("session_id")
        or request.headers.get(SESSION_HEADER)
        or request.cookies.get(SESSION_COOKIE)
        or None
    )


def requested_session_id(request: web.Request, body: dict | None = None, *, body_only: bool = False) -> str:
    """The validated session id a request names, or a fresh uuid4 when it names none."""
    sid = (body or {}).get("session_id") if body_only else session_id_of(request, body)
    if sid is None:
        return new_session_id()
    return checked_session_id(sid)


def checked_session_id(sid) -> str:
    """A client-supplied session id, or 400 bad_session_id."""
    if not valid_session_id(sid):
        raise bad_session_id()
    return sid


async def open_session(request: web.Request, body: dict | None = None, *, body_only: bool = False):
    """The request's session for its tenant, created if new (not yet spawned); 404 if another tenant's."""
    sid = requested_session_id(request, body, body_only=body_only)
    return await request.app[SUPERVISOR].get_or_create(sid, tenant_of(request), client_metadata(request))


async def find_session(request: web.Request, sid: str, *, missing_ok: bool = False):
    """The tenant's session as a ``SessionView``, without spawning; 404 if foreign or unknown.

    With ``missing_ok`` an unknown id gives None instead: the seed routes treat it as a new session.
    """
    found = await request.app[SUPERVISOR].queries.find(checked_session_id(sid), tenant_of(request),
                                               stored=request.get(OWNER_UNREACHABLE, False))
    if found is None and not missing_ok:
        raise errors.SessionNotFound(f"no session {sid}")
    return found


def client_metadata(request: web.Request) -> dict:
    """What the seeds kept about a client: website domain and ip."""
    meta = {"client_ip": request.remote}
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if origin:
        meta["website_domain"] = origin.split("//", 1)[-1].split("/", 1)[0][:255]
    return meta


def tenant_of(request: web.Request) -> str:
    """The tenant the request authenticated as."""
    return request.get(TENANT, "default")


def remember_session(response: web.StreamResponse, session_id: str) -> None:
    """Give the client its session id in the header and the cookie."""
    response.headers[SESSION_HEADER] = session_id
    if valid_session_id(session_id):
        # The header aiohttp's set_cookie would write, built directly: a valid id is [A-Za-z0-9._-]
        # and needs no quoting, and set_cookie's Morsel machinery is ~5% of a warm turn.
        response.headers.add(hdrs.SET_COOKIE, f"{SESSION_COOKIE}={session_id}; {_COOKIE_ATTRIBUTES}")
    else:
        response.set_cookie(SESSION_COOKIE, session_id, httponly=True, samesite="Lax", max_age=30 * 86400)


def session_response(data: dict, session_id: str, *, status: int = 200) -> web.Response:
    """A JSON answer about a session that also hands the client its id (header and cookie)."""
    response = web.json_response(data, status=status)
    remember_session(response, session_id)
    return response
