"""This node's row in ``nodes``: joined at start, renewed by one timer, deleted at a clean stop.

A node is alive for everyone while its ``expires_at`` (the database's clock) is in the future.
The row is renewed every lease/3. A renewal that comes late (the node was paused, or PostgreSQL
was out of reach) means other nodes may have claimed its sessions meanwhile: ``on_lapse`` then
re-checks every claim this node holds. Past the lease without a successful renewal, the node
cannot know what it still owns, so ``on_lost`` stops its sessions (Akka's lease, self-fencing).
"""

import asyncio
import socket
import time
import uuid

from corral.supervisor import states
from corral.supervisor.logs import get_logger
from corral.supervisor.store import StoreError

log = get_logger(component="cluster")


def new_node_id() -> str:
    """A name unique to this run of this server: host name plus 48 random bits."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"


class Membership:
    """Join, renew and leave the cluster; tell the supervisor when its lease may have lapsed."""

    def __init__(self, store, *, node_id: str, url: str, lease: float, info=None,
                 on_lapse=None, on_lost=None, name: str | None = None) -> None:
        """``name``: the identity this process holds the node lock of (supervisor/node.py), if any."""
        self.store = store
        self.node_id = node_id
        self.url = url
        self.lease = lease
        self.name = name
        info = info or (lambda: {})
        # the identity rides in the row, so the next run of this server knows which rows were its own
        self._info = (lambda: {**info(), "name": name}) if name else info
        self._on_lapse = on_lapse
        self._on_lost = on_lost
        self.valid_until = 0.0  # monotonic: this node's own view of when its lease ends
        self._timer: asyncio.TimerHandle | None = None
        self._renewing: asyncio.Task | None = None
        self._lost = False

    async def join(self) -> None:
        """Insert this node's row (alive from now on) and start the renewal timer."""
        started = time.monotonic()
        await self.store.join_node(self.node_id, url=self.url, lease=self.lease, info=self._info())
        self.valid_until = started + self.lease
        log.info("node_joined", node=self.node_id, url=self.url, lease=self.lease)
        if self.name:
            await self._take_over_previous_runs()
        self._schedule()

    async def _take_over_previous_runs(self) -> None:
        """End the rows of this server's earlier runs, and their sessions: their next request is claimed at once.

        This process holds the port and the node lock of its identity, so a row with the same
        identity and URL belongs to a run that is dead (crashed, SIGKILLed), however long its
        lease still has: without this, its sessions would answer 503 until that lease ran out.
        """
        sessions = await self.store.take_over_previous_runs(
            self.node_id, url=self.url, name=self.name, status=states.LOST, end_reason=states.LOST_REASON)
        if sessions:
            log.warning("previous_run_taken_over", node=self.node_id, name=self.name, sessions=sessions)

    def _schedule(self) -> None:
        """Arm the one timer of this node's heartbeat."""
        self._timer = asyncio.get_running_loop().call_later(self.lease / 3, self._due)

    def _due(self) -> None:
        """The heartbeat timer fired: renew in a task (unless one is still on its way), arm the next beat."""
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.ensure_future(self.renew())
        elif time.monotonic() > self.valid_until:
            self._renewing = asyncio.ensure_future(self._lease_lost())  # PostgreSQL is not answering
        self._schedule()

    async def _lease_lost(self) -> None:
        """The lease ran out without a renewal: stop what this node can no longer prove it owns."""
        if self._lost:
            return
        self._lost = True
        log.error("lease_lost", node=self.node_id, lease=self.lease)
        if self._on_lost is not None:
            await self._on_lost()

    async def renew(self) -> bool:
        """Push expires_at forward; True if the lease had held all along (no claim could have been lost)."""
        started = time.monotonic()
        late = started > self.valid_until - self.lease / 6
        try:
            # held: the old lease still had a margin left, so no other node could have seen it lapse
            held = await self.store.renew_node(self.node_id, url=self.url, lease=self.lease, info=self._info())
        except (StoreError, OSError) as exc:
            log.warning("heartbeat_failed", node=self.node_id, error=str(exc))
            if time.monotonic() > self.valid_until:
                await self._lease_lost()
            return False
        self.valid_until = started + self.lease
        await self._sweep()
        if late or not held or self._lost:
            self._lost = False
            log.warning("lease_lapsed", node=self.node_id, late=late)
            if self._on_lapse is not None:
                await self._on_lapse()
            return False
        return True

    async def _sweep(self) -> None:
        """End the sessions of nodes dead for over a lease, and forget those nodes (any node may do it).

        Their processes died with their node; the epoch moves on, so a node that was only paused
        finds, when it wakes, that it no longer holds them.
        """
        try:
            ended = await self.store.sweep_dead_nodes(self.lease, status=states.LOST, end_reason=states.LOST_REASON)
        except StoreError as exc:
            log.warning("node_sweep_failed", error=str(exc))
            return
        if ended:
            log.warning("dead_nodes_sessions_ended", sessions=ended)

    async def leave(self) -> None:
        """Stop renewing and delete the row: this node's sessions are free for others at once."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        if self._renewing is not None and not self._renewing.done():
            self._renewing.cancel()
        try:
            await self.store.leave_node(self.node_id)
        except StoreError as exc:
            log.warning("node_leave_failed", node=self.node_id, error=str(exc))
        else:
            log.info("node_left", node=self.node_id)
