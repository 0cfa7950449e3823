"""The supervisor: session registry, spawner, ZeroMQ hub, limits, reaper, restart policy, store."""

from corral.supervisor.config import Config
from corral.supervisor.registry import Supervisor

__all__ = ["Config", "Supervisor"]
