"""GET /api/openapi.json: the OpenAPI 3.0 description of the whole HTTP API, written as data.

Every route of docs/http-api.md is here with its parameters, bodies, answers and every error it
can give (all errors share the ``{"error": {"code", "message"}}`` schema). tests/test_openapi.py
runs schemathesis against a live server to keep this honest.
"""

from aiohttp import web

from corral.web import paths
from corral.supervisor import states
from corral.web.openapi_schemas import PARAMETERS, SCHEMAS, SEED_ID_SOURCES, SESSION_ID, STRING, json_content, ref
from corral.web.routes.dashboard import STATIC
from corral.web.version import VERSION

routes = web.RouteTableDef()

# What each error status means, for every route that can answer with it.
ERROR_MEANINGS = {
    400: "Bad input: malformed JSON, a wrong type, a missing field or a bad session id",
    401: "Missing or wrong API key (or admin token)",
    404: "Unknown session (ids are per tenant: another tenant's id is never shown); unknown path or file",
    409: "The admin named an id several tenants have without saying whose (?tenant=)",
    413: "Body or message over max_message_bytes",
    429: "Over the session's rate limit or mailbox bound, or the tenant's session quota",
    502: ("The agent died during the request (agent_crashed / agent_oom; the next request respawns it), "
          "answered with a result JSON cannot carry (agent_bad_reply), or a service it relies on failed "
          "(upstream_error); in the last two it lives on"),
    503: "At max_sessions, the session's restart budget is spent, the store or zygote is unavailable, "
         "or a resource (open files, sandbox uids, processes, memory) ran out for a new session",
    504: "The turn took longer than request_timeout and was interrupted",
}
_RETRYABLE = {429, 503}


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
USAGE_DESCRIPTION = """Sums of the hours from the one `since` falls in to before `until` (either may be unix
seconds, an ISO 8601 time, UTC unless it says, or an age such as `24h` or `7d`; absent: from the start, until
now). Pending usage of this node is written first; other nodes write theirs within 50 ms of each turn."""
USAGE_PERIOD = [{"name": name, "in": "query", "required": False, "schema": STRING,
                 "description": f"{name}: unix seconds, ISO 8601 or an age (24h, 7d)"} for name in ("since", "until")]
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
            "description": "Without the admin token (where the admin API needs one) only `status` and `version`. "
                           "A stopping server answers 503 `shutting_down` (with `status`: `draining`).",
            "operationId": "health", "tags": ["operations"], "security": [{}, *admin],
            "responses": answers({200: ("The server is up", ref("Health"))}, 503),
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
            "parameters": [param("SessionIdPath"), param("AdminTenant")],
            "get": {
                "summary": "Inspect any session", "operationId": "adminGetSession", "tags": ["admin"], "security": admin,
                "responses": answers({200: ("The session", ref("AdminSession"))}, 400, 401, 404, 409, 503),
            },
            "delete": {
                "summary": "Kill a session (202 while it stops); a down one is forgotten",
                "operationId": "adminKillSession", "tags": ["admin"], "security": admin, "parameters": [param("Purge")],
                "responses": answers(
                    {202: ("Being killed", ref("AdminSession")), 200: ("It was not running; forgotten", ref("AdminSession"))},
                    400, 401, 404, 409, 503,
                ),
            },
        },
        paths.ADMIN_SESSION_INTERRUPT: {
            "parameters": [param("SessionIdPath"), param("AdminTenant")],
            "post": {
                "summary": "Interrupt any session's turn in progress", "operationId": "adminInterrupt",
                "tags": ["admin"], "security": admin,
                "responses": answers({200: ("Whether a turn was interrupted", ref("AdminInterruptResult"))},
                                     400, 401, 404, 409, 503),
            },
        },
        paths.ADMIN_SESSION_LOGS: {
            "parameters": [param("SessionIdPath"), param("AdminTenant")],
            "get": {
                "summary": "The last lines the session's agent wrote to stdout and stderr, oldest first",
                "operationId": "adminSessionLogs", "tags": ["admin"], "security": admin,
                "parameters": [paths.LOG_LINES.parameter()],
                "responses": answers({200: ("The kept lines", ref("AgentOutput"))}, 400, 401, 404, 409, 503),
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
        paths.ADMIN_USAGE: {"get": {
            "summary": "Usage per tenant over a period (every node's share, from the store)",
            "description": USAGE_DESCRIPTION, "operationId": "adminUsage", "tags": ["admin"], "security": admin,
            "parameters": [{"name": "tenant", "in": "query", "required": False, "schema": STRING}, *USAGE_PERIOD],
            "responses": answers({200: ("Each tenant's sums", ref("UsageReport"))}, 400, 401, 503),
        }},
        paths.USAGE: {"get": {
            "summary": "Your own usage over a period", "description": USAGE_DESCRIPTION, "operationId": "usage",
            "tags": ["sessions"], "security": tenant, "parameters": USAGE_PERIOD,
            "responses": answers({200: ("Your sums (no other tenant's)", ref("UsageReport"))}, 400, 401, 503),
        }},
        paths.ADMIN_TIMELINE: {"get": {
            "summary": "This node's last hour: live sessions, memory, CPU, turns a second, ends by reason",
            "operationId": "adminTimeline", "tags": ["admin"], "security": admin,
            "responses": answers({200: ("The node's ring", ref("Timeline"))}, 401),
        }},
        paths.ADMIN_SESSION_TIMELINE: {
            "parameters": [param("SessionIdPath")],
            "get": {
                "summary": "One session's memory and CPU over its life (this node's ring)",
                "operationId": "adminSessionTimeline", "tags": ["admin"], "security": admin,
                "responses": answers({200: ("The session's ring", ref("Timeline"))}, 400, 401, 404),
            },
        },
        paths.STATIC_VENDOR_FILE: {"get": {
            "summary": "A file of a charting library shipped with the pages (uPlot and its license)",
            "operationId": "staticVendorFile", "tags": ["pages"], "security": public,
            "parameters": [{"name": "library", "in": "path", "required": True, "schema": {"type": "string"}},
                           {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "The file", "content": {kind: {"schema": {"type": "string"}} for kind in (
                    "text/css", "text/javascript", "application/javascript", "text/plain")}},
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
