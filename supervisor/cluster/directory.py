"""Where each session lives: single activation by atomic claim, with an epoch for fencing.

The directory is the seam the registry's ``Activation`` (supervisor/cluster/activation.py) asks;
what it answers comes from the store's cluster methods (supervisor/store/base.py), which each
backend implements. On a single node's store (SQLite, memory, PostgreSQL without clustering)
every claim succeeds and no write is fenced. On a store several nodes share (PostgreSQL) the owner
is ``sessions.node`` and the claim's number ``sessions.epoch``; a claim is one statement that
succeeds only when the session is new, unowned, already this node's, or its owner's lease has
expired.
"""

from corral.supervisor.store import ACTIVATIONS, Placement, SessionRecord

__all__ = ["ACTIVATIONS", "Directory", "Placement"]


class Directory:
    """Single activation: who may run a session's process, for one node."""

    def __init__(self, store, node: str) -> None:
        self.store = store
        self.node = node  # this node's id (set again when it joins a cluster)

    @property
    def fenced(self) -> bool:
        """Whether writes carry the claim's epoch (the store is shared by a cluster)."""
        return self.store.shared

    async def lookup(self, session_id: str) -> Placement:
        """The stored session and, if another live node owns it, that node."""
        return await self.store.placement(session_id, self.node)

    async def claim(self, session_id: str, *, tenant: str, agent: str, metadata: dict) -> SessionRecord | None:
        """Make this node the owner (creating the session if new); None when a live node owns it."""
        return await self.store.claim_session(session_id, tenant=tenant, agent=agent, metadata=metadata,
                                              node=self.node)

    async def stale(self, claims: dict[str, int]) -> list[str]:
        """Of these session -> epoch claims, the ones no longer this node's."""
        return await self.store.stale_claims(claims, self.node)

    async def nodes(self) -> list[dict]:
        """The cluster's nodes as /admin/nodes lists them (none for a single node's store)."""
        return [{
            "node": n.id, "url": n.url, "alive": n.alive, "self": n.id == self.node,
            "started_at": n.started_at, "heartbeat_at": n.heartbeat_at, "expires_at": n.expires_at,
            "lease_age_seconds": round(n.lease_age, 3), "sessions_owned": n.sessions_owned, **n.info,
        } for n in await self.store.node_records()]
