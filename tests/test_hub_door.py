"""The hub has no door, and an agent's own connection is bounded (issue 12).

Real hostile agents (tests/agents/hostile.py) attack the only thing they can reach, their own
connection, while calm sessions chat beside them: every attack ends the attacker's session only,
``killed`` with the reason, and the calm sessions keep answering. Also: hung turns end, and a
history of any size restores.
"""

import asyncio
import json
import os
import stat

import psutil
import pytest

from corral.supervisor import errors, states
from corral.supervisor.registry import recent_history
from corral.supervisor.turns import UNRESPONSIVE
from tests.procs import wait_gone
from tests.test_hostile import CALM, calm_round, calm_sessions, expected

MIB = 1 << 20


def _listening_unix_inodes() -> set[int]:
    """Inodes of every listening Unix socket on the host (/proc/net/unix, flag __SO_ACCEPTCON)."""
    with open("/proc/net/unix") as f:
        next(f)
        return {int(cols[6]) for cols in map(str.split, f) if int(cols[3], 16) & 0x10000}


def _socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets a process holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


async def test_the_hub_has_no_door(make_supervisor):
    """No socket in the run dir, none listening in the supervisor or the zygote, none an agent finds."""
    # Unsandboxed: the sandbox would stop the search itself (no /proc, no run dir); this proves
    # there is no door even for an agent that may look everywhere.
    sup = await make_supervisor(agent="tests.agents.hostile:Flooder", sandbox="off")
    calm = await calm_sessions(sup)
    intruder = await sup.get_or_create("intruder", "evil")
    found = await sup.command(intruder, "find_doors", {"old_socket": os.path.join(sup.run_dir, "agents.sock")})
    sockets_in_run_dir = [
        os.path.join(root, name) for root, _, names in os.walk(sup.run_dir) for name in names
        if stat.S_ISSOCK(os.lstat(os.path.join(root, name)).st_mode)
    ]
    listening = _listening_unix_inodes()
    assert sockets_in_run_dir == []
    assert _socket_inodes(os.getpid()) & listening == set()
    assert _socket_inodes(sup.spawner.pid) & listening == set()
    # Other servers on this host may listen (keeping agents from those is the sandbox's part);
    # nothing it could open is this server's.
    run_parent = os.path.dirname(sup.run_dir)
    assert [path for path in found["reply"]["opened"] if path.startswith(run_parent)] == []
    # Each agent holds exactly its own connection: one socket, to the supervisor.
    assert len(_socket_inodes(intruder.pid)) == 1
    assert await calm_round(sup, calm, []) == expected(calm)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("empty", "flood"),  # 4.7 M empty frames in 8 s slowed every tenant 1000-fold, unpunished
        ("chunk", "flood"),  # well-formed frames of its own turn, faster than --agent-frame-rate
        ("big_ping", "protocol_error"),  # 64 KiB of PING context, echoed back: supervisor RSS 51 MiB -> 1.6 GiB
        # PINGs with 16 bytes of context, never reading the PONGs: the hub stops reading it, so it
        # blocks on its own socket, its turn times out, and it is ended as unresponsive.
        ("ping", UNRESPONSIVE),
    ],
)
async def test_a_flood_on_its_own_connection_kills_that_agent_only(make_supervisor, kind, reason):
    # The frame rate is charged as frames are read: under the default, so a machine too busy to read
    # the default's worth a second cannot hide the chunk flood. The PING case tests the PONG
    # backpressure alone: one 256 KiB read holds ~13,000 small PINGs, so a rate bound would sometimes
    # kill it as a flood before its socket fills (seen once in a full run).
    sup = await make_supervisor(agent="tests.agents.hostile:Flooder", request_timeout=3.0, stop_timeout=1.0,
                                agent_frame_rate=0 if kind == "ping" else 10_000)
    calm = await calm_sessions(sup)
    flooder = await sup.get_or_create("flooder", "evil")
    await sup.chat(flooder, "my name is Mallory")
    rss_before = psutil.Process().memory_info().rss
    flood = asyncio.ensure_future(sup.command(flooder, "raw_flood", {"kind": kind, "frames": 50_000_000}))
    replies = []

    async def chat_until_it_is_gone():
        while not flooder.life.exited.done():
            replies.extend(await calm_round(sup, calm, []))

    await asyncio.wait_for(chat_until_it_is_gone(), 60)  # a bound for the failure case, not a timing
    with pytest.raises(errors.TurnTimeout if reason == UNRESPONSIVE else errors.AgentDied) as info:
        await flood
    rss_growth = (psutil.Process().memory_info().rss - rss_before) / MIB
    print(json.dumps({"kind": kind, "exit": flooder.exit_description, "rss_growth_mib": round(rss_growth, 1),
                      "calm_rounds": len(replies) // CALM, "reads_paused": sup.counters["agent_reads_paused"]}))
    assert flooder.state == states.KILLED and flooder.end_reason == reason
    if reason == UNRESPONSIVE:
        assert sup.counters["agent_reads_paused"] >= 1 and sup.counters["agents_unresponsive"] == 1
    else:
        assert info.value.code == "session_ended" and reason in info.value.message
        assert sup.counters["agents_killed_for_abuse"] == 1
    assert rss_growth < 64
    assert replies == expected(calm) * (len(replies) // CALM)
    assert await calm_round(sup, calm, []) == expected(calm)
    # Killed is not failed: its next message brings it back, history restored.
    assert (await sup.chat(flooder, "what is my name?"))["reply"] == "Your name is Mallory."


async def test_a_silent_agent_ignoring_the_interrupt_is_ended_as_unresponsive(make_supervisor):
    """Past request_timeout the turn is interrupted; ignored, SIGTERM; ignored, SIGKILL at stop_timeout."""
    sup = await make_supervisor(agent="tests.agents.hostile:Unresponsive", request_timeout=1.0, stop_timeout=1.0)
    calm = await calm_sessions(sup)
    hung = await sup.get_or_create("hung", "evil")
    await sup.chat(hung, "my name is Sleepy")
    pid = hung.pid
    with pytest.raises(errors.TurnTimeout):
        await sup.chat(hung, "hang")
    assert await asyncio.wait_for(asyncio.shield(hung.life.exited), 30) == states.KILLED
    print(json.dumps({"exit": hung.exit_description, "end_reason": hung.end_reason}))
    assert hung.end_reason == UNRESPONSIVE and hung.exit_description == "killed by signal SIGKILL"
    assert sup.counters["agents_unresponsive"] == 1 and sup.live_by_tenant["evil"] == 0  # holds no quota
    assert wait_gone([pid], timeout=5) == []
    assert await calm_round(sup, calm, []) == expected(calm)
    assert (await sup.chat(hung, "what is my name?"))["reply"] == "Your name is Sleepy."


async def test_a_history_over_64_mib_restores(make_supervisor):
    """The newest history that fits the bounds goes to on_start; the START frame never hits the frame limit."""
    sup = await make_supervisor()
    s = await sup.get_or_create("long", "default")
    await sup.chat(s, "my name is Ancient")
    await sup.stop(s, states.ENDED)
    filler = "x" * (60 * 1024)
    for i in range(1150):  # ~67 MiB of stored messages
        await sup.store.append_message(s.id, "user" if i % 2 else "assistant", filler)
    await sup.store.append_message(s.id, "user", "my color is teal")
    assert (await sup.chat(s, "what is my color?"))["reply"] == "Your color is teal."
    # The oldest messages were dropped to fit --history-limit: the first fact is forgotten.
    assert (await sup.chat(s, "what is my name?"))["reply"] != "Your name is Ancient."
    assert s.state == states.IDLE and len(s.restarts) == 0


def test_recent_history_keeps_the_newest_that_fit():
    class Msg:
        def __init__(self, n):
            self.role, self.content = "user", "é" * n  # two bytes each: the bound is in bytes

    history = [Msg(10), Msg(20), Msg(30)]
    assert [len(m["content"]) for m in recent_history(history, 100)] == [20, 30]
    assert [len(m["content"]) for m in recent_history(history, 120)] == [10, 20, 30]
    assert recent_history(history, 59) == []
