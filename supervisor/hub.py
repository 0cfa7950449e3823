"""The hub: the ROUTER every agent's DEALER connects to, spoken natively on the asyncio loop.

ZMTP (ZeroMQ's wire protocol, ``agent_proc/zmtp.py``) over the ``ipc://`` Unix socket, each
agent's connection an asyncio protocol: a frame is read and dispatched in the loop's own read
callback and written with one ``transport.write``, with no libzmq I/O thread to hand it across
(docs/benchmarks.md). ROUTER semantics are kept: a peer is addressed by the routing id it
announces, a second peer under a routing id in use is refused, sending to an unknown one fails.
Frames whose spawn token does not match their routing id are dropped: an agent cannot speak for
another session.
"""

import asyncio
import itertools
import os
from collections.abc import Callable

from agent_proc import protocol as p
from agent_proc import zmtp
from supervisor.logs import get_logger

log = get_logger(component="hub")


class Hub:
    """The ROUTER agents connect to."""

    def __init__(
        self,
        run_dir: str,
        *,
        token_for: Callable[[bytes], bytes | None],
        on_frame: Callable[[bytes, int, int, object], None],
        on_drop: Callable[[bytes, str], None] | None = None,
        max_frame_bytes: int = 16 * 1024 * 1024,
    ):
        self.path = os.path.join(run_dir, "agents.sock")
        self.endpoint = f"ipc://{self.path}"
        self.token_for = token_for
        self.on_frame = on_frame
        self.on_drop = on_drop
        self.max_frame_bytes = max_frame_bytes
        self.dropped = 0
        self.peers: dict[bytes, AgentConnection] = {}
        self._anonymous = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen on the ipc socket (only the owner may connect: 0600 in a 0700 run dir)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: AgentConnection(self), self.path)
        os.chmod(self.path, 0o600)

    def send(self, routing_id: bytes, frame: bytes) -> bool:
        """Send one frame to an agent; False if it is not connected."""
        peer = self.peers.get(routing_id)
        if peer is None:
            return False
        peer.transport.write(zmtp.frame(frame))
        return True

    def dispatch(self, rid: bytes, parts: list[bytes]) -> None:
        """Authenticate one message from an agent and hand it on."""
        if len(parts) != 1:
            self.drop(rid, "malformed frame")
            return
        try:
            kind, token, req, body = p.unpack(parts[0])
        except (ValueError, TypeError):
            self.drop(rid, "undecodable frame")
            return
        expected = self.token_for(rid)
        if expected is None or token != expected:
            self.drop(rid, "spawn token does not match routing id")
            return
        self.on_frame(rid, kind, req, body)

    def drop(self, rid: bytes, why: str) -> None:
        """Count and log a dropped frame (the first few per burst: a flood must not flood the log)."""
        self.dropped += 1
        if self.on_drop is not None:
            self.on_drop(rid, why)
        if self.dropped <= 100 or self.dropped % 1000 == 0:
            log.warning("frame_dropped", routing_id=rid[:128].decode("utf-8", "replace"), reason=why, dropped=self.dropped)

    def register(self, peer: "AgentConnection", rid: bytes) -> bool:
        """Route to a peer by the id it announced; refuse a second one under an id in use."""
        if not rid:
            rid = b"\x00anonymous-%d" % next(self._anonymous)  # as libzmq names a peer without one
        if rid in self.peers:
            log.warning("duplicate_routing_id_refused", routing_id=rid[:128].decode("utf-8", "replace"))
            return False
        peer.rid = rid
        self.peers[rid] = peer
        return True

    def unregister(self, peer: "AgentConnection") -> None:
        """Forget a peer whose connection closed."""
        if peer.rid is not None and self.peers.get(peer.rid) is peer:
            del self.peers[peer.rid]

    def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        for peer in list(self.peers.values()):
            peer.transport.abort()
        self.peers.clear()


class AgentConnection(asyncio.Protocol):
    """One agent's connection: the ZMTP handshake, then its messages to the hub."""

    def __init__(self, hub: Hub):
        self.hub = hub
        self.reader = zmtp.Reader(hub.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.rid: bytes | None = None

    def connection_made(self, transport) -> None:
        """Greet at once: the agent does the same, so the handshake costs no round trip."""
        self.transport = transport
        transport.write(zmtp.GREETING + zmtp.ready(b"ROUTER"))

    def data_received(self, data: bytes) -> None:
        """Dispatch every whole message the read completed."""
        reader = self.reader
        try:
            for is_command, value in reader.feed(data):
                if is_command:
                    if not self._on_command(value):
                        return
                elif self.rid is None:
                    raise zmtp.ProtocolError("a message before READY")
                else:
                    self.hub.dispatch(self.rid, value)
        except zmtp.ProtocolError as exc:
            self._refuse(str(exc))
            return
        if reader.error is not None:
            self._refuse(reader.error)

    def _on_command(self, body: bytes) -> bool:
        """READY registers the peer under its routing id; PING is answered. False: connection refused."""
        name, data = zmtp.parse_command(body)
        if name == b"READY" and self.rid is None:
            props = zmtp.ready_properties(data, b"DEALER")
            if not self.hub.register(self, props.get(b"Identity", b"")):
                self.transport.abort()  # libzmq's ROUTER ignores such a peer; we hang up on it
                return False
        elif name == b"PING":
            self.transport.write(zmtp.pong(data))
        return True

    def _refuse(self, why: str) -> None:
        """Close a connection that broke the protocol (an oversize frame, garbage)."""
        self.hub.drop(self.rid or b"", why)
        self.transport.abort()

    def connection_lost(self, exc) -> None:
        """The agent exited or was refused."""
        self.hub.unregister(self)
