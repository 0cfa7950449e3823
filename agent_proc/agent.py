"""The base class users subclass to write an agent.

One instance lives in one process and serves one session, one message at a time, so hooks
may keep plain instance state without locks.
"""

from typing import Any, Iterable, Iterator


class UnknownCommand(Exception):
    """Raised by ``on_command`` for a command the agent does not know."""


class BadRequest(ValueError):
    """Raised by a hook for input it cannot take; the turn fails, the process lives."""


class UpstreamError(Exception):
    """Raised by a hook when a service the agent relies on (a model's API, a tool server) failed:
    the turn fails with 502 ``upstream_error`` and this message; the process lives."""


class ConfigError(Exception):
    """Raised by ``check_config`` for configuration the agent cannot run without: the server does not start."""


class Agent:
    """One session's agent. Override the hooks you need."""

    @classmethod
    def check_config(cls, sandbox) -> None:
        """Called once as the server starts, before it serves: raise ConfigError saying what is missing.

        Runs in the zygote, after the agent's module is imported, with the server's environment;
        ``sandbox`` (agent_proc/startup_checks.py's SandboxInfo) tells what the sessions' processes
        will be able to reach. The default checks nothing.
        """

    def __init__(self, session_id: str, tenant: str, metadata: dict | None = None):
        self.session_id = session_id
        self.tenant = tenant
        self.metadata = metadata or {}

    def on_start(self, history: list[dict]) -> None:
        """Called once before any message, with the session's stored history (oldest first)."""

    def on_message(self, text: str) -> str | Iterable[str]:
        """Answer a user message: return the reply, or yield chunks to stream it."""
        raise NotImplementedError

    def on_system(self, text: str) -> str | None:
        """Take a system message; the return value, if any, is sent back as the result."""
        return None

    def on_command(self, command: str, args: Any) -> Any:
        """Run a command (the seeds' mcp-command); return a msgpack-able result."""
        raise UnknownCommand(command)

    def snapshot(self) -> dict:
        """State fields shown in ``/api/state``; keep it small, it rides on every reply."""
        return {}

    def on_stop(self) -> None:
        """Called when the supervisor asks the agent to shut down."""


def iter_reply(result: str | Iterable[str] | None) -> Iterator[str]:
    """Yield a hook's result as chunks, whether it returned a string or a generator."""
    if result is None:
        return
    if isinstance(result, str):
        yield result
        return
    for chunk in result:
        yield str(chunk)
