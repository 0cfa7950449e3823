"""The supervisor: session registry, spawner, ZeroMQ hub, limits, reaper, restart policy, store."""

from supervisor.config import Config
from supervisor.supervisor import Supervisor

__all__ = ["Config", "Supervisor"]
