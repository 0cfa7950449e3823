"""What the routes ask of the supervisor: find, list, history, end, stats (a mixin of ``Supervisor``).

Routes go through these and never through the store: every answer is a ``SessionView``
(supervisor/views.py) whether the session is held here or only stored, and the rules about a
session's data (ending one a dead node left live, purging, the admin's kill) live here once.
The store is called directly, as the routes did, so its failures read the same (web/errors.py).
"""

from collections import Counter

from corral.supervisor import errors, states
from corral.supervisor.session import valid_session_id
from corral.supervisor.session_keys import session_key
from corral.supervisor.views import SessionView


class Queries:
    """Reads and ends sessions by tenant and id, for the web layer; reads ``self.sessions``, ``self.store``, ``self.node``.

    Ids are per tenant (supervisor/session_keys.py): every question names the tenant, and a tenant
    can neither see nor tell apart another tenant's ids. The admin names the tenant too
    (``tenant_of`` finds it when only one tenant has that id).
    """

    async def _lookup(self, session_id: str, tenant: str, *, stored: bool = False):
        """The session this node holds (or None) and, when that is not enough, its stored record (or None).

        ``stored``: the record even when a live peer owns the session (that owner did not answer a read).
        """
        if not valid_session_id(session_id):
            return None, None
        key = session_key(tenant, session_id)
        s = self.sessions.get(key)
        if s is None or (not s.live and self.directory.fenced):
            if stored:
                record = (await self.store_call(self.directory.lookup(key))).record
            else:
                record = await self._placed(key)
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
        tenants = {s.tenant for s in list(self.sessions.values()) if s.id == session_id}
        if valid_session_id(session_id):
            tenants.update(await self.store.tenants_of(session_id))
        if not tenants:
            raise errors.SessionNotFound(f"no session {session_id}")
        if len(tenants) > 1:
            raise errors.AmbiguousSession(f"tenants {', '.join(sorted(tenants))} each have a session {session_id}: "
                                          "name one with ?tenant=")
        return tenants.pop()

    def view(self, s) -> SessionView:
        """The view of a session this node holds."""
        return SessionView.of_session(s, self.node)

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
        views = (self.view(s) for s in list(self.sessions.values()))
        return [v for v in views if v.matches(tenant, state)]

    async def stored_views(self, tenant: str | None, state: str | None, limit: int) -> list[SessionView]:
        """Up to ``limit`` sessions only the store knows (those held here are left out), newest first."""
        held = set(self.sessions)  # keys, as the store's rows are
        # Enough stored rows that, after dropping the ones memory holds, ``limit`` remain.
        stored = await self.store.list_sessions(tenant=tenant, status=state, limit=limit + len(held))
        return [SessionView.of_record(r) for r in stored if r.id not in held]

    async def history(self, session_id: str, tenant: str, *, limit: int | None = None, stored: bool = False):
        """The tenant's session (None if unknown: a new one) and its stored messages, oldest first; 404 if foreign."""
        found = await self.find(session_id, tenant, stored=stored)
        if found is None:
            return None, []
        return found, await self.store.history(found.key, limit=limit)

    def interrupt_turn(self, key: str) -> bool:
        """Interrupt the turn in progress of a session (by key) held here; False if there is none to interrupt."""
        s = self.sessions.get(key)
        return s is not None and s.life.interrupt()

    async def end(self, session_id: str, tenant: str, *, purge: bool = False) -> str | None:
        """The owner ends a session (its process stops); with ``purge`` its data goes too. The state it is left in.

        A session a dead node left live (no process anywhere, no end recorded) has its end recorded
        here, so retention applies to it. A crashed session keeps its restart budget.
        """
        s, record = await self._owned(session_id, tenant)
        if s is not None and s.live:
            await self.remove(s, purge=purge)
            return s.state
        key = session_key(tenant, session_id)
        if purge:
            await self.store.delete_session(key)
        elif s is None and record.ended_at is None:
            await self.store.set_status(key, states.ENDED, end_reason=states.ENDED, ended=True)
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
            await self.remove(s, purge=purge)
        elif purge:
            await self.store.delete_session(record.id)
        return (self.view(s) if s is not None else SessionView.of_record(record)), False

    async def _kill_and_purge(self, s, purge: bool) -> None:
        """Kill the session's process, then delete its data if asked."""
        await self.kill(s)
        if purge:
            await self.remove(s, purge=True)

    async def stats(self) -> dict:
        """Totals from the store (sessions, messages, per tenant) and this node's live view of them."""
        stored = await self.store.stats()
        by_state = Counter(s.state for s in list(self.sessions.values()) if s.state is not None)
        by_tenant = stored["by_tenant"]  # every live session was recorded before it was spawned
        for tenant, entry in by_tenant.items():
            entry["live"] = self.live_by_tenant.get(tenant, 0)
            entry["max_sessions"] = self.tenant_limits.get(tenant) or self.config.max_sessions_per_tenant or None
        return {
            **stored,
            "live_sessions": self.count(),
            "max_sessions": self.config.max_sessions,
            "by_state": dict(by_state),
            "by_tenant": by_tenant,
            "counters": dict(self.counters),
        }

    async def cluster_totals(self) -> dict:
        """This node's name and, across the cluster, the live nodes and their live sessions."""
        nodes = [n for n in await self.cluster_nodes() if n.get("alive")]
        return {"node": self.node, "cluster": {
            "nodes": len(nodes), "live_sessions": sum(n.get("live_sessions") or 0 for n in nodes)}}
