"""The component schemas and shared parameters of the OpenAPI document (web/openapi.py builds the paths)."""

from corral.supervisor import states
from corral.supervisor.session import SESSION_ID_PATTERN


def ref(name: str) -> dict:
    """A reference to a component schema."""
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: dict) -> dict:
    """A JSON media type with this schema."""
    return {"application/json": {"schema": schema}}


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
            "usage": ref("Usage"),  # GET /admin/sessions/{id} only
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
            # its traffic through the egress gateway (docs/security.md#network); null without one
            "egress": _nullable(_object({"bytes_in": INTEGER, "bytes_out": INTEGER, "requests": INTEGER,
                                         "refused": INTEGER})),
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
        {"session_id": SESSION_ID, "tenant": STRING, "state": STATE, "interrupted": BOOLEAN},
        required=("session_id", "interrupted")
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
    "Usage": _object(
        {
            "starts": INTEGER, "turns": INTEGER, "messages_in": INTEGER, "messages_out": INTEGER,
            "bytes_in": INTEGER, "bytes_out": INTEGER, "cpu_seconds": NUMBER, "memory_mib_seconds": NUMBER,
            "memory_peak_bytes": INTEGER, "egress_bytes": INTEGER, "egress_requests": INTEGER, "ends": INTEGER,
            "end_reasons": {"type": "object", "additionalProperties": INTEGER},
            "last_end_reason": _nullable(STRING),
        },
        required=("turns", "cpu_seconds", "memory_mib_seconds", "ends"),
        description="What sessions used (docs/operations.md#usage): counts, UTF-8 bytes, CPU seconds, MiB·s",
    ),
    "UsageReport": _object(
        {
            "since": _nullable(NUMBER), "until": _nullable(NUMBER), "hour_granularity": BOOLEAN,
            "tenants": {"type": "object", "additionalProperties": ref("Usage")},
        },
        required=("tenants",),
    ),
    "Timeline": _object(
        {
            "node": STRING, "session_id": SESSION_ID, "interval": NUMBER,
            "t": {"type": "array", "items": NUMBER},
            "live": {"type": "array", "items": INTEGER},
            "memory_mib": {"type": "array", "items": NUMBER},
            "cpu_cores": {"type": "array", "items": NUMBER},
            "turns_per_s": {"type": "array", "items": NUMBER},
            "ends": {"type": "object", "additionalProperties": {"type": "array", "items": INTEGER}},
            "cluster": {"type": "array", "items": {"type": "object"},
                        "description": "In a cluster: every live node's own timeline, this node's first"},
        },
        required=("t", "memory_mib", "cpu_cores"),
        description="Columns of points (unix seconds in t) from this node's in-memory rings",
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
            "egress": _nullable({"type": "object", "description": "Admin only: the egress gateway (agents' address "
                                 "for it, upstream names, rule counts); null without --agent-network proxy"}),
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
    "AdminTenant": {
        "name": "tenant", "in": "query", "required": False, "schema": STRING,
        "description": "Whose session: ids are per tenant. Needed when several tenants have a session with this id "
                       "(409 ambiguous_session without it)",
    },
    "Purge": {
        "name": "purge", "in": "query", "required": False, "schema": {"type": "boolean", "default": False},
        "description": "Also delete the session's messages and record",
    },
    "LastEventId": {
        "name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string", "pattern": "^[0-9]{1,20}$"},
        "description": "The id of the last event received; the stream resumes after it (sent by EventSource on reconnect)",
    },
}
