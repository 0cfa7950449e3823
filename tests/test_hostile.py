"""Hostile agents are contained: a flooder is killed, spoofed frames dropped, children die with
their agent, and an agent that ignores SIGTERM is SIGKILLed at stop_timeout. Others do not notice.
(Attacks on the connection itself, hung turns and huge histories: tests/test_hub_door.py.)
"""

import asyncio
import json
import os
import time

import psutil
import pytest

from corral.supervisor import errors, states
from corral.supervisor.turns import STRAY_FRAME_LIMIT, STRAY_FRAMES
from tests.chaos_kit import latency_summary
from tests.conftest import wait_for_state
from tests.procs import wait_gone

CALM = 8
ROUNDS = 10


async def calm_round(sup, sessions, samples) -> list[str]:
    """One message to each calm session at once; latencies into samples; return the replies."""

    async def one(s):
        started = time.monotonic()
        result = await sup.chat(s, f"still here {s.id}")
        samples.append(time.monotonic() - started)
        return result["reply"]

    return await asyncio.gather(*(one(s) for s in sessions))


async def calm_sessions(sup) -> list:
    """CALM well-behaved sessions, started."""
    sessions = [await sup.get_or_create(f"calm-{i}", "calm") for i in range(CALM)]
    await calm_round(sup, sessions, [])
    return sessions


async def rounds_while(sup, sessions, task) -> tuple[list[str], list[float]]:
    """Chat rounds with the calm sessions until ``task`` is done (at least ROUNDS)."""
    replies, samples, n = [], [], 0
    while n < ROUNDS or not task.done():
        replies += await calm_round(sup, sessions, samples)
        n += 1
    return replies, samples


def expected(sessions) -> list[str]:
    """What the calm sessions answer in rounds."""
    return [f"You said: still here {s.id}" for s in sessions]


async def test_a_flooding_agent_is_killed_and_the_others_keep_answering(make_supervisor):
    sup = await make_supervisor(agent="tests.agents.hostile:Flooder")
    calm = await calm_sessions(sup)
    flooder = await sup.get_or_create("flooder", "evil")
    await sup.chat(flooder, "hello")
    _, before = await rounds_while(sup, calm, _done())
    rss_before = psutil.Process().memory_info().rss
    started = time.monotonic()
    flood = asyncio.ensure_future(sup.command(flooder, "flood", {"frames": 200_000, "bytes": 256}))
    replies, during = await rounds_while(sup, calm, flood)
    with pytest.raises(errors.AgentDied) as info:  # killed as hostile, long before its 200,000 frames
        await flood
    figures = {"before": latency_summary(before), "during": latency_summary(during),
               "flood_seconds": round(time.monotonic() - started, 2), "stray": flooder.life.turns.stray_frames,
               "rss_growth_mib": round((psutil.Process().memory_info().rss - rss_before) / 2**20, 1)}
    print(json.dumps(figures))
    assert info.value.code == "session_ended" and flooder.state == states.KILLED
    assert flooder.end_reason == STRAY_FRAMES
    assert flooder.exit_description == f"killed after {STRAY_FRAME_LIMIT} frames for turns it was not given"
    assert sup.counters["agents_killed_for_abuse"] == 1
    assert replies == expected(calm) * (len(replies) // CALM)  # every calm message answered, correctly
    assert figures["stray"] == STRAY_FRAME_LIMIT
    assert (await sup.chat(flooder, "and now?"))["reply"] == "You said: and now?"  # respawned, pairs up
    # Killed at STRAY_FRAME_LIMIT, under the hub's per-agent high-water mark: little was queued.
    assert figures["rss_growth_mib"] < 128


def _done():
    """A finished future (for a phase that runs just ROUNDS rounds)."""
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(None)
    return fut


async def test_frames_for_another_sessions_turns_are_dropped_and_the_victim_is_unaffected(make_supervisor):
    """An agent has one connection, bound to its session at spawn: it cannot answer in another's name."""
    sup = await make_supervisor(agent="tests.agents.hostile:Flooder")
    victim = await sup.get_or_create("victim", "alice")
    spoofer = await sup.get_or_create("spoofer", "mallory")
    await sup.chat(victim, "my name is Alice")
    await sup.chat(spoofer, "hello")
    # The victim has a turn in flight; the spoofer answers it and the 100 request ids before it
    # (not the ids after: its own command's id is among those).
    pending = asyncio.ensure_future(sup.command(victim, "sleep", {"seconds": 1}))
    await wait_for_state(sup, victim, states.BUSY)
    req = max(victim.life.turns.pending)
    low, high = max(0, req - 100), req + 1
    spoof = await sup.command(spoofer, "spoof", {"low": low, "high": high})
    assert (await pending)["reply"] == {"slept": 1}  # the real answer, not a spoofed one
    assert (await sup.chat(victim, "what is my name?"))["reply"] == "Your name is Alice."
    # Its own connection's frames are in order: by its DONE, every spoofed frame was taken as stray.
    assert spoof["reply"]["sent"] == high - low == spoofer.life.turns.stray_frames
    print(json.dumps({"spoofed_frames": spoof["reply"]["sent"], "stray": spoofer.life.turns.stray_frames}))


async def test_children_die_with_their_agent(make_supervisor):
    sup = await make_supervisor(agent="tests.agents.hostile:Forker")
    bystander = await sup.get_or_create("bystander", "calm")
    await sup.chat(bystander, "hello")
    escapes = sup.limiter.describe()["mechanism"] in ("cgroup1", "cgroup2")  # only a cgroup finds a setsid child
    for ending in ("crash", "kill", "remove"):
        s = await sup.get_or_create(f"forker-{ending}", "evil")
        await sup.command(s, "fork", {"n": 2, "escape": escapes})
        # host pids: the ones the agent sees are in its pid namespace when the sandbox gives it one
        pids = [c.pid for c in psutil.Process(s.pid).children(recursive=True)]
        assert len(pids) == 4 and all(psutil.pid_exists(pid) for pid in pids)
        if ending == "crash":
            with pytest.raises(errors.AgentDied):
                await sup.command(s, "crash", {"how": "exit"})
        elif ending == "kill":
            await sup.kill(s)
        else:
            await sup.remove(s)
        assert wait_gone(pids, timeout=5) == [], f"{ending}: children outlived their agent"
    assert (await sup.chat(bystander, "still?"))["reply"] == "You said: still?"


async def test_an_agent_ignoring_sigterm_is_killed_at_stop_timeout(make_supervisor):
    sup = await make_supervisor(agent="tests.agents.hostile:StubbornAgent", stop_timeout=1.0)
    bystander = await sup.get_or_create("bystander", "calm")
    stubborn = await sup.get_or_create("stubborn", "evil")
    await sup.chat(bystander, "hello")
    await sup.chat(stubborn, "hello")
    pid = stubborn.pid
    started = time.monotonic()
    final = await sup.stop(stubborn, states.ENDED)
    took = time.monotonic() - started
    print(json.dumps({"stop_seconds": round(took, 3), "exit": stubborn.exit_description}))
    assert final == states.ENDED and stubborn.exit_description == "killed by signal SIGKILL"
    assert 0.9 <= took <= 1.0 + 5  # the SIGKILL rung of the ladder, not before, not long after
    assert wait_gone([pid], timeout=2) == []
    assert (await sup.chat(bystander, "still?"))["reply"] == "You said: still?"
    assert bystander.pid is not None and os.getpgid(bystander.pid) == bystander.pid


async def test_a_snapshot_past_the_bound_is_a_bad_reply_and_the_supervisor_keeps_none_of_it(make_supervisor):
    sup = await make_supervisor(agent="tests.agents.hostile:SnapshotHog")
    hogs = [await sup.get_or_create(f"hog-{i}", "evil") for i in range(3)]
    for hog in hogs:
        await sup.chat(hog, "my name is Hog")
        pid = hog.pid
        with pytest.raises(errors.AgentBadReply) as refused:
            await sup.command(hog, "bloat", {"mib": 15})
        assert refused.value.status == 502 and "over the 65536-byte bound" in refused.value.message
        assert hog.pid == pid and hog.state == states.IDLE  # the agent lives
        assert len(json.dumps(hog.agent_state)) < sup.config.max_snapshot_bytes  # the last state within it is kept
    assert (await sup.command(hogs[0], "bloat", {"mib": 0}))["status"] == "done"  # the next turn is fine
    assert (await sup.chat(hogs[0], "what is my name?"))["reply"] == "Your name is Hog."
    assert hogs[0].agent_state["ballast"] == ""
