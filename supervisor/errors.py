"""Errors the supervisor raises, each with the HTTP status and code the API answers with."""


class CorralError(Exception):
    """Base of every error a client may see."""

    status = 500
    code = "internal_error"
    retry_after: float | None = None

    def __init__(self, message: str, *, retry_after: float | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        if retry_after is not None:
            self.retry_after = retry_after
        if code is not None:
            self.code = code


class InvalidRequest(CorralError):
    status, code = 400, "bad_request"


class CommandNotFound(InvalidRequest):
    code = "unknown_command"


class SessionNotFound(CorralError):
    status, code = 404, "session_not_found"


class AmbiguousSession(CorralError):
    """The admin named a session id several tenants have without saying whose (``?tenant=``)."""

    status, code = 409, "ambiguous_session"


class TooLarge(CorralError):
    status, code = 413, "too_large"


class MailboxFull(CorralError):
    status, code = 429, "mailbox_full"


class RateLimited(CorralError):
    status, code = 429, "rate_limited"


class QuotaExceeded(CorralError):
    status, code = 429, "quota_exceeded"


class AgentDied(CorralError):
    """The agent died (or was stopped) while serving the request; the next request respawns it."""

    status, code = 502, "agent_crashed"


class AgentBadReply(CorralError):
    """The agent answered with something JSON cannot carry (bytes, a set, an object, NaN); it lives on."""

    status, code = 502, "agent_bad_reply"


class UpstreamFailed(CorralError):
    """A service the agent relies on (a model's API, a tool server) failed this turn; the agent lives."""

    status, code = 502, "upstream_error"


class AtCapacity(CorralError):
    status, code = 503, "at_capacity"


class SessionFailed(CorralError):
    """The session crashed more than ``max_restarts`` times in ``restart_window``."""

    status, code = 503, "session_failed"


class ShuttingDown(CorralError):
    """The server is stopping: it takes no new turn, and one it had to interrupt ends with this."""

    status, code = 503, "shutting_down"
    retry_after = 5


class Unavailable(CorralError):
    """A part the request needs (the store, the zygote) is down."""

    status, code = 503, "unavailable"


class SessionMoved(Unavailable):
    """Another cluster node owns the session (``owner_url`` when it is known and alive).

    The web layer forwards the request there; when it cannot, the client sees a 503 to retry.
    """

    code = "session_moved"
    retry_after = 1

    def __init__(self, message: str, *, owner_url: str | None = None, owner: str | None = None):
        super().__init__(message)
        self.owner_url, self.owner = owner_url, owner


class TurnTimeout(CorralError):
    status, code = 504, "request_timeout"


class StartupError(Exception):
    """The server cannot start (agent not importable, store unreachable, ...); the message says why."""
