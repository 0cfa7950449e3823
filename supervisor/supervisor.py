"""Where ``Supervisor`` was defined before the split; kept so ``corral.supervisor.supervisor`` imports stay stable.

The registry is in supervisor/registry.py, one session's life in supervisor/session_life.py and
supervisor/turns.py, the shared parts' start and close in supervisor/lifecycle.py.
"""

from corral.supervisor.registry import Supervisor, recent_history

__all__ = ["Supervisor", "recent_history"]
