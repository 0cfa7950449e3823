"""``SessionView``: what the APIs read about a session, whichever source it comes from.

A session is either held by this node (a live ``Session`` in memory, or a recently crashed one)
or known only to the store (ended, or live on another node). The web layer renders both the same
way from one ``SessionView`` and never learns which kind it had.
"""

import time
from dataclasses import dataclass

from corral.supervisor.session_keys import id_of

LIVE_FILTER = "live"  # the list filter that means every state with a process


@dataclass(slots=True)
class SessionView:
    """One session as the routes render it, read at one moment (times are unix seconds)."""

    id: str
    tenant: str
    state: str | None
    held: bool  # this node holds it in memory: its process, if it has one, is here
    node: str | None  # the node it lives on (this one when held; in a cluster, the stored owner otherwise)
    pid: int | None
    created_at: float
    last_activity: float
    idle_seconds: float
    age_seconds: float | None
    message_count: int
    restarts: int
    is_processing: bool
    end_reason: str | None
    exit: str | None
    metadata: dict
    agent_state: dict
    live: bool
    key: str  # its tenant and id as one name (supervisor/session_keys.py)

    @classmethod
    def of_session(cls, s, node: str) -> "SessionView":
        """The view of a session this node holds."""
        idle = s.idle_seconds()
        live = s.live
        # positional: this is built for every chat answer, and keywords cost more than the rest
        return cls(
            s.id, s.tenant, s.state, True, node, s.pid, s.created_at, round(time.time() - idle, 3), round(idle, 3),
            round(time.monotonic() - s.spawned_at, 3) if s.spawned_at and live else None,
            s.message_count, len(s.restarts), s.inflight > 0, s.end_reason, s.exit_description, s.metadata,
            s.agent_state, live, s.key,
        )

    @classmethod
    def of_record(cls, record) -> "SessionView":
        """The view of a session only the store knows: no process here, nothing in progress.

        The agent's state lives only in its process, so it reads empty.
        """
        return cls(
            id=id_of(record.id), key=record.id, tenant=record.tenant, state=record.status, held=False, node=record.node, pid=None,
            created_at=record.created_at, last_activity=record.last_activity,
            idle_seconds=round(max(0.0, time.time() - record.last_activity), 3), age_seconds=None,
            message_count=record.message_count, restarts=0, is_processing=False, end_reason=record.end_reason,
            exit=None, metadata=record.metadata, agent_state={}, live=False,
        )

    def matches(self, tenant: str | None, state: str | None) -> bool:
        """Whether the view passes the list filters (``state`` may be ``live``)."""
        if tenant is not None and self.tenant != tenant:
            return False
        if state == LIVE_FILTER:
            return self.live
        return state is None or self.state == state
