"""corral: one OS process per chat or agent session, herded by a supervisor.

The repository keeps its folders at the top (``supervisor/``, ``agent_proc/``, ``web/``); they install
as ``corral.supervisor``, ``corral.agent_proc`` and ``corral.web`` (see setup.py), so corral never
collides with another distribution's top-level ``supervisor`` or ``web``. Agents import from here.
"""

from corral.agent_proc import Agent, BadRequest, ConfigError, UnknownCommand

__all__ = ["Agent", "BadRequest", "ConfigError", "UnknownCommand"]
