"""What the routes ask of the supervisor: find, list, history, end, stats (``Supervisor.queries``).

Routes go through these and never through the store: every answer is a ``SessionView``
(supervisor/views.py) whether the session is held here or only stored, and the rules about a
session's data (ending one a dead node left live, purging, the admin's kill) live here once.
``Queries`` holds no state: it reads the registry (supervisor/registry.py) through the interface
below, ``QueriedRegistry``, and asks the cluster's ``Activation`` where a session lives.
"""

from collections import Counter
from typing import Protocol

from corral.supervisor import errors, states
from corral.supervisor.cluster.activation import Activation
from corral.supervisor.config import Config
from corral.supervisor.session import Session
from corral.supervisor.session import valid_session_id
from corral.supervisor.session_keys import session_key
from corral.supervisor.store import Store
from corral.supervisor.store_errors import store_call
from corral.supervisor.views import SessionView


class QueriedRegistry(Protocol):
    """What the queries read and ask of the registry (``Supervisor`` implements it)."""

    config: Config
    sessions: dict[str, Session]  # the sessions this node holds, by id
    counters: Counter
    live_by_tenant: Counter
    tenant_limits: dict[str, int]

    @property
    def store(self) -> Store:
        """The session store."""

    @property
    def node(self) -> str:
        """This node's name."""

    def count(self) -> int:
        """Number of live sessions."""

    def interrupt(self, s: Session) -> bool:
        """Interrupt a session's turn in progress."""

    async def kill(self, s: Session) -> str | None:
        """Kill a session now."""

    async def remove(self, s: Session, *, purge: bool = False) -> None:
        """End a session; with purge, delete its data too."""


class Queries:
    """Reads and ends sessions by tenant and id, for the web layer.

    Ids are per tenant (supervisor/session_keys.py): every question names the tenant, and a tenant
    can neither see nor tell apart another tenant's ids. The admin names the tenant too
    (``tenant_of`` finds it when only one tenant has that id).
    """

    def __init__(self, registry: QueriedRegistry, activation: Activation):
        self.registry = registry
        self.activation = activation

    async def _lookup(self, session_id: str, tenant: str, *, stored: bool = False):
        """The session this node holds (or None) and, when that is not enough, its stored record (or None).

        ``stored``: the record even when a live peer owns the session (that owner did not answer a read).
        """
        if not valid_session_id(session_id):
            return None, None
        key = session_key(tenant, session_id)
        s = self.registry.sessions.get(key)
        if s is None or (not s.live and self.activation.fenced):
            if stored:
                record = await self.activation.stored(key)
            else:
                record = await self.activation.placed(key)
            return s, record if record is None or record.tenant == tenant else None
        return s, None

    async def _owned(self, session_id: str, tenant: str):
        """Like ``_lookup``, but 404 when the tenant has no such session."""
        s, record = await self._lookup(session_id, tenant)
        if s is None and record is None:
            raise errors.SessionNotFound(f"no session {session_id}")
        return s, record

    async def tenant_of(self, session_id: str, tenant: str | None = None) -> str:
        """For the admin: the tenant of the session ``session_id`` (``tenant`` when given); 404 if none has it,
        409 if several do and ``tenant`` does not say which."""
        if tenant is not None:
            return tenant
        tenants = {s.tenant for s in list(self.registry.sessions.values()) if s.id == session_id}
        if valid_session_id(session_id):
            tenants.update(await store_call(self.registry.store.tenants_of(session_id)))
        if not tenants:
            raise errors.SessionNotFound(f"no session {session_id}")
        if len(tenants) > 1:
            raise errors.AmbiguousSession(f"tenants {', '.join(sorted(tenants))} each have a session {session_id}: "
                                          "name one with ?tenant=")
        return tenants.pop()

    def view(self, s) -> SessionView:
        """The view of a session this node holds."""
        return SessionView.of_session(s, self.registry.node)

    async def find(self, session_id: str, tenant: str, *, stored: bool = False) -> SessionView | None:
        """The tenant's session's view (held here, else stored), or None if unknown; never spawns or registers.

        ``stored``: see ``_lookup``.
        """
        s, record = await self._lookup(session_id, tenant, stored=stored)
        if s is None and record is None:
            return None
        return self.view(s) if s is not None else SessionView.of_record(record)

    def held_views(self, tenant: str | None = None, state: str | None = None) -> list[SessionView]:
        """The sessions this node holds in memory that pass the filters (``state`` may be ``live``)."""
        views = (self.view(s) for s in list(self.registry.sessions.values()))
        return [v for v in views if v.matches(tenant, state)]

    async def stored_views(self, tenant: str | None, state: str | None, limit: int) -> list[SessionView]:
        """Up to ``limit`` sessions only the store knows (those held here are left out), newest first."""
        held = set(self.registry.sessions)  # keys, as the store's rows are
        # Enough stored rows that, after dropping the ones memory holds, ``limit`` remain.
        stored = await store_call(self.registry.store.list_sessions(tenant=tenant, status=state, limit=limit + len(held)))
        return [SessionView.of_record(r) for r in stored if r.id not in held]

    async def history(self, session_id: str, tenant: str, *, limit: int | None = None, stored: bool = False):
        """The tenant's session (None if unknown: a new one) and its stored messages, oldest first; 404 if foreign."""
        found = await self.find(session_id, tenant, stored=stored)
        if found is None:
            return None, []
        return found, await store_call(self.registry.store.history(found.key, limit=limit))

    def interrupt_turn(self, key: str) -> bool:
        """Interrupt the turn in progress of a session (by key) held here; False if there is none to interrupt."""
        s = self.registry.sessions.get(key)
        return s is not None and self.registry.interrupt(s)

    async def end(self, session_id: str, tenant: str, *, purge: bool = False) -> str | None:
        """The owner ends a session (its process stops); with ``purge`` its data goes too. The state it is left in.

        A session a dead node left live (no process anywhere, no end recorded) has its end recorded
        here, so retention applies to it. A crashed session keeps its restart budget.
        """
        s, record = await self._owned(session_id, tenant)
        if s is not None and s.live:
            await self.registry.remove(s, purge=purge)
            return s.state
        key = session_key(tenant, session_id)
        if purge:
            await store_call(self.registry.store.delete_session(key))
        elif s is None and record.ended_at is None:
            await store_call(self.registry.store.set_status(key, states.ENDED, end_reason=states.ENDED, ended=True))
            return states.ENDED
        return s.state if s is not None else record.status

    async def discard(self, session_id: str, tenant: str, *, purge: bool, run) -> tuple[SessionView, bool]:
        """The admin ends a tenant's session: a live one is killed by ``run`` (True: it is stopping).

        A down one is forgotten now, restart budget included. ``purge`` deletes its data too.
        """
        s, record = await self._owned(session_id, tenant)
        if s is not None and s.live:
            run(self._kill_and_purge(s, purge))
            return self.view(s), True
        if s is not None:
            await self.registry.remove(s, purge=purge)
        elif purge:
            await store_call(self.registry.store.delete_session(record.id))
        return (self.view(s) if s is not None else SessionView.of_record(record)), False

    async def _kill_and_purge(self, s, purge: bool) -> None:
        """Kill the session's process, then delete its data if asked."""
        await self.registry.kill(s)
        if purge:
            await self.registry.remove(s, purge=True)

    async def stats(self) -> dict:
        """Totals from the store (sessions, messages, per tenant) and this node's live view of them."""
        stored = await store_call(self.registry.store.stats())
        by_state = Counter(s.state for s in list(self.registry.sessions.values()) if s.state is not None)
        by_tenant = stored["by_tenant"]  # every live session was recorded before it was spawned
        for tenant, entry in by_tenant.items():
            entry["live"] = self.registry.live_by_tenant.get(tenant, 0)
            entry["max_sessions"] = self.registry.tenant_limits.get(tenant) or self.registry.config.max_sessions_per_tenant or None
        return {
            **stored,
            "live_sessions": self.registry.count(),
            "max_sessions": self.registry.config.max_sessions,
            "by_state": dict(by_state),
            "by_tenant": by_tenant,
            "counters": dict(self.registry.counters),
        }

    async def cluster_nodes(self) -> list[dict]:
        """The nodes of the cluster as /admin/nodes lists them; a single node lists itself."""
        return await self.activation.nodes(self.registry.count())

    async def cluster_totals(self) -> dict:
        """This node's name and, across the cluster, the live nodes and their live sessions."""
        nodes = [n for n in await self.cluster_nodes() if n.get("alive")]
        return {"node": self.registry.node, "cluster": {
            "nodes": len(nodes), "live_sessions": sum(n.get("live_sessions") or 0 for n in nodes)}}
