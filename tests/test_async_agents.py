"""Async agents in real agent processes: the event loop, cancellation, a blocked loop, reply shapes.

The behaviour both kinds share (streaming, snapshots, errors, interrupt, crash, OOM) is tested for
the sync and the async demo agent side by side in test_core, test_stream and test_api.
"""

import asyncio
import os

import psutil
import pytest

from corral.supervisor import errors, states
from tests.conftest import AgentSays

ASYNC_DEMO = "corral.agent_proc.demo:AsyncDemoAgent"
ANNOUNCING = "tests.core_agents:AnnouncingAsyncAgent"


def event_loops(pid: int) -> int:
    """How many epoll instances a process holds (an asyncio loop on Linux is one)."""
    fd_dir = f"/proc/{pid}/fd"
    return sum(os.readlink(os.path.join(fd_dir, fd)) == "anon_inode:[eventpoll]" for fd in os.listdir(fd_dir))


async def started(sup, session_id: str, command: str, args: dict):
    """Start a command turn and return it once the agent's hook has begun (it prints a marker)."""
    s = await sup.get_or_create(session_id, "default")
    await sup.chat(s, "my name is Ada")
    marker = f"began {os.urandom(4).hex()}"
    began = AgentSays(sup, marker)
    turn = asyncio.ensure_future(sup.command(s, command, {**args, "announce": marker}))
    await began.wait()
    return s, turn


async def interrupt_and_ask(sup, session_id: str, command: str) -> dict:
    """Start ``command``, interrupt it, and return the state the next message reports."""
    s, turn = await started(sup, session_id, command, {"seconds": 600})
    pid = s.pid
    assert sup.interrupt(s)
    assert (await asyncio.wait_for(turn, 10))["status"] == "interrupted"
    at_once = s.agent_state  # what the interrupted turn reported, before any other turn
    after = await sup.chat(s, "what is my name?")
    assert after["reply"] == "Your name is Ada." and s.pid == pid  # the process lives on
    assert at_once["cancelled"] == after["state"]["cancelled"]
    return after["state"]


async def test_an_interrupt_cancels_the_turns_task_and_the_agent_sees_it(make_supervisor):
    sup = await make_supervisor(agent=ANNOUNCING)
    state = await interrupt_and_ask(sup, "awaiting", "sleep")
    assert state["cancelled"] == 1  # the hook caught CancelledError (and re-raised it)


async def test_a_hook_blocking_the_loop_is_still_interruptible(make_supervisor):
    sup = await make_supervisor(agent=ANNOUNCING)
    assert (await interrupt_and_ask(sup, "blocking", "block"))["cancelled"] == 0
    # The loop still serves async turns afterwards: the next one awaits, and is cancelled.
    assert (await interrupt_and_ask(sup, "blocking", "sleep"))["cancelled"] == 1


async def test_a_hook_blocking_the_loop_is_killable(make_supervisor):
    sup = await make_supervisor(agent=ANNOUNCING)
    s, turn = await started(sup, "stuck", "block", {"seconds": 600})
    pid = s.pid
    assert await sup.kill(s) == states.KILLED
    with pytest.raises(errors.AgentDied):
        await asyncio.wait_for(turn, 10)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_every_reply_shape_streams_the_same(make_supervisor):
    sup = await make_supervisor(agent="tests.core_agents:AsyncShapes")
    s = await sup.get_or_create("shapes", "default")
    expected = {
        "plain": ("a plain reply", ["a plain reply"]),  # unstreamed: one chunk, as for a sync agent
        "list": ("a list reply", ["a ", "list ", "reply"]),
        "later": ("an async generator handed back", ["an ", "async ", "generator ", "handed ", "back"]),
        "three little words": ("three little words", ["three ", "little ", "words"]),
    }
    for text, (reply, chunks) in expected.items():
        seen = []
        result = await sup.chat(s, text, on_chunk=seen.append)
        assert (result["reply"], seen) == (reply, chunks), text


async def test_async_on_stop_runs_at_shutdown(make_supervisor, tmp_path):
    # unsandboxed: the hook proves it ran by writing a file, which the sandbox allows only in its own temp dir
    sup = await make_supervisor(agent="tests.core_agents:AsyncShapes", sandbox="off")
    stop_file = tmp_path / "stopped"
    s = await sup.get_or_create("stopper", "default", {"stop_file": str(stop_file)})
    await sup.chat(s, "hello")
    assert await sup.stop(s, states.ENDED) == states.ENDED
    assert stop_file.read_text() == "stopper"


@pytest.mark.parametrize("agent, loops", [("corral.agent_proc.demo:DemoAgent", 0), (ASYNC_DEMO, 1)])
async def test_only_an_async_agent_makes_an_event_loop_in_its_own_process(make_supervisor, agent, loops):
    sup = await make_supervisor(agent=agent)
    zygote_loops = event_loops(sup.spawner.pid)  # its own selector
    s = await sup.get_or_create("looped", "default")
    assert (await sup.chat(s, "hello"))["status"] == "done"
    assert event_loops(s.pid) == loops
    assert event_loops(sup.spawner.pid) == zygote_loops
