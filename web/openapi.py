"""GET /api/openapi.json: the OpenAPI 3.0 description of the whole HTTP API, written as data.

Every route of docs/http-api.md is here with its parameters, bodies, answers and every error it
can give (all errors share the ``{"error": {"code", "message"}}`` schema). tests/test_openapi.py
runs schemathesis against a live server to keep this honest.
"""

from aiohttp import web

from corral.supervisor import states
from corral.supervisor.session import SESSION_ID_PATTERN
from corral.web import paths
from corral.web.routes.dashboard import STATIC
from corral.web.version import VERSION

routes = web.RouteTableDef()

# What each error status means, for every route that can answer with it.
ERROR_MEANINGS = {
    400: "Bad input: malformed JSON, a wrong type, a missing field or a bad session id",
    401: "Missing or wrong API key (or admin token)",
    404: "Unknown session, or another tenant's; unknown path or file",
    413: "Body or message over max_message_bytes",
    429: "Over the session's rate limit or mailbox bound, or the tenant's session quota",
    502: ("The agent died during the request (agent_crashed / agent_oom; the next request respawns it), "
          "answered with a result JSON cannot carry (agent_bad_reply), or a service it relies on failed "
          "(upstream_error); in the last two it lives on"),
    503: "At max_sessions, the session's restart budget is spent, or the store or zygote is unavailable",
    504: "The turn took longer than request_timeout and was interrupted",
}
_RETRYABLE = {429, 503}


def ref(name: str) -> dict:
    """A reference to a component schema."""
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: dict) -> dict:
    """A JSON media type with this schema."""
    return {"application/json": {"schema": schema}}


def answers(ok: dict, *errors: int, session_header: bool = False) -> dict:
    """An operation's responses: its successes, then each error with the shared schema."""
    out = {}
    for status, (description, schema) in ok.items():
        out[str(status)] = {"description": description, "content": json_content(schema)}
        if session_header:
            out[str(status)]["headers"] = {"X-Session-Id": {"$ref": "#/components/headers/X-Session-Id"}}
    for status in errors:
        out[str(status)] = {"$ref": f"#/components/responses/E{status}"}
    return out


def body(schema_name: str, required: bool = True) -> dict:
    """A JSON request body."""
    return {"required": required, "content": json_content(ref(schema_name))}


def param(ref_name: str) -> dict:
    """A reference to a shared parameter."""
    return {"$ref": f"#/components/parameters/{ref_name}"}


def _error_response(status: int) -> dict:
    """The shared response object of one error status."""
    response = {"description": ERROR_MEANINGS[status], "content": json_content(ref("Error"))}
    if status in _RETRYABLE:
        response["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
    if status == 401:
        response["headers"] = {
            "WWW-Authenticate": {"description": "The Bearer challenge", "schema": {"type": "string"}}
        }
    return response


def _object(properties: dict, required=(), **more) -> dict:
    """An object schema."""
    schema = {"type": "object", "properties": properties, **more}
    if required:
        schema["required"] = list(required)
    return schema


def _nullable(schema: dict) -> dict:
    """The schema, or null."""
    return {**schema, "nullable": True}


def _with(base: str, properties: dict, required=()) -> dict:
    """A schema extending another with more properties."""
    return {"allOf": [ref(base), _object(properties, required)]}


STRING, BOOLEAN, NUMBER, INTEGER = {"type": "string"}, {"type": "boolean"}, {"type": "number"}, {"type": "integer"}
SESSION_ID = {"type": "string", "pattern": SESSION_ID_PATTERN, "example": "s1"}
MESSAGE = {"type": "string", "minLength": 1, "example": "my name is Alice"}
STATE = _nullable({"type": "string", "enum": sorted(states.ALL)})
SEED_ID_SOURCES = (
    "The session is named by the body's `session_id`, else the `session_id` query parameter, "
    "the `X-Session-Id` header, then the `corral_session` cookie; an unknown id creates the session, "
    "no id at all creates a fresh one (uuid4), returned in the body, the `X-Session-Id` header and the cookie."
)

SCHEMAS = {
    "Error": _object(
        {
            "error": _object(
                {"code": {**STRING, "example": "session_not_found"}, "message": STRING},
                required=("code", "message"),
            )
        },
        required=("error",),
    ),
    "Message": _object(
        {"seq": INTEGER, "role": {"type": "string", "example": "user"}, "content": STRING, "created_at": NUMBER},
        required=("seq", "role", "content", "created_at"),
    ),
    "SessionView": _object(
        {
            "session_id": SESSION_ID,
            "state": STATE,
            "is_processing": BOOLEAN,
            "message_count": INTEGER,
            "agent_state": {"type": "object", "description": "The agent's state snapshot (agent-defined fields)"},
        },
        required=("session_id", "state", "is_processing", "message_count", "agent_state"),
    ),
    "ChatRequest": _object(
        {
            "message": MESSAGE,
            "session_id": SESSION_ID,
            "wait": {"type": "boolean", "default": True, "description": "false: answer 202 at once; the reply comes on the stream"},
        },
        required=("message",),
    ),
    "TurnResult": _with(
        "SessionView",
        {
            "status": {"type": "string", "enum": ["done", "interrupted", "accepted"]},
            "reply": _nullable(STRING),
        },
        required=("status",),
    ),
    "StateResponse": _with("SessionView", {"messages": {"type": "array", "items": ref("Message")}}, required=("messages",)),
    "SessionRef": _object({"session_id": SESSION_ID}),
    "InterruptResult": _with("SessionView", {"interrupted": BOOLEAN}, required=("interrupted",)),
    "SystemRequest": _object({"message": MESSAGE, "session_id": SESSION_ID}, required=("message",)),
    "CommandRequest": _object(
        {
            "command": {"type": "string", "example": "sleep"},
            "args": {"description": "The command's arguments (any JSON)", "example": {"seconds": 1}},
            "session_id": SESSION_ID,
        },
        required=("command",),
    ),
    "CommandResult": _with(
        "SessionView",
        {"status": {"type": "string", "enum": ["done", "interrupted"]}, "result": {"description": "The command's result"}},
        required=("status",),
    ),
    "SessionDetail": _with(
        "SessionView",
        {
            "created_at": NUMBER,
            "last_activity": _nullable(NUMBER),
            "idle_seconds": _nullable(NUMBER),
            "end_reason": _nullable(STRING),
            "live": BOOLEAN,
        },
    ),
    "SessionEnded": _object(
        {"session_id": SESSION_ID, "state": STATE, "purged": BOOLEAN}, required=("session_id", "state")
    ),
    "AdminSession": _object(
        {
            "session_id": SESSION_ID,
            "tenant": STRING,
            "state": STATE,
            "pid": _nullable(INTEGER),
            "created_at": NUMBER,
            "last_activity": _nullable(NUMBER),
            "idle_seconds": _nullable(NUMBER),
            "age_seconds": _nullable(NUMBER),
            "message_count": INTEGER,
            "restarts": INTEGER,
            "is_processing": BOOLEAN,
            "end_reason": _nullable(STRING),
            "exit": _nullable(STRING),
            "metadata": {"type": "object"},
            "live": BOOLEAN,
            "node": _nullable(STRING),  # the node that holds it (in a cluster, its owner)
            # Process figures (docs/operations.md): sessions held on this node; null without a process.
            "rss_bytes": _nullable(INTEGER),
            "uss_bytes": _nullable(INTEGER),
            "pss_bytes": _nullable(INTEGER),
            "cpu_percent": _nullable(NUMBER),
            "threads": _nullable(INTEGER),
            "open_fds": _nullable(INTEGER),
            "memory_limit": _nullable(_object({"bytes": _nullable(INTEGER), "mechanism": STRING})),
            "cgroup": _nullable(_object({"current": INTEGER, "peak": _nullable(INTEGER)})),
            "processes": _nullable(INTEGER),
            "limits": _object({}),
        },
        required=("session_id", "tenant", "state"),
        description=(
            "One session; the ones this node holds also carry process figures (RSS/USS/PSS, CPU % since "
            "the previous sample, threads, fds, memory limit and mechanism, cgroup usage)"
        ),
    ),
    "AdminSessionList": _object(
        {
            "sessions": {"type": "array", "items": ref("AdminSession")},
            "limit": INTEGER,
            "offset": INTEGER,
            "next_offset": _nullable(INTEGER),
        },
        required=("sessions",),
    ),
    "AdminInterruptResult": _object(
        {"session_id": SESSION_ID, "state": STATE, "interrupted": BOOLEAN}, required=("session_id", "interrupted")
    ),
    "AgentOutput": _object(
        {
            "session_id": SESSION_ID,
            "tenant": STRING,
            "lines": {"type": "array", "items": _object(
                {
                    "time": NUMBER,
                    "pid": _nullable(INTEGER),
                    "stream": {"type": "string", "enum": ["stdout", "stderr", "corral"]},
                    "line": STRING,
                    "truncated": BOOLEAN,
                },
                required=("time", "stream", "line"),
            )},
            "kept": INTEGER,
        },
        required=("session_id", "lines"),
    ),
    "Stats": _object(
        {
            "sessions_total": INTEGER,
            "sessions_active": INTEGER,
            "messages_total": INTEGER,
            "average_messages_per_session": NUMBER,
            "live_sessions": INTEGER,
            "by_state": {"type": "object", "additionalProperties": INTEGER},
            "by_tenant": {"type": "object", "additionalProperties": {"type": "object"}},
            "agent_memory": _object({"rss_bytes": INTEGER, "uss_bytes": INTEGER},
                                    description="Memory of all agents on this node together"),
            "node": STRING,
            "cluster": _object({"nodes": INTEGER, "live_sessions": INTEGER},
                               description="Live nodes and their live sessions together (docs/cluster.md)"),
        },
        required=("sessions_total", "sessions_active", "by_tenant"),
    ),
    "Node": _object(
        {
            "node": STRING,
            "url": _nullable(STRING),
            "alive": BOOLEAN,
            "self": BOOLEAN,
            "lease_age_seconds": NUMBER,
            "sessions_owned": INTEGER,
            "live_sessions": _nullable(INTEGER),
            "server_rss_bytes": _nullable(INTEGER),
        },
        required=("node", "alive"),
        description="One cluster node: its heartbeat's age, the sessions it owns and its memory",
    ),
    "NodeList": _object({"node": STRING, "nodes": {"type": "array", "items": ref("Node")}}, required=("nodes",)),
    "Health": _object(
        {
            "status": {"type": "string", "example": "ok"},
            "version": STRING,
            "live_sessions": INTEGER,
            "limit": _nullable({"type": "object", "description": "The memory-limit mechanism in use"}),
            "sandbox": _nullable({"type": "object", "description": "Admin only: the agent sandbox's mode and "
                                  "layers, each in force (detail) or missing (reason)"}),
        },
        required=("status", "version"),
    ),
}

PARAMETERS = {
    "SessionIdQuery": {
        "name": "session_id", "in": "query", "required": False, "schema": SESSION_ID,
        "description": "The session (else the X-Session-Id header, the corral_session cookie, or a new one)",
    },
    "SessionIdHeader": {
        "name": "X-Session-Id", "in": "header", "required": False, "schema": SESSION_ID,
        "description": "The session, when neither the body nor the query names it",
    },
    "SessionIdPath": {"name": "session_id", "in": "path", "required": True, "schema": SESSION_ID},
    "Purge": {
        "name": "purge", "in": "query", "required": False, "schema": {"type": "boolean", "default": False},
        "description": "Also delete the session's messages and record",
    },
    "LastEventId": {
        "name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string", "pattern": "^[0-9]{1,20}$"},
        "description": "The id of the last event received; the stream resumes after it (sent by EventSource on reconnect)",
    },
}

STREAM_DESCRIPTION = """Server-Sent Events of one session, pushed as they happen (never polled).

Events (each with an `id:`; `data:` is one line of JSON):
`state` (on connect: the session's state with its messages; later: each state change),
`delta` (one streamed chunk of a reply: `req`, `seq`, `text`), `message` (a stored message:
`seq`, `role`, `content`, `created_at`), `error` (`code`, `message`), `end` (the session's process
ended: `reason` is ended, reaped, expired, killed, crashed or oom; the stream stays open and the
session comes back on its next message). Comment lines (`: keep-alive`) keep quiet connections open.
With `Last-Event-ID` the stream resumes after that event without loss or duplicates while the
events are still buffered; otherwise it starts with a fresh `state`. Connecting never starts the
session's process."""


ADMIN_EVENTS_DESCRIPTION = """What the dashboard listens to: a `sessions` event with the live sessions (admin rows) on
connect, then the supervisor's `state`, `spawned` and `end` events as they happen, and a `figures`
event with every live session's process figures every 2 seconds."""
PAGE_FILES = sorted(path.name for path in STATIC.iterdir() if path.is_file())


def _page(summary: str, operation_id: str) -> dict:
    """An HTML page's operation (open, no credentials)."""
    return {
        "summary": summary, "operationId": operation_id, "tags": ["pages"], "security": [],
        "responses": {"200": {"description": "The page", "content": {"text/html": {"schema": {"type": "string"}}}}},
    }


def _operations() -> dict:
    """Every path and its operations."""
    tenant, admin, public = [{"tenantKey": []}], [{"adminToken": []}], []
    seed_params = [param("SessionIdQuery"), param("SessionIdHeader")]
    turn_errors = (400, 401, 404, 413, 429, 502, 503, 504)
    return {
        paths.HEALTH: {"get": {
            "summary": "Status, version, live sessions and the memory-limit mechanism",
            "description": "Without the admin token (where the admin API needs one) only `status` and `version`.",
            "operationId": "health", "tags": ["operations"], "security": [{}, *admin],
            "responses": answers({200: ("The server is up", ref("Health"))}),
        }},
        paths.CHAT: {"post": {
            "summary": "Send a user message; by default wait for the reply",
            "description": SEED_ID_SOURCES, "operationId": "chat", "tags": ["chat"], "security": tenant,
            "parameters": seed_params, "requestBody": body("ChatRequest"),
            "responses": answers(
                {200: ("The reply and the session's state", ref("TurnResult")),
                 202: ("Accepted (wait=false): the reply comes on the stream", ref("TurnResult"))},
                *turn_errors, session_header=True,
            ),
        }},
        paths.STATE: {"get": {
            "summary": "The session's state: messages, is_processing, agent state (never starts a process)",
            "description": SEED_ID_SOURCES, "operationId": "state", "tags": ["chat"], "security": tenant,
            "parameters": seed_params + [paths.STATE_LIMIT.parameter()],
            "responses": answers({200: ("The session's state", ref("StateResponse"))}, 400, 401, 404, 503,
                                 session_header=True),
        }},
        paths.STREAM: {"get": {
            "summary": "Server-Sent Events of the session", "description": STREAM_DESCRIPTION,
            "operationId": "stream", "tags": ["chat"], "security": tenant,
            "parameters": seed_params + [param("LastEventId")],
            "responses": {
                "200": {
                    "description": "An endless text/event-stream",
                    "headers": {"X-Session-Id": {"$ref": "#/components/headers/X-Session-Id"}},
                    "content": {"text/event-stream": {"schema": {"type": "string"}, "example": (
                        'id: 1732221000000001\nevent: delta\ndata: {"session_id":"s1","req":3,"seq":1,"text":"Your "}\n\n'
                    )}},
                },
                **answers({}, 400, 401, 404, 503),
            },
        }},
        paths.INTERRUPT: {"post": {
            "summary": "Interrupt the turn in progress (the waiting call answers with status interrupted)",
            "description": SEED_ID_SOURCES, "operationId": "interrupt", "tags": ["chat"], "security": tenant,
            "parameters": seed_params, "requestBody": body("SessionRef", required=False),
            "responses": answers({200: ("Whether a turn was interrupted", ref("InterruptResult"))},
                                 400, 401, 404, 413, 503, session_header=True),
        }},
        paths.SYSTEM: {"post": {
            "summary": "Put a system message into the session; returns the agent's answer",
            "description": SEED_ID_SOURCES, "operationId": "system", "tags": ["chat"], "security": tenant,
            "parameters": seed_params, "requestBody": body("SystemRequest"),
            "responses": answers({200: ("The agent's answer", ref("TurnResult"))}, *turn_errors, session_header=True),
        }},
        paths.MCP_COMMAND: {"post": {
            "summary": "Run an agent command; returns its result",
            "description": SEED_ID_SOURCES + " The demo agent's commands: sleep {seconds}, allocate {mib}, crash {how}, spin {seconds}, facts.",
            "operationId": "mcpCommand", "tags": ["chat"], "security": tenant,
            "parameters": seed_params, "requestBody": body("CommandRequest"),
            "responses": answers({200: ("The command's result", ref("CommandResult"))}, *turn_errors, session_header=True),
        }},
        paths.SESSIONS: {"post": {
            "summary": "Create (start) a session explicitly; the id comes from the body or is generated",
            "operationId": "createSession", "tags": ["sessions"], "security": tenant,
            "requestBody": body("SessionRef", required=False),
            "responses": answers(
                {201: ("Started", ref("SessionDetail")), 200: ("It was already live", ref("SessionDetail"))},
                400, 401, 404, 413, 429, 502, 503, session_header=True,
            ),
        }},
        paths.SESSION: {
            "parameters": [param("SessionIdPath")],
            "get": {
                "summary": "Inspect one of your sessions", "operationId": "getSession", "tags": ["sessions"],
                "security": tenant,
                "responses": answers({200: ("The session", ref("SessionDetail"))}, 400, 401, 404, 503),
            },
            "delete": {
                "summary": "End one of your sessions (stop its process)", "operationId": "deleteSession",
                "tags": ["sessions"], "security": tenant, "parameters": [param("Purge")],
                "responses": answers({200: ("Ended", ref("SessionEnded"))}, 400, 401, 404, 503),
            },
        },
        paths.ADMIN_SESSIONS: {"get": {
            "summary": "List sessions with pid, tenant, state, ages, idle time, process figures, counts",
            "operationId": "adminListSessions", "tags": ["admin"], "security": admin,
            "parameters": [
                {"name": "tenant", "in": "query", "required": False, "schema": STRING},
                {"name": "state", "in": "query", "required": False,
                 "schema": {"type": "string", "enum": sorted(states.ALL) + ["live"]}},
                paths.ADMIN_LIMIT.parameter(),
                paths.ADMIN_OFFSET.parameter(),
            ],
            "responses": answers({200: ("A page of sessions, newest first", ref("AdminSessionList"))}, 400, 401, 503),
        }},
        paths.ADMIN_SESSION: {
            "parameters": [param("SessionIdPath")],
            "get": {
                "summary": "Inspect any session", "operationId": "adminGetSession", "tags": ["admin"], "security": admin,
                "responses": answers({200: ("The session", ref("AdminSession"))}, 400, 401, 404, 503),
            },
            "delete": {
                "summary": "Kill a session (202 while it stops); a down one is forgotten",
                "operationId": "adminKillSession", "tags": ["admin"], "security": admin, "parameters": [param("Purge")],
                "responses": answers(
                    {202: ("Being killed", ref("AdminSession")), 200: ("It was not running; forgotten", ref("AdminSession"))},
                    400, 401, 404, 503,
                ),
            },
        },
        paths.ADMIN_SESSION_INTERRUPT: {
            "parameters": [param("SessionIdPath")],
            "post": {
                "summary": "Interrupt any session's turn in progress", "operationId": "adminInterrupt",
                "tags": ["admin"], "security": admin,
                "responses": answers({200: ("Whether a turn was interrupted", ref("AdminInterruptResult"))},
                                     400, 401, 404, 503),
            },
        },
        paths.ADMIN_SESSION_LOGS: {
            "parameters": [param("SessionIdPath")],
            "get": {
                "summary": "The last lines the session's agent wrote to stdout and stderr, oldest first",
                "operationId": "adminSessionLogs", "tags": ["admin"], "security": admin,
                "parameters": [paths.LOG_LINES.parameter()],
                "responses": answers({200: ("The kept lines", ref("AgentOutput"))}, 400, 401, 404, 503),
            },
        },
        paths.ADMIN_STATS: {"get": {
            "summary": "Totals, active sessions, average messages per session, per tenant and per state",
            "operationId": "adminStats", "tags": ["admin"], "security": admin,
            "responses": answers({200: ("The figures", ref("Stats"))}, 401, 503),
        }},
        paths.ADMIN_EVENTS: {"get": {
            "summary": "Server-Sent Events for the dashboard", "description": ADMIN_EVENTS_DESCRIPTION,
            "operationId": "adminEvents", "tags": ["admin"], "security": admin,
            "responses": {
                "200": {"description": "An endless text/event-stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                **answers({}, 401),
            },
        }},
        paths.CHAT_PAGE: {"get": _page("The chat page", "chatPage")},
        paths.DASHBOARD_PAGE: {"get": _page("The dashboard page (it asks for the admin token)", "dashboardPage")},
        paths.STATIC_FILE: {"get": {
            "summary": "A file of the pages", "operationId": "staticFile", "tags": ["pages"], "security": public,
            "parameters": [{"name": "name", "in": "path", "required": True,
                            "schema": {"type": "string", "enum": PAGE_FILES}}],
            "responses": {
                "200": {"description": "The file", "content": {kind: {"schema": {"type": "string"}} for kind in (
                    "text/html", "text/css", "text/javascript", "application/javascript")}},
                **answers({}, 404),
            },
        }},
        paths.ADMIN_NODES: {"get": {
            "summary": "The cluster's nodes: lease age, sessions owned, memory", "operationId": "adminNodes",
            "tags": ["admin"], "security": admin,
            "responses": answers({200: ("Every node of the membership table", ref("NodeList"))}, 401, 503),
        }},
        paths.METRICS: {"get": {
            "summary": "Prometheus metrics", "operationId": "metrics", "tags": ["operations"],
            "description": "Open unless the server has a metrics token (--metrics-token); then it, or the admin token, is needed.",
            "security": [{}, {"metricsToken": []}, *admin],
            "responses": {**answers({}, 401), "200": {
                "description": "The Prometheus text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }},
        }},
        paths.OPENAPI: {"get": {
            "summary": "This document", "operationId": "openapi", "tags": ["operations"], "security": public,
            "responses": {"200": {"description": "The OpenAPI document", "content": json_content({"type": "object"})}},
        }},
    }


def build_spec() -> dict:
    """The whole OpenAPI document."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "corral",
            "version": VERSION,
            "description": (
                "One OS process per chat/agent session. Errors are always "
                '`{"error": {"code": ..., "message": ...}}`. See docs/http-api.md.'
            ),
        },
        "tags": [{"name": name} for name in ("chat", "sessions", "admin", "operations", "pages")],
        "security": [{"tenantKey": []}],
        "paths": _operations(),
        "components": {
            "securitySchemes": {
                "tenantKey": {
                    "type": "http", "scheme": "bearer",
                    "description": "A tenant's API key (from the tenants file). In dev mode (no keys) loopback clients need none.",
                },
                "adminToken": {"type": "http", "scheme": "bearer", "description": "The admin token"},
                "metricsToken": {"type": "http", "scheme": "bearer", "description": "The metrics token (--metrics-token)"},
            },
            "schemas": SCHEMAS,
            "parameters": PARAMETERS,
            "headers": {
                "X-Session-Id": {"description": "The session the request reached", "schema": SESSION_ID},
                "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}},
            },
            "responses": {f"E{status}": _error_response(status) for status in ERROR_MEANINGS},
        },
    }


SPEC = build_spec()


@routes.get(paths.OPENAPI)
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI document of this server."""
    return web.json_response(SPEC)
