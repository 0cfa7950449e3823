"""Bytes both ways between an agent's connection and the far side, once the gateway has let it through.

The far side is a protocol of its own (``FarSide``): what it receives goes straight onto the
agent's transport from the loop's callback, with no coroutine per chunk; when the agent reads
slower than the far side sends, the far side's reading pauses until the agent's buffer drains. The
agent's side (a request body, a tunnel's client bytes: the small direction) is read as a stream.
"""
from __future__ import annotations

import asyncio
import contextlib

from corral.supervisor.egress import heads
from corral.supervisor.egress.grants import Grant

__all__ = ["FarSide", "connect", "splice", "CHUNK"]

CHUNK = 256 * 1024
HIGH_WATER = 256 * 1024  # bytes queued for the agent before the far side's reading pauses


class FarSide(asyncio.Protocol):
    """The connection to the destination: held until ``start``, then spliced onto the agent's writer."""

    def __init__(self, grant: Grant, agent: asyncio.StreamWriter):
        self.grant, self.agent = grant, agent
        self.transport: asyncio.Transport | None = None
        self.held: bytearray | None = bytearray()  # what arrived before start (None once started)
        self.head: bytearray | None = None  # a response head being read, to rewrite
        self.done = asyncio.get_running_loop().create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self.resuming: asyncio.Task | None = None

    def connection_made(self, transport) -> None:
        """Keep the transport."""
        self.transport = transport

    def start(self, *, rewrite_head: bool) -> None:
        """From now on pass what arrives to the agent (a response head first rewritten to close)."""
        held, self.held = self.held, None
        self.head = bytearray() if rewrite_head else None
        if held:
            self.data_received(bytes(held))

    def data_received(self, data: bytes) -> None:
        """Pass bytes to the agent; pause when the agent is behind."""
        if self.held is not None:
            self.held += data
            return
        if self.head is not None:
            data = self._rewritten(data)
            if not data:
                return
        self.agent.write(data)
        self.grant.count("bytes_in", len(data))
        if self.agent.transport.get_write_buffer_size() > HIGH_WATER and self.resuming is None:
            self.transport.pause_reading()
            self.resuming = asyncio.ensure_future(self._resume_when_drained())

    def _rewritten(self, data: bytes) -> bytes:
        """Collect the response head; once whole, it (rewritten) and what followed it."""
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > heads.HEAD_LIMIT:
                self.transport.abort()
            return b""
        whole, self.head = bytes(self.head), None
        return heads.close_response_head(whole[:end + 4]) + whole[end + 4:]

    async def _resume_when_drained(self) -> None:
        """Read again once the agent has taken what was queued for it."""
        try:
            await self.agent.drain()
        except ConnectionError:
            self.transport.abort()
            return
        finally:
            self.resuming = None
        self.transport.resume_reading()

    def pause_writing(self) -> None:
        """The destination is behind: the agent's bytes wait."""
        self.writable.clear()

    def resume_writing(self) -> None:
        """The destination caught up."""
        self.writable.set()

    def connection_lost(self, exc) -> None:
        """The destination is done (or gone): so is the splice."""
        self.writable.set()
        if not self.done.done():
            self.done.set_result(None)


async def connect(address: str, port: int, grant: Grant, agent: asyncio.StreamWriter, *, tls=None,
                  server_hostname=None) -> FarSide:
    """A connection to a checked address, its bytes held for the agent until ``start``."""
    loop = asyncio.get_running_loop()
    _, far = await loop.create_connection(lambda: FarSide(grant, agent), address, port, ssl=tls,
                                          server_hostname=server_hostname)
    return far


async def splice(far: FarSide, reader: asyncio.StreamReader, *, rewrite_head: bool = False) -> None:
    """Bytes both ways until the destination is done or the agent hangs up."""
    outward = asyncio.ensure_future(_outward(reader, far))
    # The agent hung up (not a half-close: its side is gone): stop waiting on the far side too.
    outward.add_done_callback(lambda _: far.agent.transport.is_closing() and far.transport.abort())
    far.start(rewrite_head=rewrite_head)
    try:
        await far.done
    finally:
        outward.cancel()
        far.transport.abort()


async def _outward(reader: asyncio.StreamReader, far: FarSide) -> None:
    """The agent's bytes to the destination, counted; its EOF passed on where the transport can."""
    with contextlib.suppress(OSError):
        while data := await reader.read(CHUNK):
            far.transport.write(data)
            far.grant.count("bytes_out", len(data))
            await far.writable.wait()
        if far.transport.can_write_eof():
            far.transport.write_eof()
