"""The ZMTP transport: the codec, the agent's DEALER and the hub, and their interop with libzmq.

corral speaks ZeroMQ's wire protocol itself (no libzmq I/O threads on the hot path); these
tests hold it to real libzmq peers through pyzmq, both ways, over real ipc sockets.
"""

import asyncio
import contextlib
import os
import signal

import pytest
import zmq

from agent_proc import protocol as p
from agent_proc import zmtp
from agent_proc.agent import Agent
from agent_proc.dealer import Dealer
from agent_proc.main import AgentLoop, run_agent
from supervisor.hub import Hub


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
    dealer = Dealer(endpoint, b"agent-1")
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
    frames, drops = [], []
    got = asyncio.get_running_loop().create_future()

    def on_frame(rid, kind, req, body):
        frames.append((rid, kind, req, body))
        got.set_result(None)

    hub = Hub(str(tmp_path), token_for={b"s1/x": b"t" * 16}.get, on_frame=on_frame,
              on_drop=lambda rid, why: drops.append((rid, why)))
    await hub.start()
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, b"s1/x")
    dealer.setsockopt(zmq.RCVTIMEO, 10_000)
    dealer.connect(hub.endpoint)
    try:
        dealer.send(p.pack([p.READY, b"t" * 16, 0, {"pid": 1}]))
        await asyncio.wait_for(got, 10)
        assert frames == [(b"s1/x", p.READY, 0, {"pid": 1})] and drops == []
        assert hub.send(b"s1/x", p.pack([p.MESSAGE, 7, "hi", 0]))
        assert not hub.send(b"nobody", b"x")
        assert p.unpack(await asyncio.to_thread(dealer.recv)) == [p.MESSAGE, 7, "hi", 0]
    finally:
        dealer.close(linger=0)
        ctx.term()
        hub.close()


async def test_hub_refuses_a_second_peer_under_a_routing_id_in_use(tmp_path):
    dropped = asyncio.get_running_loop().create_future()
    hub = Hub(str(tmp_path), token_for=lambda rid: None, on_frame=lambda *a: None,
              on_drop=lambda rid, why: dropped.done() or dropped.set_result(rid))
    await hub.start()
    first = await asyncio.to_thread(Dealer, hub.endpoint, b"taken")
    second = await asyncio.to_thread(Dealer, hub.endpoint, b"taken")
    try:
        first.send(b"")  # READY, then a message the hub drops: by then the first peer holds the id
        assert await asyncio.wait_for(dropped, 10) == b"taken"
        owner = hub.peers[b"taken"]
        second.send(b"")
        with pytest.raises(EOFError):  # the hub hangs up on the squatter
            await asyncio.to_thread(second.recv)
        assert hub.peers[b"taken"] is owner
    finally:
        first.close()
        second.close()
        hub.close()


async def test_hub_hangs_up_on_an_oversize_frame(tmp_path):
    drops = []
    hub = Hub(str(tmp_path), token_for=lambda rid: None, on_frame=lambda *a: None,
              on_drop=lambda rid, why: drops.append((rid, why)), max_frame_bytes=1024)
    await hub.start()
    dealer = await asyncio.to_thread(Dealer, hub.endpoint, b"big")
    try:
        dealer.send(b"x" * 2048)
        with pytest.raises((EOFError, ConnectionResetError)):
            await asyncio.to_thread(dealer.recv)
        assert drops == [(b"big", "frame of 2048 bytes is over the limit")]
        assert not hub.peers  # connection_lost ran before the thread's answer reached the loop
    finally:
        dealer.close()
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
        frame = p.unpack(data)
        if frame[0] == p.CHUNK and len(self.frames) == 1:
            signal.raise_signal(signal.SIGINT)  # its handler runs inside this send
        self.frames.append(frame)


def test_an_interrupt_during_a_send_lets_the_frame_finish():
    sock = _InterruptingSocket()
    loop = AgentLoop(_Streaming, sock, session_id="s", tenant="t", token=b"k")
    previous = signal.signal(signal.SIGINT, loop._on_sigint)
    try:
        loop.handle(p.START, 1, {}, 0)
        loop.handle(p.MESSAGE, 2, "go", 0)
    finally:
        signal.signal(signal.SIGINT, previous)
    kinds = [(f[0], f[2]) for f in sock.frames]
    # The chunk that was being sent went out whole; the turn then ended as interrupted.
    assert kinds == [(p.DONE, 1), (p.CHUNK, 2), (p.FAIL, 2)]
    assert sock.frames[1][3] == "first" and sock.frames[2][3]["code"] == p.INTERRUPTED



async def test_an_agent_exits_cleanly_when_the_hub_hangs_up(tmp_path):
    """Agents never reconnect: a closed hub connection ends the agent with exit code 0."""
    ready = asyncio.get_running_loop().create_future()
    hub = Hub(str(tmp_path), token_for={b"s/1": b"k" * 16}.get,
              on_frame=lambda rid, kind, req, body: kind == p.READY and ready.set_result(body["pid"]))
    await hub.start()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the agent process
        code = 1
        try:
            code = run_agent(_Streaming, session_id="s", tenant="t", token=b"k" * 16,
                             endpoint=hub.endpoint, routing_id=b"s/1")
        finally:
            os._exit(code)
    try:
        assert await asyncio.wait_for(ready, 10) == pid
        hub.close()
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
