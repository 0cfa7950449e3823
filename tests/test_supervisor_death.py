"""Supervisor death: SIGKILL of ``corral serve`` under load leaves no agent or zygote alive, the next
start serves every session with its history; SIGTERM drains the turns in flight, then exits 0.
"""

import asyncio
import signal
import socket
import time
import uuid

import psutil
import pytest

from corral.supervisor import errors, states
from corral.supervisor.store import create_store
from tests.chaos_kit import agent_pids, call, client_session
from tests.conftest import wait_for_state
from tests.procs import descendants, start_server, wait_gone

SESSIONS = 24
STOP_TIMEOUT = 10.0


async def test_sigkill_under_load_then_restart_then_sigterm_drain(tmp_path):
    args = ("--agent", "tests.agents.hostile:SlowAgent", "--stop-timeout", str(STOP_TIMEOUT), "--rate-limit", "0")
    # a prefix of this run's own (titles show 12 characters), so a run in another checkout is not counted
    prefix = f"death{uuid.uuid4().hex[:6]}-"
    ids = [f"{prefix}{i}" for i in range(SESSIONS)]
    proc, url = await asyncio.to_thread(start_server, tmp_path, *args)
    acked: dict[str, list[tuple[str, str]]] = {sid: [] for sid in ids}
    async with client_session() as http:
        for sid in ids:
            status, _ = await call(http, "POST", url + "/api/chat", json={"message": f"my name is {sid}", "session_id": sid})
            assert status == 200
        children = descendants(proc.pid)
        assert len(agent_pids(prefix)) == SESSIONS

        stop_load, flowing = asyncio.Event(), asyncio.Event()

        async def load(worker: int):
            """Chat until the server is gone; remember every acknowledged exchange."""
            n = 0
            while not stop_load.is_set():
                sid = ids[(worker + n) % SESSIONS]
                n += 1
                text = f"load {worker}.{n}"
                try:
                    status, body = await call(http, "POST", url + "/api/chat", json={"message": text, "session_id": sid})
                except Exception:  # noqa: BLE001 - the server is being killed under us
                    return
                if status == 200:
                    acked[sid].append((text, body["reply"]))
                    if sum(map(len, acked.values())) >= 200:
                        flowing.set()

        loaders = [asyncio.ensure_future(load(w)) for w in range(16)]
        await asyncio.wait_for(flowing.wait(), 60)  # load is really flowing when the kill lands
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        left = await asyncio.to_thread(wait_gone, children, 2.0)
        gone_in = time.monotonic() - killed_at
        stop_load.set()
        await asyncio.gather(*loaders)
        proc.wait()
        assert left == [], f"still alive 2 s after the supervisor's SIGKILL: {left}"
        assert not agent_pids(prefix)
        print(f"sigkill: {sum(map(len, acked.values()))} exchanges acknowledged; every child gone in {gone_in:.2f}s")

        # The next start serves every session with its history. Its agents signal the test through a
        # socket under the test's 0700 temp dir, which sandboxed agents (their own uids) cannot reach.
        proc, url = await asyncio.to_thread(start_server, tmp_path, *args, "--sandbox", "off")
        for sid in ids:
            status, body = await call(http, "POST", url + "/api/chat", json={"message": "what is my name?", "session_id": sid})
            assert (status, body.get("reply")) == (200, f"Your name is {sid}.")

        # SIGTERM with turns in flight: each gets its reply, then the server exits 0 within stop_timeout.
        path = str(tmp_path / "turns.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as began:
            began.bind(path)
            began.settimeout(30)
            slow = [asyncio.ensure_future(call(http, "POST", url + "/api/chat",
                                               json={"message": f"slow 2 {path}", "session_id": sid}))
                    for sid in ids[:6]]
            started = {await asyncio.to_thread(lambda: began.recv(256).decode()) for _ in slow}
        assert started == set(ids[:6])
        children = descendants(proc.pid)
        term_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        answers = await asyncio.gather(*slow)
        code = await asyncio.to_thread(proc.wait, STOP_TIMEOUT + 20)
        drained_in = time.monotonic() - term_at
    assert [(status, body.get("reply")) for status, body in answers] == [
        (200, f"slept 2 in {sid}") for sid in ids[:6]
    ]
    assert code == 0
    assert drained_in <= STOP_TIMEOUT + 5, drained_in
    assert await asyncio.to_thread(wait_gone, children, 2.0) == []
    print(f"sigterm: 6 turns in flight answered, exit 0 after {drained_in:.2f}s")

    # Every exchange acknowledged before the SIGKILL is in its session's history.
    store = create_store(None, tmp_path / "data")
    await store.open()
    try:
        for sid, exchanges in acked.items():
            contents = [(m.role, m.content) for m in await store.history(sid)]
            for text, reply in exchanges:
                assert ("user", text) in contents and ("assistant", reply) in contents, (sid, text)
    finally:
        await store.close()


async def test_an_agent_dead_before_its_spawn_is_registered_still_comes_down(make_supervisor):
    """The zygote's "spawned" and "exited" reports read in one batch must not lose the death."""
    sup = await make_supervisor()
    s = await sup.get_or_create("early-death", "default")
    first = asyncio.ensure_future(sup.chat(s, "hello"))
    await wait_for_state(sup, s, states.STARTING)
    while not sup.spawner._pending:  # the spawn request is on its way to the zygote (no event for it)
        await asyncio.sleep(0)
    # Block the loop (on purpose) until the child is forked, killed and reaped by the zygote, so both
    # reports wait in the pipe and are read together when the loop runs again.
    deadline = time.monotonic() + 30
    victim = None
    while victim is None and time.monotonic() < deadline:
        victim = next((c for c in psutil.Process(sup.spawner.pid).children()
                       if "sid=early-death" in " ".join(c.cmdline())), None)
    assert victim is not None, "the agent was never forked"
    victim.kill()
    gone = time.monotonic() + 30
    while psutil.pid_exists(victim.pid) and time.monotonic() < gone:  # until the zygote has reaped it
        time.sleep(0.001)
    with pytest.raises(errors.AgentDied):
        await asyncio.wait_for(first, 30)  # before the fix: stuck in starting forever
    assert s.state == states.CRASHED
    assert (await sup.chat(s, "again"))["reply"] == "You said: again"
