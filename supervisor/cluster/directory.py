"""Where each session lives: single activation by atomic claim, with an epoch for fencing.

``LocalDirectory`` is the single-node case (SQLite, memory, or PostgreSQL without clustering):
every claim succeeds and no write is fenced. ``PgDirectory`` keeps the owner in ``sessions.node``
and the claim's number in ``sessions.epoch``; a claim is one statement that succeeds only when
the session is new, unowned, already this node's, or its owner's lease has expired.
"""

from dataclasses import dataclass

from corral.supervisor.store import SessionRecord

# the PostgreSQL channel a claim notifies, payload "<session id> <node id>" (ids hold no space)
ACTIVATIONS = "corral_activations"
# an owner is alive while its row in `nodes` has not expired (the database's clock)
_OWNER_ALIVE = "EXISTS (SELECT 1 FROM nodes n WHERE n.id = sessions.node AND n.expires_at > now())"


@dataclass
class Placement:
    """A session as the directory sees it: its record, and its owner's URL when another live node has it."""

    record: SessionRecord | None
    owner_url: str | None = None
    owner: str | None = None


class Directory:
    """Single activation: who may run a session's process (interface)."""

    fenced = False  # whether writes carry the claim's epoch

    async def lookup(self, session_id: str) -> Placement:
        """The stored session and, if another live node owns it, that node."""
        raise NotImplementedError

    async def claim(self, session_id: str, *, tenant: str, agent: str, metadata: dict) -> SessionRecord | None:
        """Make this node the owner (creating the session if new); None when a live node owns it."""
        raise NotImplementedError

    async def stale(self, claims: dict[str, int]) -> list[str]:
        """Of these session -> epoch claims, the ones no longer this node's."""
        return []

    async def nodes(self) -> list[dict]:
        """The cluster's nodes (just this one for a single node)."""
        return []


class LocalDirectory(Directory):
    """One node: every claim succeeds (the store's upsert), nothing is fenced."""

    def __init__(self, store, node: str) -> None:
        self.store = store
        self.node = node

    async def lookup(self, session_id: str) -> Placement:
        """The stored session; never owned elsewhere."""
        return Placement(await self.store.get_session(session_id))

    async def claim(self, session_id: str, *, tenant: str, agent: str, metadata: dict) -> SessionRecord:
        """Create or bring back the session, recording this node."""
        return await self.store.upsert_session(session_id, tenant=tenant, agent=agent, metadata=metadata,
                                               node=self.node)


class PgDirectory(Directory):
    """The directory of a cluster, in the sessions table of the shared PostgreSQL."""

    fenced = True

    def __init__(self, store, node: str) -> None:
        from corral.supervisor.store import postgres  # asyncpg only for a PostgreSQL store

        self.store = store
        self.node = node
        self._cols, self._record = postgres._SESSION_COLS, postgres._session

    async def lookup(self, session_id: str) -> Placement:
        """The session with its owner's URL when a live node other than this one holds it active."""
        rows = await self.store._fetch(
            f"SELECT {self._cols}, "
            "(SELECT url FROM nodes n WHERE n.id = sessions.node AND n.expires_at > now() "
            " AND n.id <> $2 AND sessions.ended_at IS NULL) AS owner_url FROM sessions WHERE id = $1",
            session_id, self.node)
        if not rows:
            return Placement(None)
        record = self._record(rows[0])
        url = rows[0]["owner_url"]
        return Placement(record, url, record.node if url else None)

    async def claim(self, session_id: str, *, tenant: str, agent: str, metadata: dict) -> SessionRecord | None:
        """One statement: insert, or take over when unowned, ours, ended (passivated), or the owner is dead.

        Concurrent claims of one row serialise on its lock and the loser re-reads the winner's
        row (READ COMMITTED re-checks the WHERE), so at most one node wins each epoch.
        """
        rows = await self.store._fetch(
            "INSERT INTO sessions (id, tenant, agent, metadata, status, node, epoch, created_at, last_activity) "
            "VALUES ($1, $2, $3, $4, 'starting', $5, 1, now(), now()) "
            "ON CONFLICT (id) DO UPDATE SET status = 'starting', node = EXCLUDED.node, "
            "epoch = sessions.epoch + 1, end_reason = NULL, ended_at = NULL "
            "WHERE sessions.node IS NULL OR sessions.node = EXCLUDED.node OR sessions.ended_at IS NOT NULL "
            f"OR NOT {_OWNER_ALIVE} "
            # every node's streams of the session learn where it lives now (sent at commit)
            f"RETURNING {self._cols}, pg_notify('{ACTIVATIONS}', sessions.id || ' ' || sessions.node)",
            session_id, tenant, agent, metadata or {}, self.node)
        return self._record(rows[0]) if rows else None

    async def stale(self, claims: dict[str, int]) -> list[str]:
        """Sessions whose epoch moved on (or that are gone) since this node claimed them."""
        if not claims:
            return []
        rows = await self.store._fetch(
            "SELECT mine.id FROM unnest($1::text[], $2::bigint[]) AS mine (id, epoch) "
            "LEFT JOIN sessions s ON s.id = mine.id "
            "WHERE s.id IS NULL OR s.epoch <> mine.epoch OR s.node IS DISTINCT FROM $3",
            list(claims), list(claims.values()), self.node)
        return [r[0] for r in rows]

    async def nodes(self) -> list[dict]:
        """Every node row with its lease age, liveness and live session count from the directory."""
        rows = await self.store._fetch(
            "SELECT n.id, n.url, n.started_at, n.heartbeat_at, n.expires_at, n.info, "
            "extract(epoch FROM now() - n.heartbeat_at) AS lease_age, n.expires_at > now() AS alive, "
            "(SELECT count(*) FROM sessions s WHERE s.node = n.id AND s.ended_at IS NULL) AS sessions_owned "
            "FROM nodes n ORDER BY n.started_at, n.id")
        return [{
            "node": r["id"], "url": r["url"], "alive": r["alive"], "self": r["id"] == self.node,
            "started_at": r["started_at"].timestamp(), "heartbeat_at": r["heartbeat_at"].timestamp(),
            "expires_at": r["expires_at"].timestamp(), "lease_age_seconds": round(float(r["lease_age"]), 3),
            "sessions_owned": r["sessions_owned"], **(r["info"] or {}),
        } for r in rows]


def directory_for(store, node: str) -> Directory:
    """The directory a store supports: a cluster's on PostgreSQL, else the single node's."""
    if getattr(store, "backend", None) == "postgresql":
        return PgDirectory(store, node)
    return LocalDirectory(store, node)
