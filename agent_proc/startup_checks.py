"""What the zygote checks once, as the server starts, so that a mistake stops ``corral serve``
instead of failing every session's first message: the agent class, and its own configuration
(``Agent.check_config``). Failures are told in one line naming the file and line at fault.
"""

import importlib
import os
import traceback
from dataclasses import dataclass

from corral.agent_proc.agent import Agent, ConfigError

HOOKS = ("on_start", "on_message", "on_system", "on_command", "snapshot", "on_stop", "check_config")


@dataclass(frozen=True)
class SandboxInfo:
    """What an agent's process will be able to reach, for ``Agent.check_config``."""

    own_uid: bool = False  # each session runs under a uid of its own (corral runs as root, sandbox on)

    def unreachable(self, path: str) -> str | None:
        """The outermost directory on the way to ``path`` a session's uid cannot pass (no o+x), else None."""
        if not self.own_uid:
            return None
        probe = os.path.realpath(path)
        blocked, probe = None, probe if os.path.isdir(probe) else os.path.dirname(probe)
        while True:
            try:
                if not os.stat(probe).st_mode & 0o001:
                    blocked = probe
            except OSError:
                pass
            parent = os.path.dirname(probe)
            if parent == probe:
                return blocked
            probe = parent


def check_agent(cls, spec: str, sandbox: SandboxInfo) -> None:
    """Raise ConfigError unless ``cls`` is an Agent subclass with callable hooks whose own check passes."""
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise ConfigError(f"{spec} is not a subclass of corral.Agent (it is {describe_object(cls)})")
    for name in HOOKS:
        if not callable(getattr(cls, name, None)):
            raise ConfigError(f"{spec}.{name} is not callable (it is {describe_object(getattr(cls, name, None))})")
    try:
        cls.check_config(sandbox)
    except ConfigError as exc:
        raise ConfigError(f"agent {spec}: {exc}") from None


def describe_object(obj) -> str:
    """A short phrase for what was found where a class or hook was expected."""
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    return f"{type(obj).__name__} {obj!r}"[:120]


def describe_failure(spec: str, exc: BaseException) -> str:
    """The server's one-line start-up error for a failed import or check of agent ``spec``."""
    text = str(exc) if isinstance(exc, ConfigError) else f"cannot load agent {spec}: {describe_exception(exc)}"
    return " ".join(text.splitlines())


def describe_exception(exc: BaseException) -> str:
    """The exception and where it was raised, on one line: ``Error('…') at mybot.py:12: the line``.

    The place is the innermost frame of the agent's code (not the import machinery, not corral's
    loader); a ConfigError is the agent's own sentence and is told as it is.
    """
    if isinstance(exc, ConfigError):
        return str(exc)
    own = [f for f in traceback.extract_tb(exc.__traceback__) if not _machinery(f.filename)]
    if not own:
        return repr(exc)
    where = own[-1]
    line = f": {where.line.strip()}" if where.line else ""
    return f"{exc!r} at {where.filename}:{where.lineno}{line}"


def _machinery(filename: str) -> bool:
    """Whether a frame belongs to the import system or to corral's loading of the agent."""
    return filename.startswith("<frozen ") or os.path.dirname(filename) in (_IMPORTLIB_DIR, _AGENT_PROC_DIR)


_IMPORTLIB_DIR = os.path.dirname(importlib.__file__)
_AGENT_PROC_DIR = os.path.dirname(os.path.abspath(__file__))
