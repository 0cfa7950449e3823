"""ZeroMQ's wire protocol, the part corral speaks: ZMTP 3.0 with the NULL mechanism.

The supervisor's ROUTER and every agent's DEALER exchange ZMTP over one Unix stream socket
(the ``ipc://`` endpoint libzmq uses), read and written directly by the process that owns it.
libzmq would put an I/O thread on each side and hand every frame across it; on a warm turn
those hand-offs cost more than everything else the agent does (docs/benchmarks.md). Any libzmq
DEALER can still connect to the hub, and the hub and the agent client are tested against
pyzmq sockets, so the wire stays ZeroMQ.

Wire format (rfc.zeromq.org/spec/23): a 64-byte greeting from each side, one READY command
from each side carrying ``Socket-Type`` (and the DEALER's ``Identity``, its routing id), then
frames: a flags byte (MORE, LONG, COMMAND), a 1-byte or 8-byte big-endian size, the body.
"""

import struct

MORE, LONG, COMMAND = 0x01, 0x02, 0x04
GREETING = (
    b"\xff" + bytes(7) + b"\x01\x7f"  # signature
    + b"\x03\x00"  # version 3.0
    + b"NULL".ljust(20, b"\x00")  # mechanism
    + b"\x00"  # as-server: unused by NULL
    + bytes(31)  # filler
)
_LONG_SIZE = struct.Struct(">Q")
# A command this large is not a READY or PING any peer of ours sends.
MAX_COMMAND_BYTES = 64 * 1024
# Frames in one multipart message: corral's peers send one; a peer must not grow one without end.
MAX_PARTS = 64


class ProtocolError(ValueError):
    """The peer broke ZMTP (bad greeting, oversize frame, message before READY)."""


def frame(body: bytes, flags: int = 0) -> bytes:
    """One frame on the wire: flags, size, body."""
    size = len(body)
    if size < 256:
        return bytes((flags, size)) + body
    return bytes((flags | LONG,)) + _LONG_SIZE.pack(size) + body


def command(name: bytes, data: bytes = b"") -> bytes:
    """One command frame."""
    return frame(bytes((len(name),)) + name + data, COMMAND)


def ready(socket_type: bytes, identity: bytes | None = None) -> bytes:
    """The READY command announcing this side's socket type (and routing id)."""
    props = [(b"Socket-Type", socket_type)]
    if identity is not None:
        props.append((b"Identity", identity))
    return command(b"READY", b"".join(bytes((len(k),)) + k + len(v).to_bytes(4, "big") + v for k, v in props))


def parse_command(body: bytes) -> tuple[bytes, bytes]:
    """Split a command frame's body into its name and data."""
    if not body or len(body) < 1 + body[0]:
        raise ProtocolError("truncated command")
    end = 1 + body[0]
    return bytes(body[1:end]), bytes(body[end:])


def parse_properties(data: bytes) -> dict[bytes, bytes]:
    """The metadata of a READY command."""
    props, pos = {}, 0
    while pos < len(data):
        name_end = pos + 1 + data[pos]
        if name_end + 4 > len(data):
            raise ProtocolError("truncated READY property")
        value_end = name_end + 4 + int.from_bytes(data[name_end:name_end + 4], "big")
        if value_end > len(data):
            raise ProtocolError("truncated READY property")
        props[bytes(data[pos + 1:name_end])] = bytes(data[name_end + 4:value_end])
        pos = value_end
    return props


def ready_properties(data: bytes, expected_type: bytes) -> dict[bytes, bytes]:
    """The metadata of a peer's READY; ProtocolError unless it is the socket type this side talks to."""
    props = parse_properties(data)
    if props.get(b"Socket-Type") != expected_type:
        raise ProtocolError(f"the peer is a {props.get(b'Socket-Type')!r} socket, not {expected_type.decode()}")
    return props


def pong(ping_data: bytes) -> bytes:
    """The answer to a ZMTP 3.1 heartbeat PING: PONG with the ping's context."""
    return command(b"PONG", ping_data[2:] if len(ping_data) >= 2 else b"")


class Reader:
    """Turns the bytes of one connection into messages and commands, however they are split.

    ``feed`` returns ``(True, body)`` for each command and ``(False, parts)`` for each whole
    message (a list of frame bodies: one for every message corral's own peers send). It never
    raises: once the peer breaks the protocol, ``error`` says how (after what came before it).
    """

    def __init__(self, max_frame_bytes: int):
        self.max_frame_bytes = max_frame_bytes
        self.greeted = False
        self.error: str | None = None
        self._buf = bytearray()
        self._parts: list[bytes] = []

    @property
    def partial(self) -> bool:
        """Whether part of a frame is waiting for the rest."""
        return bool(self._buf)

    def feed(self, data) -> list[tuple[bool, object]]:
        """Consume newly read bytes; return what they completed."""
        out: list[tuple[bool, object]] = []
        if self.error is not None:
            return out
        try:
            self._feed(data, out)
        except ProtocolError as exc:
            self.error = str(exc)
        return out

    def _feed(self, data, out: list) -> None:
        """Take the greeting, then whole frames; keep the remainder for the next read."""
        if self._buf or not self.greeted:
            self._buf += data
            data = self._buf
            if not self.greeted:
                if len(data) < len(GREETING):
                    self._check_signature(data)
                    return
                self._check_greeting(data)
                del data[:len(GREETING)]
                self.greeted = True
        pos = self._parse(data, out)
        if data is self._buf:
            del self._buf[:pos]
        elif pos < len(data):
            self._buf += data[pos:]  # the rest of a frame comes with the next read

    def _parse(self, data, out: list) -> int:
        """Take every whole frame from ``data``; return where the first incomplete one starts."""
        pos, n = 0, len(data)
        while n - pos >= 2:
            flags = data[pos]
            if flags & LONG:
                if n - pos < 9:
                    break
                size, start = _LONG_SIZE.unpack_from(data, pos + 1)[0], pos + 9
            else:
                size, start = data[pos + 1], pos + 2
            if size > (MAX_COMMAND_BYTES if flags & COMMAND else self.max_frame_bytes):
                raise ProtocolError(f"frame of {size} bytes is over the limit")
            end = start + size
            if end > n:
                break
            body = bytes(data[start:end])
            pos = end
            if flags & COMMAND:
                out.append((True, body))
            elif flags & MORE:
                self._parts.append(body)
                if len(self._parts) >= MAX_PARTS or sum(map(len, self._parts)) > self.max_frame_bytes:
                    raise ProtocolError(f"a multipart message over {MAX_PARTS} frames or {self.max_frame_bytes} bytes")
            elif self._parts:
                self._parts.append(body)
                out.append((False, self._parts))
                self._parts = []
            else:
                out.append((False, [body]))
        return pos

    @staticmethod
    def _check_signature(data) -> None:
        """Fail fast on a peer that is not speaking ZMTP at all."""
        if (len(data) >= 1 and data[0] != 0xFF) or (len(data) >= 10 and data[9] != 0x7F):
            raise ProtocolError("not a ZMTP peer")

    @classmethod
    def _check_greeting(cls, data) -> None:
        """Accept ZMTP 3.x with the NULL mechanism."""
        cls._check_signature(data)
        if data[10] < 3:
            raise ProtocolError(f"ZMTP version {data[10]}.{data[11]} is too old (3.0 needed)")
        if bytes(data[12:32]).rstrip(b"\x00") != b"NULL":
            raise ProtocolError("only the NULL security mechanism is spoken")
