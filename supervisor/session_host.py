"""What one session's life may ask of the registry that holds it: the ``SessionHost`` interface.

A ``SessionLife`` (supervisor/session_life.py) is handed its host when the registry
(supervisor/registry.py) registers the session, and reaches above itself through this interface
only: the state change, capacity, the indexes by routing id and pid, the store, the end and the
forgetting of a session, and the shared parts (hub, events, output, timers) it uses on every turn.
So a change to the registry that keeps this interface cannot break a session, and a reader (or a
tool) sees the dependency as an import.
"""

from collections import Counter
from typing import Protocol

from corral.supervisor import errors
from corral.supervisor.agent_output import AgentOutput
from corral.supervisor.config import Config
from corral.supervisor.deadlines import Deadlines
from corral.supervisor.drain import Drain
from corral.supervisor.events import EventBus
from corral.supervisor.hub import Hub
from corral.supervisor.reaper import Reaper
from corral.supervisor.restarts import RestartPolicy


class SessionHost(Protocol):
    """The registry as one session sees it (``Supervisor`` implements it)."""

    config: Config
    counters: Counter  # the server's counters (spawns, restarts, agents killed for abuse ...)
    events: EventBus
    output: AgentOutput  # every agent's stdout/stderr
    policy: RestartPolicy
    reaper: Reaper  # idle and max-age timers
    turn_deadlines: Deadlines  # turn -> its session's Turns, until request_timeout
    hung_turns: Deadlines  # a timed-out turn -> its session's Turns, until it counts as unresponsive
    drain: Drain  # the shutdown's: new turns refused once it has ended the turns in flight

    @property
    def hub(self) -> Hub:
        """The ROUTER every agent's connection is on."""

    @property
    def closing(self) -> bool:
        """Whether the server is shutting down (no more spawns)."""

    def transition(self, s, new: str, **info) -> None:
        """Move a session to a new state (checked against the table), keep counts, log and publish it."""

    def check_capacity(self, s) -> None:
        """Refuse a spawn past max_sessions (503) or the tenant's quota (429)."""

    def drop_if_new(self, s) -> None:
        """Forget a session that was never started."""

    def next_request_id(self) -> int:
        """A request id no other turn of this server has."""

    async def prepare_spawn(self, s) -> list[dict]:
        """Claim the session, record it in the store; the history its agent starts with."""

    async def ready_spawner(self):
        """The spawner to launch with (waiting for a zygote restart in progress); 503 if there is none."""

    def index(self, s, *, routing_id: bytes | None = None, pid: int | None = None) -> None:
        """Route frames from ``routing_id`` and exits of ``pid`` to this session."""

    def unindex(self, s, *, routing_id: bytes, pid: int | None) -> None:
        """Stop routing them (only where they still name this session)."""

    async def record_message(self, s, role: str, text: str):
        """Commit one message to the store (the StoredMessage); SessionMoved, fenced out, on a stale epoch."""

    async def moved(self, session_id: str) -> errors.SessionMoved:
        """The error for a session another node has claimed, naming its owner when that one is alive."""

    def record_end(self, s, final: str) -> None:
        """Write the session's end to the store (in the background)."""

    def agent_env(self, tenant: str) -> dict[str, str]:
        """The variables a tenant's agents get over the base environment (the tenants file's ``env``)."""

    def forget(self, s) -> None:
        """Drop a down session from memory once nobody waits on it."""
