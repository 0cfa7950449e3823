"""The hub: the ROUTER side of every agent's connection, spoken natively on the asyncio loop.

ZMTP (ZeroMQ's wire protocol, ``agent_proc/zmtp.py``) over one Unix socket pair per agent,
each supervisor end an asyncio protocol: a frame is read and dispatched in the loop's own read
callback and written with one ``transport.write``, with no libzmq I/O thread to hand it across
(docs/benchmarks.md).

There is no door: the hub listens on nothing. ``connect`` makes a socket pair for an agent about
to be spawned and hands back the agent's end, which the zygote passes to the child; the
supervisor's end is bound to that spawn's routing id from the start. An agent can only speak on
its own connection, in its own session's name, so spawn tokens, anonymous peers, squatted routing
ids and connection floods are gone by construction.

Each connection is bounded (docs/limits.md): frames per second (a token bucket), the size of a
frame, PING context as the ZMTP spec allows (16 bytes), and PONGs are never queued without
backpressure: while the agent does not read what the hub writes, the hub stops reading it. An
agent that breaks a bound is reported through ``on_abuse`` and its connection is cut.
"""

import asyncio
import socket
import time
from collections.abc import Callable

from corral.agent_proc import protocol as p
from corral.agent_proc import zmtp
from corral.supervisor.logs import get_logger

log = get_logger(component="hub")

# ZMTP 3.1: PING is a 2-byte TTL and at most 16 bytes of context.
MAX_PING_CONTEXT = 16
# Reasons on_abuse reports.
FLOOD, PROTOCOL_ERROR = "flood", "protocol_error"


class Hub:
    """The ROUTER agents are connected to at spawn."""

    def __init__(
        self,
        *,
        on_frame: Callable[[bytes, int, int, object, int], None],
        on_drop: Callable[[bytes, str], None] | None = None,
        on_abuse: Callable[[bytes, str, str], None] | None = None,
        on_pause: Callable[[bytes], None] | None = None,
        max_frame_bytes: int = 16 * 1024 * 1024,
        frame_rate: float = 0,
    ):
        self.on_frame = on_frame
        self.on_drop = on_drop
        self.on_abuse = on_abuse
        self.on_pause = on_pause  # an agent's reads were paused: it sends PINGs and reads no PONGs
        self.max_frame_bytes = max_frame_bytes
        self.frame_rate = frame_rate  # frames a second per connection (and the burst); 0 = no bound
        self.dropped = 0
        self.peers: dict[bytes, AgentConnection] = {}

    async def connect(self, rid: bytes) -> socket.socket:
        """A new connection for the agent about to be spawned under ``rid``; return the agent's end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self.attach(rid, ours)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        return theirs

    async def attach(self, rid: bytes, sock: socket.socket) -> None:
        """Speak ROUTER on a connected stream socket, to the agent of ``rid`` (tests attach libzmq peers)."""
        await asyncio.get_running_loop().connect_accepted_socket(lambda: AgentConnection(self, rid), sock)

    def disconnect(self, rid: bytes) -> None:
        """Cut the connection of a spawn that is over (its process is gone or never came)."""
        peer = self.peers.pop(rid, None)
        if peer is not None:
            peer.cut()

    def send(self, routing_id: bytes, frame: bytes) -> bool:
        """Send one frame to an agent; False if it is not connected."""
        peer = self.peers.get(routing_id)
        if peer is None:
            return False
        peer.transport.write(zmtp.frame(frame))
        return True

    def dispatch(self, rid: bytes, parts: list[bytes]) -> None:
        """Decode one message from an agent and hand it on."""
        if len(parts) != 1:
            self.drop(rid, "malformed frame")
            return
        try:
            kind, req, body = p.unpack_reply(parts[0])
        except (ValueError, TypeError):
            self.drop(rid, "undecodable frame")
            return
        self.on_frame(rid, kind, req, body, len(parts[0]))

    def drop(self, rid: bytes, why: str) -> None:
        """Count and log a dropped frame (the first few per burst: a flood must not flood the log)."""
        self.dropped += 1
        if self.on_drop is not None:
            self.on_drop(rid, why)
        if self.dropped <= 100 or self.dropped % 1000 == 0:
            log.warning("frame_dropped", routing_id=rid[:128].decode("utf-8", "replace"), reason=why, dropped=self.dropped)

    def abuse(self, rid: bytes, reason: str, detail: str) -> None:
        """Report an agent that broke a bound of its connection (the connection is cut)."""
        log.warning("agent_connection_abused", routing_id=rid[:128].decode("utf-8", "replace"), reason=reason, detail=detail)
        if self.on_abuse is not None:
            self.on_abuse(rid, reason, detail)

    def close(self) -> None:
        """Drop every connection."""
        for peer in list(self.peers.values()):
            peer.cut()
        self.peers.clear()


class AgentConnection(asyncio.Protocol):
    """One agent's connection, bound to its routing id: the ZMTP handshake, then its messages."""

    def __init__(self, hub: Hub, rid: bytes):
        self.hub = hub
        self.rid = rid
        self.reader = zmtp.Reader(hub.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.closed = False  # cut: what is left of the current read is not dispatched
        self.ready = False
        self.writing_paused = False  # our writes are piling up: the agent is not reading
        self.reading_paused = False  # ... and it sent a PING meanwhile, so we stopped reading it
        self.allowance = float(hub.frame_rate)
        self.stamp = time.monotonic()

    def connection_made(self, transport) -> None:
        """Greet at once: the agent does the same, so the handshake costs no round trip."""
        self.transport = transport
        old = self.hub.peers.get(self.rid)
        if old is not None:
            old.cut()
        self.hub.peers[self.rid] = self
        transport.write(zmtp.GREETING + zmtp.ready(b"ROUTER"))

    def data_received(self, data: bytes) -> None:
        """Dispatch every whole message the read completed, within the connection's bounds."""
        reader = self.reader
        items = reader.feed(data)
        if items and self.hub.frame_rate and not self._within_rate(len(items)):
            self._cut(FLOOD, f"over {self.hub.frame_rate:g} frames a second on its connection")
            return
        try:
            for is_command, value in items:
                if self.closed:
                    return
                if is_command:
                    self._on_command(value)
                elif not self.ready:
                    raise zmtp.ProtocolError("a message before READY")
                else:
                    self.hub.dispatch(self.rid, value)
        except zmtp.ProtocolError as exc:
            self._cut(PROTOCOL_ERROR, str(exc))
            return
        if reader.error is not None:
            self._cut(PROTOCOL_ERROR, reader.error)

    def _within_rate(self, frames: int) -> bool:
        """Take ``frames`` from the token bucket (refilled at frame_rate a second, capped at one second's worth)."""
        now = time.monotonic()
        rate = self.hub.frame_rate
        self.allowance = min(rate, self.allowance + (now - self.stamp) * rate) - frames
        self.stamp = now
        return self.allowance >= 0

    def _on_command(self, body: bytes) -> None:
        """READY completes the handshake; PING is answered, with backpressure."""
        name, data = zmtp.parse_command(body)
        if name == b"READY" and not self.ready:
            zmtp.ready_properties(data, b"DEALER")  # the Identity it announces changes nothing: we know who it is
            self.ready = True
        elif name == b"PING":
            if len(data) > 2 + MAX_PING_CONTEXT:
                raise zmtp.ProtocolError(f"a PING with {len(data) - 2} bytes of context (at most {MAX_PING_CONTEXT})")
            if self.writing_paused and not self.reading_paused:
                # It sends PINGs and does not read the PONGs: read nothing more until it does.
                self.reading_paused = True
                self.transport.pause_reading()
                if self.hub.on_pause is not None:
                    self.hub.on_pause(self.rid)
            self.transport.write(zmtp.pong(data))

    def pause_writing(self) -> None:
        """Our write buffer passed its high-water mark."""
        self.writing_paused = True

    def resume_writing(self) -> None:
        """The agent read what we wrote: read it again if a PING made us stop."""
        self.writing_paused = False
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def cut(self) -> None:
        """Hang up, dropping what is unread and unsent."""
        self.closed = True
        self.transport.abort()

    def _cut(self, reason: str, detail: str) -> None:
        """Hang up on an agent that broke a bound, and report it."""
        self.cut()
        self.hub.abuse(self.rid, reason, detail)

    def connection_lost(self, exc) -> None:
        """The agent exited, or its connection was cut."""
        if self.hub.peers.get(self.rid) is self:
            del self.hub.peers[self.rid]
