"""The HTTP API's names, each once: every path the server answers and the bounds of its integer queries.

The routes (web/routes/*) and the OpenAPI document (web/openapi.py) are both built from these;
tests/test_openapi.py checks that the router and the document hold the same routes.
"""

from dataclasses import dataclass

HEALTH = "/health"
CHAT = "/api/chat"
STATE = "/api/state"
STREAM = "/api/chat/stream"
INTERRUPT = "/api/interrupt"
SYSTEM = "/api/system"
MCP_COMMAND = "/api/mcp-command"
SESSIONS = "/api/sessions"
SESSION = "/api/sessions/{session_id}"
ADMIN_SESSIONS = "/admin/sessions"
ADMIN_SESSION = "/admin/sessions/{session_id}"
ADMIN_SESSION_INTERRUPT = "/admin/sessions/{session_id}/interrupt"
ADMIN_SESSION_LOGS = "/admin/sessions/{session_id}/logs"
ADMIN_STATS = "/admin/stats"
ADMIN_EVENTS = "/admin/events"
ADMIN_NODES = "/admin/nodes"
ADMIN_USAGE = "/admin/usage"
ADMIN_TIMELINE = "/admin/timeline"
ADMIN_SESSION_TIMELINE = "/admin/sessions/{session_id}/timeline"
USAGE = "/api/usage"
CHAT_PAGE = "/"
DASHBOARD_PAGE = "/admin"
STATIC_FILE = "/static/{name}"
STATIC_VENDOR_FILE = "/static/vendor/{library}/{name}"
METRICS = "/metrics"
OPENAPI = "/api/openapi.json"


@dataclass(frozen=True)
class IntQuery:
    """An integer query parameter: its name, its bounds and its default (None: absent means unset)."""

    name: str
    low: int
    high: int
    default: int | None = None
    description: str | None = None

    def parameter(self) -> dict:
        """The OpenAPI parameter object."""
        schema = {"type": "integer", "minimum": self.low, "maximum": self.high}
        if self.default is not None:
            schema["default"] = self.default
        out = {"name": self.name, "in": "query", "required": False, "schema": schema}
        if self.description:
            out["description"] = self.description
        return out


STATE_LIMIT = IntQuery("limit", 1, 100_000, description="Only the last N messages")
ADMIN_LIMIT = IntQuery("limit", 1, 1000, default=100)
ADMIN_OFFSET = IntQuery("offset", 0, 1_000_000_000, default=0)
# its default is the server's --agent-log-lines, so the route passes it
LOG_LINES = IntQuery("lines", 0, 100_000, description="Only the last N lines (default: every line kept, --agent-log-lines)")
