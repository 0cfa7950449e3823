"""The supervisor's side of the cluster: join at start, claim before a spawn, fence out when refused.

``Activation`` is a part the registry (``Supervisor``, supervisor/registry.py) holds as
``activation``: it owns this node's name, the cluster directory (the seam that says where a session
lives) and this node's membership. It is handed what it uses of the registry when made: the
sessions it may fence out, the counters, what this node reports of itself, and ``end_now``, which
ends a fenced-out session's process.
"""

import socket

from corral.supervisor import errors
from corral.supervisor.cluster.directory import ACTIVATIONS, Directory
from corral.supervisor.cluster.membership import Membership, new_node_id
from corral.supervisor.logs import get_logger
from corral.supervisor.session_keys import id_of
from corral.supervisor.store_errors import store_call

log = get_logger(component="cluster")
ACTIVATED_ELSEWHERE = "activated_elsewhere"  # the event a session's listeners get when another node claims it


def advertised_url(config) -> str:
    """Where other nodes reach this one: --advertise-url, else http://host:port (the host name for a wildcard bind)."""
    if config.advertise_url:
        return config.advertise_url.rstrip("/")
    host = config.host if config.host not in ("0.0.0.0", "::", "") else socket.gethostname()
    return f"http://{'[' + host + ']' if ':' in host else host}:{config.port}"


class Activation:
    """Single activation for the registry: this node's name, the directory, its membership, fencing."""

    def __init__(self, config, node: str, *, sessions: dict, counters, events, node_info, end_now):
        """``node``: this server's name until it joins a cluster (then a fresh node id).

        ``sessions``: the registry's sessions by key; ``events``: where a claim elsewhere is told;
        ``node_info()``: what this node reports in its heartbeat; ``end_now(s)``: SIGKILL a session's
        process and stop it, writing nothing.
        """
        self.config = config
        self.node = node
        self.sessions = sessions
        self.counters = counters
        self.events = events
        self.node_info = node_info
        self.end_now = end_now
        self.directory: Directory | None = None
        self.membership: Membership | None = None

    @property
    def fenced(self) -> bool:
        """Whether this node's writes carry a claim's epoch (a cluster on PostgreSQL)."""
        return self.directory is not None and self.directory.fenced

    async def join(self, store, claim) -> None:
        """The directory on the store; on a store other nodes share, take a fresh node id and join.

        ``claim``: this server's hold on its identity (supervisor/node.py), which also hears of claims.
        """
        self.directory = Directory(store, self.node)
        if not store.shared:
            return
        # host:port: with its node lock held (supervisor/node.py), older rows of it are dead runs of this server
        identity = self.node if getattr(claim, "exclusive", False) else None
        self.node = self.directory.node = new_node_id()
        self.membership = Membership(
            store, node_id=self.node, url=advertised_url(self.config), lease=self.config.node_lease,
            info=self.node_info, on_lapse=self._verify_claims, on_lost=self._lease_lost, name=identity)
        await self.membership.join()
        await claim.listen(ACTIVATIONS, self._on_activation)

    def _on_activation(self, payload: str) -> None:
        """A node claimed a session: if another, this node's streams of it follow it there (web/routes/stream.py)."""
        key, _, node = payload.partition(" ")
        if node != self.node:
            self.events.publish(ACTIVATED_ELSEWHERE, key, to_all=False, node=node)

    async def owner_url(self, key: str) -> str | None:
        """The advertised URL of the live node other than this one that owns the session, if any."""
        return (await store_call(self.directory.lookup(key))).owner_url

    async def leave(self) -> None:
        """Delete this node's row (after its sessions stopped): the others may claim them at once."""
        if self.membership is not None:
            await self.membership.leave()

    async def nodes(self, live_count: int) -> list[dict]:
        """The nodes of the cluster as /admin/nodes lists them; a single node lists itself."""
        rows = await store_call(self.directory.nodes())
        if rows or self.membership is not None:
            return rows
        return [{"node": self.node, "url": advertised_url(self.config), "alive": True, "self": True,
                 "lease_age_seconds": 0.0, "sessions_owned": live_count, **self.node_info()}]

    async def placed(self, key: str):
        """The stored record of a session (by key) this node may serve; SessionMoved if a live peer owns it."""
        placement = await store_call(self.directory.lookup(key))
        if placement.owner_url is not None:
            raise errors.SessionMoved(f"session {id_of(key)} is owned by node {placement.owner}",
                                      owner_url=placement.owner_url, owner=placement.owner)
        return placement.record

    async def stored(self, key: str):
        """The stored record of a session (by key), whoever owns it; None if unknown."""
        return (await store_call(self.directory.lookup(key))).record

    async def moved(self, key: str) -> errors.SessionMoved:
        """The error for a session (by key) another node has claimed, naming its owner when that one is alive."""
        placement = await store_call(self.directory.lookup(key))
        return errors.SessionMoved(f"session {id_of(key)} is owned by node {placement.owner}",
                                   owner_url=placement.owner_url, owner=placement.owner)

    async def claim(self, s):
        """Claim the session for this node before its process starts; SessionMoved if another won."""
        s.epoch = None
        record = await store_call(
            self.directory.claim(s.key, tenant=s.tenant, agent=self.config.agent, metadata=s.metadata))
        if record is None:
            raise await self.moved(s.key)
        if self.directory.fenced:
            s.epoch = record.epoch
        return record

    def unclaimed(self, s) -> bool:
        """Whether the session's writes must be skipped: in a cluster, it holds no claim (fenced out)."""
        return self.fenced and s.epoch is None

    def fence_out(self, s, why: str) -> None:
        """Another node claimed this session: end this node's stale process without writing anything."""
        if s.epoch is None and not s.live:
            return
        log.warning("session_fenced_out", session_id=s.id, tenant=s.tenant, pid=s.pid, epoch=s.epoch, why=why)
        self.counters["fenced_out"] += 1
        s.epoch = None  # its end must not be written over the new owner's state
        if s.live:
            s.exit_description = f"fenced out: {why}"
            self.end_now(s)  # at once: it must not answer anything more

    async def _verify_claims(self) -> None:
        """After a late heartbeat: end every process whose session another node claimed meanwhile."""
        claims = {s.key: s.epoch for s in list(self.sessions.values()) if s.live and s.epoch is not None}
        try:
            lost = await self.directory.stale(claims)
        except Exception as exc:  # the store is down again: the next beat retries
            log.warning("claims_unverified", error=str(exc))
            return
        for key in lost:
            s = self.sessions.get(key)
            if s is not None and s.epoch == claims[key]:
                self.fence_out(s, "claimed by another node while this one's lease had lapsed")

    async def _lease_lost(self) -> None:
        """No heartbeat within the lease: other nodes may claim any session, so end every process here."""
        for s in list(self.sessions.values()):
            if s.epoch is not None:
                self.fence_out(s, "this node's lease expired without a renewal")
