"""The agent's end of the hub: a blocking ZMTP DEALER on the connection it was given at spawn.

An agent serves one message at a time, so a blocking socket read in the main thread is all it
needs: no I/O thread, no context, no poller. Idle, it sits in ``recv`` and costs nothing.
"""

import socket
from collections import deque

from corral.agent_proc import zmtp

# Between frames an agent reads a page at most: a 64 KiB buffer per read would leave 64 KiB of the
# heap written in every idle agent. A frame in progress (a long START) is read in big gulps.
_IDLE_READ_SIZE = 4 * 1024
_READ_SIZE = 64 * 1024
# The largest frame an agent takes from the supervisor (a START with its bounded history is the largest).
MAX_FRAME_BYTES = 64 * 1024 * 1024


class Dealer:
    """A connected DEALER: ``send`` and ``recv`` whole single-frame messages."""

    def __init__(self, sock: socket.socket, routing_id: bytes, *, max_frame_bytes: int = MAX_FRAME_BYTES):
        self.sock = sock
        self._reader = zmtp.Reader(max_frame_bytes)
        self._inbox: deque[bytes] = deque()
        self._peer_ready = False
        # libzmq hangs up on a peer whose handshake arrives before its own greeting has gone out,
        # so greet and wait for the answering greeting; READY then goes out with the first message.
        self.sock.sendall(zmtp.GREETING)
        while not self._reader.greeted:
            self._read()
        self._hello = zmtp.ready(b"DEALER", routing_id)

    @classmethod
    def connect(cls, endpoint: str, routing_id: bytes, **kwargs) -> "Dealer":
        """A DEALER connected to a listening ``ipc://`` ROUTER (a libzmq one: corral's hub listens on nothing)."""
        if not endpoint.startswith("ipc://"):
            raise ValueError(f"a DEALER connects to an ipc:// endpoint, not {endpoint!r}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(endpoint[len("ipc://"):])
            return cls(sock, routing_id, **kwargs)
        except BaseException:
            sock.close()
            raise

    def send(self, payload: bytes) -> None:
        """Send one message (blocks only while the supervisor's buffer is full)."""
        data = zmtp.frame(payload)
        if self._hello:
            data, self._hello = self._hello + data, b""
        self.sock.sendall(data)

    def recv(self) -> bytes:
        """The next message; raises EOFError when the supervisor closes the connection."""
        while not self._inbox:
            self._read()
        return self._inbox.popleft()

    def _read(self) -> None:
        """Read once (blocking) and take in what it completed."""
        data = self.sock.recv(_READ_SIZE if self._reader.partial else _IDLE_READ_SIZE)
        if not data:
            raise EOFError("the supervisor closed the connection")
        for is_command, value in self._reader.feed(data):
            if is_command:
                self._on_command(value)
            elif not self._peer_ready:
                raise zmtp.ProtocolError("a message before the hub's READY")
            elif len(value) == 1:
                self._inbox.append(value[0])
            # a multipart message is not something the supervisor sends: skip it
        if self._reader.error is not None:
            raise zmtp.ProtocolError(self._reader.error)

    def _on_command(self, body: bytes) -> None:
        """Check the hub's READY; answer heartbeats."""
        name, data = zmtp.parse_command(body)
        if name == b"READY":
            zmtp.ready_properties(data, b"ROUTER")
            self._peer_ready = True
        elif name == b"PING":
            self.sock.sendall(zmtp.pong(data))

    def close(self) -> None:
        """Close the socket (what was sent is already in the supervisor's receive queue)."""
        self.sock.close()
