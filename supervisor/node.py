"""Which server this is in the store, and the lock that keeps that identity to one live server.

A node's name is ``<hostname>:<port>``; it is written into ``sessions.node`` for every session the
node runs, and on start a node ends the sessions its dead predecessor left live (``end_orphans``).
That is only safe when no live server holds the same identity, so a node claims it first and
holds the claim for its whole life:

- SQLite: the store file is the identity. One server per file, whatever its port: an exclusive
  ``flock`` on ``<file>.lock``. The holder owns every session in the file, so it ends every
  session a dead server left live in it.
- PostgreSQL: several nodes share the store, each under its own name. A session-level advisory
  lock keyed on (search path, name), held on a connection of its own; a node ends only its own
  orphans.
- in memory: nothing is shared, nothing is claimed.

A node that cannot claim its identity refuses to start (``NodeTaken``) before touching the store.
"""

import contextlib
import fcntl
import hashlib
import os
import socket

from corral.supervisor.errors import StartupError
from corral.supervisor.logs import get_logger

log = get_logger(component="node")


class NodeTaken(StartupError):
    """Another live server holds this node's identity."""


def node_name(port: int) -> str:
    """This server's name in the store: stable across its restarts, distinct per port on a host."""
    return f"{socket.gethostname()}:{port}"


class NoClaim:
    """The claim of a store nothing else can share (in memory)."""

    orphans_of: str | None
    exclusive = False  # whether no other live server can hold the same identity while this claim stands

    def __init__(self, node: str):
        self.orphans_of = node  # whose left-live sessions this node ends at start

    async def release(self) -> None:
        """Nothing to release."""

    async def listen(self, channel: str, callback) -> bool:
        """Call ``callback(payload)`` for each notification on ``channel``; False where the store has none."""
        return False


class FileClaim(NoClaim):
    """An exclusive flock on ``<SQLite file>.lock``, held until released or the process dies."""

    def __init__(self, db_path: str):
        super().__init__(None)  # the holder owns the whole file: every left-live session is an orphan
        self.path = os.path.realpath(db_path) + ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise NodeTaken naming the holder's pid."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise NodeTaken(f"the SQLite store {self.path.removesuffix('.lock')} is in use by another "
                            f"corral server (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    async def release(self) -> None:
        """Let the next server have the file (the lock also goes when the process dies)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class AdvisoryClaim(NoClaim):
    """A PostgreSQL session-level advisory lock on (search path, node), on a connection of its own."""

    exclusive = True

    def __init__(self, store, node: str):
        super().__init__(node)
        self.store = store
        self.conn = None

    async def acquire(self) -> None:
        """Take the lock or raise NodeTaken (StoreError if PostgreSQL cannot be reached)."""
        self.conn = await self.store.connect_alone("node lock")
        try:
            # the schema the store works in is part of the identity: two schemas are two stores
            search_path = await self.conn.fetchval("SELECT current_setting('search_path')")
            taken = await self.conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key(search_path, self.orphans_of))
        except BaseException:
            await self.release()
            raise
        if not taken:
            await self.release()
            raise NodeTaken(f"node {self.orphans_of} is already served by another live corral server "
                            f"(PostgreSQL at {self.store.target}, search_path {search_path})")
        self.conn.add_termination_listener(self._lost)

    async def listen(self, channel: str, callback) -> bool:
        """LISTEN on the lock's connection (idle otherwise): ``callback(payload)`` per notification."""
        if self.conn is None:
            return False
        await self.conn.add_listener(channel, lambda _conn, _pid, _channel, payload: callback(payload))
        return True

    def _lost(self, _conn) -> None:
        """The lock's connection went away: the identity is no longer held (said loudly, once)."""
        if self.conn is not None:
            log.error("node_lock_lost", node=self.orphans_of,
                      detail="the connection holding this node's advisory lock closed")

    async def release(self) -> None:
        """Close the lock's connection, which releases the lock."""
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=5)


def lock_key(search_path: str, node: str) -> int:
    """A signed 64-bit advisory-lock key for a node's identity within a schema."""
    digest = hashlib.blake2b(f"corral-node\0{search_path}\0{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def claim_node(store, node: str) -> NoClaim:
    """Claim ``node``'s identity in ``store`` (not yet opened) for this process's life, or raise NodeTaken.

    The store knows which claim it needs (``Store.hold_identity``): its backend is chosen once, in create_store.
    """
    return await store.hold_identity(node)
