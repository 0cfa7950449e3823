"""The agent side of corral: what runs inside each session's own process.

Imports nothing from ``supervisor`` or ``web`` so an agent process never loads the web stack.
"""

from corral.agent_proc.agent import Agent, BadRequest, ConfigError, UnknownCommand, UpstreamError

__all__ = ["Agent", "BadRequest", "ConfigError", "UnknownCommand", "UpstreamError"]
