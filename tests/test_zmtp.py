"""The ZMTP transport: the codec, the agent's DEALER and the hub, and their interop with libzmq.

corral speaks ZeroMQ's wire protocol itself (no libzmq I/O threads on the hot path); these
tests hold it to real libzmq peers through pyzmq, both ways, over real ipc sockets. The hub
listens on nothing (each agent is given its connection at spawn), so a libzmq DEALER binds and
the hub's side connects to it: ZMTP does not care which side connected.
"""

import asyncio
import contextlib
import os
import signal
import socket

import msgpack
import pytest
import zmq

from corral.agent_proc import protocol as p
from corral.agent_proc import zmtp
from corral.agent_proc.agent import Agent
from corral.agent_proc.dealer import Dealer
from corral.agent_proc.main import AgentLoop, run_agent
from corral.supervisor.hub import Hub


def test_reader_reassembles_frames_split_anywhere():
    wire = (
        zmtp.GREETING
        + zmtp.ready(b"DEALER", b"abc")
        + zmtp.frame(b"short")
        + zmtp.frame(b"x" * 300)  # long form: 8-byte size
        + zmtp.frame(b"part1", zmtp.MORE)
        + zmtp.frame(b"part2")
        + zmtp.frame(b"")
    )
    expected = [
        (True, zmtp.ready(b"DEALER", b"abc")[2:]),
        (False, [b"short"]),
        (False, [b"x" * 300]),
        (False, [b"part1", b"part2"]),
        (False, [b""]),
    ]
    for step in (1, 2, 7, 63, 64, 65, len(wire)):
        reader, got = zmtp.Reader(1024), []
        for i in range(0, len(wire), step):
            got += reader.feed(wire[i:i + step])
        assert got == expected, step


def test_ready_properties_round_trip():
    name, data = zmtp.parse_command(zmtp.ready(b"DEALER", b"s1/ab")[2:])
    assert name == b"READY"
    assert zmtp.parse_properties(data) == {b"Socket-Type": b"DEALER", b"Identity": b"s1/ab"}


@pytest.mark.parametrize(
    "wire, why",
    [
        (b"GET / HTTP/1.1\r\n", "not a ZMTP peer"),
        (zmtp.GREETING[:10] + b"\x02\x00" + zmtp.GREETING[12:], "too old"),
        (zmtp.GREETING[:12] + b"CURVE".ljust(20, b"\0") + zmtp.GREETING[32:], "NULL"),
        (zmtp.GREETING + b"\x02" + (2048).to_bytes(8, "big"), "over the limit"),
        (zmtp.GREETING + b"\x06" + (10**6).to_bytes(8, "big"), "over the limit"),
        (zmtp.GREETING + zmtp.frame(b"x", zmtp.MORE) * zmtp.MAX_PARTS, "multipart"),
        (zmtp.GREETING + zmtp.frame(b"x" * 600, zmtp.MORE) * 2, "multipart"),
    ],
)
def test_reader_refuses_what_is_not_zmtp_3_null(wire, why):
    reader = zmtp.Reader(1024)
    assert reader.feed(wire) == [] and why in reader.error
    assert reader.feed(zmtp.frame(b"more")) == []  # nothing after a violation counts


def test_dealer_talks_to_a_libzmq_router(tmp_path):
    endpoint = f"ipc://{tmp_path}/router.sock"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.RCVTIMEO, 5000)
    router.bind(endpoint)
    dealer = Dealer.connect(endpoint, b"agent-1")
    try:
        dealer.send(b"hello")
        assert router.recv_multipart() == [b"agent-1", b"hello"]
        big = bytes(range(256)) * 4096  # 1 MiB: a long frame, read in many pieces
        router.send_multipart([b"agent-1", big])
        router.send_multipart([b"agent-1", b"small"])
        assert dealer.recv() == big
        assert dealer.recv() == b"small"
        dealer.send(big)
        assert router.recv_multipart() == [b"agent-1", big]
    finally:
        dealer.close()
        router.close(linger=0)
        ctx.term()


async def test_hub_talks_to_a_libzmq_dealer(tmp_path):
    frames, abuses = [], []
    got = asyncio.get_running_loop().create_future()

    def on_frame(rid, kind, req, body, size):
        frames.append((rid, kind, req, body))
        got.set_result(size)

    hub = Hub(on_frame=on_frame, on_abuse=lambda *a: abuses.append(a))
    endpoint = f"ipc://{tmp_path}/dealer.sock"
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, 10_000)
    dealer.setsockopt(zmq.HEARTBEAT_IVL, 50)  # libzmq PINGs (a short context): answered, never refused
    dealer.bind(endpoint)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(endpoint[len("ipc://"):])
    await hub.attach(b"s1/x", sock)
    try:
        hello = p.pack_ready(1)
        dealer.send(hello)
        assert await asyncio.wait_for(got, 10) == len(hello)
        assert frames == [(b"s1/x", p.READY, 0, {"pid": 1})]
        assert hub.send(b"s1/x", p.pack_request(p.MESSAGE, 7, "hi"))
        assert not hub.send(b"nobody", b"x")
        assert p.unpack_request(await asyncio.to_thread(dealer.recv)) == (p.MESSAGE, 7, "hi", 0)
        assert abuses == []
    finally:
        dealer.close(linger=0)
        ctx.term()
        hub.close()


async def _hub_peer(hub: Hub, rid: bytes) -> socket.socket:
    """The agent's end of a new hub connection, greeted and READY (as an agent's DEALER leaves it)."""
    sock = await hub.connect(rid)
    sock.sendall(zmtp.GREETING + zmtp.ready(b"DEALER", rid))
    return sock


def _recv_until_closed(sock: socket.socket) -> bytes:
    """Everything the hub writes until it hangs up."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(1 << 16):
            data += chunk
    return data


@pytest.mark.parametrize(
    "wire, reason, why",
    [
        (b"\x02" + (2048).to_bytes(8, "big"), "protocol_error", "frame of 2048 bytes is over the limit"),
        (zmtp.command(b"PING", b"\x00\x01" + b"c" * 17), "protocol_error", "17 bytes of context"),
        (zmtp.frame(b"") * 3000, "flood", "over 1000 frames a second"),
    ],
)
async def test_hub_cuts_an_agent_that_breaks_a_bound(wire, reason, why):
    abused = asyncio.get_running_loop().create_future()
    hub = Hub(on_frame=lambda *a: None, max_frame_bytes=1024, frame_rate=1000,
              on_abuse=lambda rid, reason, detail: abused.set_result((rid, reason, detail)))
    sock = await _hub_peer(hub, b"bad")
    try:
        sock.sendall(wire)
        rid, got_reason, detail = await asyncio.wait_for(abused, 10)
        assert (rid, got_reason) == (b"bad", reason) and why in detail
        await asyncio.to_thread(_recv_until_closed, sock)  # the hub hung up
        assert b"bad" not in hub.peers
    finally:
        sock.close()
        hub.close()


async def test_pongs_are_never_queued_without_backpressure():
    """An agent that PINGs and never reads cannot grow the supervisor: the hub stops reading it."""
    loop = asyncio.get_running_loop()
    paused = loop.create_future()
    hub = Hub(on_frame=lambda *a: None, on_pause=lambda rid: paused.done() or paused.set_result(rid))
    sock = await _hub_peer(hub, b"pinger")
    ping = zmtp.command(b"PING", b"\x00\x10" + b"c" * 16)
    pings = 400_000  # 10 MB of PINGs, ~9 MB of PONGs if the hub answered them all at once

    def flood():
        """Send every PING (blocks while the hub does not read)."""
        batch = ping * 10_000
        for _ in range(pings // 10_000):
            sock.sendall(batch)

    sender = asyncio.ensure_future(asyncio.to_thread(flood))
    try:
        assert await asyncio.wait_for(paused, 30) == b"pinger"
        peer = hub.peers[b"pinger"]
        # What waits to be written is the high-water mark plus the PONGs of one read, not 9 MB.
        queued = peer.transport.get_write_buffer_size()
        assert peer.reading_paused and queued < 1 << 20, queued
        assert not sender.done()  # the agent is the one left waiting
        # Once it reads, the hub reads again: every PING gets its PONG, none is lost.
        pong = zmtp.pong(ping[2:][5:])
        expected = zmtp.GREETING + zmtp.ready(b"ROUTER") + pong * pings
        received = bytearray()
        while len(received) < len(expected):
            received += await asyncio.to_thread(sock.recv, 1 << 20)
        await asyncio.wait_for(sender, 30)
        assert received == expected
    finally:
        sock.close()
        hub.close()


class _Streaming(Agent):
    def on_message(self, text):
        yield "first"
        yield "second"


class _InterruptingSocket:
    """Records frames; the first CHUNK's send is hit by a SIGINT, as a signal can land mid-write."""

    def __init__(self):
        self.frames = []

    def send(self, data: bytes) -> None:
        frame = p.unpack_reply(data)
        if frame[0] == p.CHUNK and len(self.frames) == 1:
            signal.raise_signal(signal.SIGINT)  # its handler runs inside this send
        self.frames.append(frame)


def test_an_interrupt_during_a_send_lets_the_frame_finish():
    sock = _InterruptingSocket()
    loop = AgentLoop(_Streaming, sock, session_id="s", tenant="t")
    previous = signal.signal(signal.SIGINT, loop._on_sigint)
    try:
        loop.handle(p.START, 1, {}, 0)
        loop.handle(p.MESSAGE, 2, "go", 0)
    finally:
        signal.signal(signal.SIGINT, previous)
    kinds = [(f[0], f[1]) for f in sock.frames]
    # The chunk that was being sent went out whole; the turn then ended as interrupted.
    assert kinds == [(p.DONE, 1), (p.CHUNK, 2), (p.FAIL, 2)]
    assert sock.frames[1][2] == "first" and sock.frames[2][2]["code"] == p.INTERRUPTED



def _fork_agent(conn: socket.socket, routing_id: bytes, other_end: socket.socket) -> int:
    """Run a real agent loop in a child process on ``conn``; return its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the agent process
        code = 1
        try:
            other_end.close()  # as the zygote's child holds no copy of the supervisor's end
            code = run_agent(_Streaming, session_id="s", tenant="t", conn=conn, routing_id=routing_id)
        finally:
            os._exit(code)
    conn.close()
    return pid


async def _exit_status(pid: int) -> int:
    """Wait (in a thread) for a forked agent to exit; SIGKILL it if the test fails first."""
    try:
        _, status = await asyncio.wait_for(asyncio.to_thread(os.waitpid, pid, 0), 30)
        return status
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


async def test_an_agent_exits_cleanly_when_the_hub_hangs_up():
    """Agents never reconnect: a closed hub connection ends the agent with exit code 0."""
    ready = asyncio.get_running_loop().create_future()
    hub = Hub(on_frame=lambda rid, kind, req, body, size: kind == p.READY and ready.set_result(body["pid"]))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = _fork_agent(theirs, b"s/1", ours)
    await hub.attach(b"s/1", ours)
    assert await asyncio.wait_for(ready, 10) == pid
    hub.close()
    status = await _exit_status(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("frame", [zmtp.frame(b"\xc1"), zmtp.frame(b"\x93"), b"\x02" + (1 << 40).to_bytes(8, "big")])
async def test_an_agent_exits_at_once_on_a_protocol_error(frame):
    """Garbage, a truncated frame body or an oversize frame from the supervisor's side ends the agent
    with its own exit code, instead of a session that hangs on a stream it can no longer parse."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = _fork_agent(theirs, b"s/2", ours)
    try:
        ours.sendall(zmtp.GREETING + zmtp.ready(b"ROUTER"))
        reader = zmtp.Reader(1 << 20)
        while not any(not is_command for is_command, _ in reader.feed(await asyncio.to_thread(ours.recv, 4096))):
            pass  # until its READY message
        ours.sendall(frame)
        status = await _exit_status(pid)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == p.PROTOCOL_ERROR_EXIT_CODE
    finally:
        ours.close()


@pytest.mark.parametrize("packed, layout", [
    (p.pack_request(p.START, 1, p.start_body([{"role": "user", "content": "hi"}], {"k": 1}), 2),
     [p.START, 1, {"history": [{"role": "user", "content": "hi"}], "metadata": {"k": 1}}, 2]),
    (p.pack_request(p.COMMAND, 4, p.command_body("facts", {"a": 1}), 0), [p.COMMAND, 4, {"command": "facts", "args": {"a": 1}}, 0]),
    (p.pack_shutdown(3), [p.SHUTDOWN, 0, None, 3]),
    (p.pack_ready(42), [p.READY, 0, {"pid": 42}]),
    (p.pack_chunk(5, "piece"), [p.CHUNK, 5, "piece"]),
    (p.pack_done(5, "whole", {"n": 1}), [p.DONE, 5, {"reply": "whole", "state": {"n": 1}}]),
    (p.pack_fail(5, p.INTERRUPTED, "stop"), [p.FAIL, 5, {"code": p.INTERRUPTED, "message": "stop"}]),
])
def test_each_frame_kind_has_the_documented_layout(packed, layout):
    """The wire bytes are the msgpack array the protocol documents, and the other side reads them back."""
    assert packed == msgpack.packb(layout, use_bin_type=True)
    unpack = p.unpack_request if len(layout) == 4 else p.unpack_reply
    assert tuple(unpack(packed)) == tuple(layout)


@pytest.mark.parametrize("data", [b"\xc1", msgpack.packb("abc"), msgpack.packb([p.CHUNK, 1]), msgpack.packb([p.DONE, 1, {}, 0])])
def test_a_broken_reply_frame_is_refused(data):
    """Garbage, a non-array, too few or too many items: the hub drops the frame (ValueError)."""
    with pytest.raises(ValueError):
        p.unpack_reply(data)
