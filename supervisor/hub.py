"""The ZeroMQ hub: one ROUTER socket for every agent, on the asyncio loop without zmq.asyncio.

The socket's FD is edge-triggered, so each wake-up drains everything that is readable, in
bounded batches so one flooding agent cannot starve the loop. Frames whose spawn token does not
match their routing id are dropped: an agent cannot speak for another session.
"""

import asyncio
import os
from collections.abc import Callable

import zmq

from agent_proc import protocol as p
from supervisor.logs import get_logger

log = get_logger(component="hub")
_BATCH = 256
_NOBLOCK, _MORE_NOBLOCK = int(zmq.NOBLOCK), int(zmq.SNDMORE | zmq.NOBLOCK)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class Hub:
    """The ROUTER socket agents connect to."""

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
        self.dropped = 0
        self.ctx = zmq.Context(io_threads=1)
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a gone agent raises instead of vanishing
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)  # a peer sending more is disconnected
        self.sock.setsockopt(zmq.SNDHWM, 0)  # per-session mailboxes bound what we queue
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.bind(self.endpoint)
        os.chmod(self.path, 0o600)
        self._fd = self.sock.getsockopt(zmq.FD)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_scheduled = False

    def start(self) -> None:
        """Start reading on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._drain)

    def send(self, routing_id: bytes, frame: bytes) -> bool:
        """Send one frame to an agent; False if it is not connected."""
        sock = self.sock
        try:
            # Two plain sends with int flags: send_multipart's enum arithmetic costs more than the copy.
            sock.send(routing_id, _MORE_NOBLOCK)
            sock.send(frame, _NOBLOCK)
        except zmq.ZMQError:
            return False
        # A send can consume the edge that announced pending input; look again.
        if not self._drain_scheduled and sock.getsockopt(_EVENTS) & _POLLIN:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)
        return True

    def _drain(self) -> None:
        """Read up to a batch of frames; schedule the rest."""
        self._drain_scheduled = False
        sock = self.sock
        for _ in range(_BATCH):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return  # closed under us during shutdown
            self._dispatch(parts)
        if sock.getsockopt(_EVENTS) & _POLLIN:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _dispatch(self, parts: list[bytes]) -> None:
        """Authenticate one frame and hand it on."""
        if len(parts) != 2:
            self._drop(parts[0], "malformed frame")
            return
        rid, payload = parts
        try:
            kind, token, req, body = p.unpack(payload)
        except (ValueError, TypeError):
            self._drop(rid, "undecodable frame")
            return
        expected = self.token_for(rid)
        if expected is None or token != expected:
            self._drop(rid, "spawn token does not match routing id")
            return
        self.on_frame(rid, kind, req, body)

    def _drop(self, rid: bytes, why: str) -> None:
        """Count and log a dropped frame (the first few per burst: a flood must not flood the log)."""
        self.dropped += 1
        if self.on_drop is not None:
            self.on_drop(rid, why)
        if self.dropped <= 100 or self.dropped % 1000 == 0:
            log.warning("frame_dropped", routing_id=rid[:128].decode("utf-8", "replace"), reason=why, dropped=self.dropped)

    def close(self) -> None:
        """Stop reading and close the socket."""
        if self._loop is not None:
            try:
                self._loop.remove_reader(self._fd)
            except Exception:
                pass
        self.sock.close(linger=0)
        self.ctx.term()
