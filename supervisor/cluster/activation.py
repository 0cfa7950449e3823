"""The supervisor's side of the cluster: join at start, claim before a spawn, fence out when refused.

A mixin of ``Supervisor`` (kept apart so the registry stays readable): it reads ``self.store``,
``self.sessions``, ``self.config`` and ``self.node`` and stops a fenced-out session through its
``SessionLife``. ``self.directory`` is the seam the registry asks where a session lives.
"""

import contextlib
import os
import signal
import socket

from corral.supervisor import errors, states
from corral.supervisor.cluster.directory import ACTIVATIONS, LocalDirectory, directory_for
from corral.supervisor.cluster.membership import Membership, new_node_id
from corral.supervisor.logs import get_logger
from corral.supervisor.session_keys import id_of

log = get_logger(component="cluster")
ACTIVATED_ELSEWHERE = "activated_elsewhere"  # the event a session's listeners get when another node claims it


def advertised_url(config) -> str:
    """Where other nodes reach this one: --advertise-url, else http://host:port (the host name for a wildcard bind)."""
    if config.advertise_url:
        return config.advertise_url.rstrip("/")
    host = config.host if config.host not in ("0.0.0.0", "::", "") else socket.gethostname()
    return f"http://{'[' + host + ']' if ':' in host else host}:{config.port}"


class Activation:
    """Single activation for the Supervisor: the directory, this node's membership, fencing."""

    directory = None
    membership: Membership | None = None

    async def _join_cluster(self) -> None:
        """Pick the directory for the store; on PostgreSQL take a fresh node id and join."""
        self.directory = directory_for(self.store, self.node)
        if isinstance(self.directory, LocalDirectory):
            return
        # host:port: with its node lock held (supervisor/node.py), older rows of it are dead runs of this server
        identity = self.node if getattr(self.claim, "exclusive", False) else None
        self.node = self.directory.node = new_node_id()
        self.membership = Membership(
            self.store, node_id=self.node, url=advertised_url(self.config), lease=self.config.node_lease,
            info=self.node_info, on_lapse=self._verify_claims, on_lost=self._lease_lost, name=identity)
        await self.membership.join()
        await self.claim.listen(ACTIVATIONS, self._on_activation)

    def _on_activation(self, payload: str) -> None:
        """A node claimed a session: if another one, this node's streams of it follow it there (web/routes/stream.py)."""
        session_id, _, node = payload.partition(" ")
        if node != self.node:
            self.events.publish(ACTIVATED_ELSEWHERE, session_id, to_all=False, node=node)

    async def owner_url(self, session_id: str) -> str | None:
        """The advertised URL of the live node other than this one that owns the session, if any."""
        return (await self._store_call(self.directory.lookup(session_id))).owner_url

    async def _leave_cluster(self) -> None:
        """Delete this node's row (after its sessions stopped): the others may claim them at once."""
        if self.membership is not None:
            await self.membership.leave()

    def node_info(self) -> dict:
        """What this node reports in its heartbeat (shown by /admin/nodes)."""
        rss = None
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{os.getpid()}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {"live_sessions": self.live_count, "sessions_in_memory": len(self.sessions),
                "server_rss_bytes": rss, "pid": os.getpid()}

    async def cluster_nodes(self) -> list[dict]:
        """The nodes of the cluster as /admin/nodes lists them; a single node lists itself."""
        rows = await self.store_call(self.directory.nodes())
        if rows or self.membership is not None:
            return rows
        return [{"node": self.node, "url": advertised_url(self.config), "alive": True, "self": True,
                 "lease_age_seconds": 0.0, "sessions_owned": self.live_count, **self.node_info()}]

    async def _placed(self, key: str):
        """The stored record of a session (by key) this node may serve; SessionMoved if a live peer owns it."""
        placement = await self.store_call(self.directory.lookup(key))
        if placement.owner_url is not None:
            raise errors.SessionMoved(f"session {id_of(key)} is owned by node {placement.owner}",
                                      owner_url=placement.owner_url, owner=placement.owner)
        return placement.record

    async def moved(self, key: str) -> errors.SessionMoved:
        """The error for a session another node has claimed, naming its owner when that one is alive."""
        placement = await self.store_call(self.directory.lookup(key))
        return errors.SessionMoved(f"session {id_of(key)} is owned by node {placement.owner}",
                                   owner_url=placement.owner_url, owner=placement.owner)

    async def _claim(self, s):
        """Claim the session for this node before its process starts; SessionMoved if another won."""
        s.epoch = None
        record = await self.store_call(
            self.directory.claim(s.key, tenant=s.tenant, agent=self.config.agent, metadata=s.metadata))
        if record is None:
            raise await self.moved(s.key)
        if self.directory.fenced:
            s.epoch = record.epoch
        return record

    def _unclaimed(self, s) -> bool:
        """Whether the session's writes must be skipped: in a cluster, it holds no claim (fenced out)."""
        return self.directory is not None and self.directory.fenced and s.epoch is None

    def fence_out(self, s, why: str) -> None:
        """Another node claimed this session: end this node's stale process without writing anything."""
        if s.epoch is None and not s.live:
            return
        log.warning("session_fenced_out", session_id=s.id, tenant=s.tenant, pid=s.pid, epoch=s.epoch, why=why)
        self.counters["fenced_out"] += 1
        s.epoch = None  # its end must not be written over the new owner's state
        if s.live:
            s.exit_description = f"fenced out: {why}"
            s.life.send_signal(signal.SIGKILL)  # at once: it must not answer anything more
            self.background.spawn(s.life.stop(states.ENDED, force=True))

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
