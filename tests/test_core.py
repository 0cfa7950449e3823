"""The core against real agent processes: isolation, reuse, crashes, OOM, reaping, restarts."""

import asyncio
import os

import psutil
import pytest

from corral.agent_proc.limits import LimitSpec
from corral.supervisor import errors, states
from tests.conftest import wait_for_state

CRASH_KINDS = ["exit", "signal", "exception"]


async def say(sup, session_id, text, tenant="default"):
    """Send one chat message and return the reply text."""
    s = await sup.get_or_create(session_id, tenant)
    result = await sup.chat(s, text)
    assert result["status"] == "done"
    return result["reply"]


async def test_two_sessions_are_isolated_processes(sup):
    assert await say(sup, "alice", "my name is Alice") == "Got it: your name is Alice."
    assert await say(sup, "bob", "my name is Bob") == "Got it: your name is Bob."
    assert await say(sup, "alice", "what is my name?") == "Your name is Alice."
    assert await say(sup, "bob", "what is my name?") == "Your name is Bob."
    alice, bob = sup.sessions["alice"], sup.sessions["bob"]
    assert alice.pid != bob.pid
    assert psutil.Process(alice.pid).ppid() == psutil.Process(bob.pid).ppid() == sup.spawner.pid


async def test_a_session_is_reused(sup):
    await say(sup, "one", "hello")
    pid = sup.sessions["one"].pid
    for _ in range(5):
        await say(sup, "one", "again")
    assert sup.sessions["one"].pid == pid
    assert sup.count() == 1


async def test_streamed_chunks_arrive_in_order(demo_sup):
    sup = demo_sup
    s = await sup.get_or_create("streamer", "default")
    chunks = []
    result = await sup.chat(s, "my favourite colour is deep ocean blue", on_chunk=chunks.append)
    assert len(chunks) > 3
    assert "".join(chunks) == result["reply"] == "Got it: your favourite colour is deep ocean blue."


async def test_fifty_sessions_in_parallel(sup):
    async def one(i):
        await say(sup, f"par-{i}", f"my number is {i}")
        return await say(sup, f"par-{i}", "what is my number?")

    replies = await asyncio.gather(*(one(i) for i in range(50)))
    assert replies == [f"Your number is {i}." for i in range(50)]
    assert len({s.pid for s in sup.sessions.values()}) == 50


@pytest.mark.parametrize("how", CRASH_KINDS)
async def test_a_crash_touches_only_its_session(demo_sup, how):
    sup = demo_sup
    await say(sup, "victim", "my name is Alice")
    await say(sup, "bystander", "my name is Bob")
    bystander_pid = sup.sessions["bystander"].pid
    victim = sup.sessions["victim"]
    with pytest.raises(errors.AgentDied) as info:
        await sup.command(victim, "crash", {"how": how})
    assert info.value.code == "agent_crashed"
    assert await wait_for_state(sup, victim, states.CRASHED) == states.CRASHED
    assert await say(sup, "bystander", "what is my name?") == "Your name is Bob."
    assert sup.sessions["bystander"].pid == bystander_pid
    # The next message respawns the victim with its history restored.
    assert await say(sup, "victim", "what is my name?") == "Your name is Alice."
    assert victim.state == states.IDLE and len(victim.restarts) == 1


async def test_exit_classification_names_the_signal(demo_sup):
    sup = demo_sup
    s = await sup.get_or_create("sig", "default")
    with pytest.raises(errors.AgentDied):
        await sup.command(s, "crash", {"how": "signal"})
    await wait_for_state(sup, s, states.CRASHED)
    assert s.exit_description == "killed by signal SIGSEGV"


async def test_oom_ends_only_that_session(make_supervisor, demo_agent):
    sup = await make_supervisor(memory_limit=64 * 1024 * 1024, agent=demo_agent)
    mechanism = sup.limiter.mechanism
    print(f"memory limit enforced by {mechanism}")
    assert mechanism in ("cgroup2", "cgroup1", "rlimit")
    await say(sup, "hog", "my name is Hog")
    await say(sup, "calm", "my name is Calm")
    hog = sup.sessions["hog"]
    with pytest.raises(errors.AgentDied) as info:
        await sup.command(hog, "allocate", {"mib": 200})
    assert info.value.code == "agent_oom"
    assert await wait_for_state(sup, hog, states.OOM) == states.OOM
    assert await say(sup, "calm", "what is my name?") == "Your name is Calm."
    # Within the limit is fine, and the OOM session comes back with its history.
    assert await say(sup, "hog", "what is my name?") == "Your name is Hog."
    result = await sup.command(sup.sessions["calm"], "allocate", {"mib": 8})
    assert result["reply"]["allocated_mib"] == 8


async def test_idle_session_is_reaped_by_its_timer(make_supervisor):
    sup = await make_supervisor(idle_timeout=0.5)
    await say(sup, "sleepy", "hello")
    s = sup.sessions["sleepy"]
    pid = s.pid
    assert await wait_for_state(sup, s, states.REAPED) == states.REAPED
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert "sleepy" not in sup.sessions  # the store keeps it; memory does not
    assert await say(sup, "sleepy", "hello again") == "You said: hello again"


async def test_busy_session_is_not_reaped(make_supervisor):
    sup = await make_supervisor(idle_timeout=0.3)
    s = await sup.get_or_create("worker", "default")
    result = await sup.command(s, "sleep", {"seconds": 0.8})
    assert result["status"] == "done"
    assert s.state == states.IDLE  # the timer that fired mid-turn did not reap it


async def test_max_age_expires_a_session(make_supervisor):
    sup = await make_supervisor(max_age=0.5)
    await say(sup, "old", "hello")
    assert await wait_for_state(sup, sup.sessions["old"], states.EXPIRED) == states.EXPIRED


async def test_kill(demo_sup):
    sup = demo_sup
    await say(sup, "doomed", "hello")
    s = sup.sessions["doomed"]
    pid = s.pid
    assert await sup.kill(s) == states.KILLED
    assert s.state == states.KILLED and s.pid is None
    assert not psutil.pid_exists(pid)


async def test_interrupt_ends_a_sleep_turn_and_the_process_lives(demo_sup):
    sup = demo_sup
    s = await sup.get_or_create("napper", "default")
    await sup.chat(s, "my name is Nap")
    pid = s.pid
    turn = asyncio.ensure_future(sup.command(s, "sleep", {"seconds": 30}))
    await wait_for_state(sup, s, states.BUSY)
    assert sup.interrupt(s)
    result = await asyncio.wait_for(turn, 10)
    assert result["status"] == "interrupted"
    assert s.pid == pid
    assert (await sup.chat(s, "what is my name?"))["reply"] == "Your name is Nap."


async def test_request_timeout_interrupts_the_turn(make_supervisor, demo_agent):
    sup = await make_supervisor(request_timeout=0.5, agent=demo_agent)
    s = await sup.get_or_create("slow", "default")
    with pytest.raises(errors.TurnTimeout):
        await sup.command(s, "sleep", {"seconds": 30})
    await wait_for_state(sup, s, states.IDLE)
    assert (await sup.chat(s, "still there?"))["reply"] == "You said: still there?"


async def test_restart_window_fails_a_crash_looping_session(make_supervisor):
    sup = await make_supervisor(max_restarts=2, restart_window=60)
    s = await sup.get_or_create("looper", "default")
    for _ in range(3):  # the first spawn plus two restarts
        with pytest.raises(errors.AgentDied):
            await sup.command(s, "crash", {"how": "exit"})
        await wait_for_state(sup, s, states.CRASHED)
    with pytest.raises(errors.SessionFailed) as info:
        await sup.chat(s, "hello?")
    assert s.state == states.FAILED
    assert 0 < info.value.retry_after <= 60
    assert await say(sup, "healthy", "hello") == "You said: hello"


async def test_failed_session_restarts_after_the_window(make_supervisor):
    sup = await make_supervisor(max_restarts=1, restart_window=0.5)
    s = await sup.get_or_create("phoenix", "default")
    await sup.chat(s, "my name is Phoenix")
    for _ in range(2):
        with pytest.raises(errors.AgentDied):
            await sup.command(s, "crash", {"how": "exit"})
        await wait_for_state(sup, s, states.CRASHED)
    with pytest.raises(errors.SessionFailed) as info:
        await sup.chat(s, "hello?")
    await asyncio.sleep(info.value.retry_after)  # the policy's own clock: waiting it out is the behaviour
    assert (await sup.chat(s, "what is my name?"))["reply"] == "Your name is Phoenix."


async def test_agent_title_is_visible_in_proc(sup):
    await say(sup, "0123456789abcdef-title", "hello", tenant="acme")
    pid = sup.sessions["acme/0123456789abcdef-title"].pid
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        title = f.read().replace(b"\0", b" ").decode().strip()
    assert title == "corral: agent sid=0123456789ab tenant=acme idle"
    with open(f"/proc/{sup.spawner.pid}/cmdline", "rb") as f:
        assert f.read().startswith(b"corral: zygote")


async def test_capacity_and_tenant_quota(make_supervisor):
    sup = await make_supervisor(max_sessions=3, max_sessions_per_tenant=2)
    await say(sup, "a1", "hi", tenant="a")
    await say(sup, "a2", "hi", tenant="a")
    with pytest.raises(errors.QuotaExceeded):
        await say(sup, "a3", "hi", tenant="a")
    await say(sup, "b1", "hi", tenant="b")
    with pytest.raises(errors.AtCapacity) as info:
        await say(sup, "b2", "hi", tenant="b")
    assert info.value.retry_after
    assert "a3" not in sup.sessions and "b2" not in sup.sessions
    assert await say(sup, "a1", "still fine", tenant="a") == "You said: still fine"


async def test_session_ids_are_per_tenant(sup):
    """Another tenant's "mine" is a session of its own: its own process, its own history."""
    await say(sup, "mine", "my name is Ann", tenant="a")
    theirs = await sup.get_or_create("mine", "b")
    assert (await sup.chat(theirs, "what is my name?"))["reply"] == "I don't know your name yet."
    ours = await sup.get_or_create("mine", "a")
    assert (await sup.chat(ours, "what is my name?"))["reply"] == "Your name is Ann."
    assert ours is not theirs and ours.pid != theirs.pid and (ours.id, theirs.id) == ("mine", "mine")


async def test_bad_session_id(sup):
    for bad in ["", "x" * 129, "has space", "../etc", "é"]:
        with pytest.raises(errors.InvalidRequest):
            await sup.get_or_create(bad, "default")


async def test_mailbox_bound(make_supervisor):
    sup = await make_supervisor(mailbox_size=2)
    s = await sup.get_or_create("busy", "default")
    first = asyncio.ensure_future(sup.command(s, "sleep", {"seconds": 0.5}))
    second = asyncio.ensure_future(sup.command(s, "sleep", {"seconds": 0}))
    await wait_for_state(sup, s, states.BUSY)
    with pytest.raises(errors.MailboxFull):
        await sup.chat(s, "one too many")
    assert (await first)["status"] == (await second)["status"] == "done"


async def test_rate_limit(make_supervisor):
    sup = await make_supervisor(rate_limit=1, rate_burst=2)
    s = await sup.get_or_create("chatty", "default")
    await sup.chat(s, "one")
    await sup.chat(s, "two")
    with pytest.raises(errors.RateLimited) as info:
        await sup.chat(s, "three")
    assert 0 < info.value.retry_after <= 1


async def test_unknown_command_and_bad_args_keep_the_process(demo_sup):
    sup = demo_sup
    s = await sup.get_or_create("cmd", "default")
    await sup.chat(s, "hello")
    pid = s.pid
    with pytest.raises(errors.CommandNotFound):
        await sup.command(s, "no-such-command", {})
    with pytest.raises(errors.InvalidRequest):
        await sup.command(s, "sleep", {"seconds": "soon"})
    assert s.pid == pid and s.state == states.IDLE


async def test_clean_shutdown_leaves_nothing(make_supervisor):
    sup = await make_supervisor()
    for i in range(5):
        await say(sup, f"c{i}", "hello")
    pids = [s.pid for s in sup.sessions.values()] + [sup.spawner.pid]
    run_dir, cgroup = sup.run_dir, sup.limiter.describe().get("path")
    await sup.close()
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not os.path.exists(run_dir)
    if cgroup:
        assert not os.path.exists(cgroup)
    assert all(s.state == states.ENDED for s in sup.sessions.values())


async def test_zygote_death_crashes_its_agents_and_a_new_one_takes_over(sup):
    await say(sup, "z", "my name is Zed")
    s = sup.sessions["z"]
    old_zygote = sup.spawner.pid
    os.kill(old_zygote, 9)
    await wait_for_state(sup, s, states.CRASHED)
    assert s.exit_description == "the zygote died"
    # A replacement zygote comes up; the next message waits for it and brings the session back.
    assert await say(sup, "z", "what is my name?") == "Your name is Zed."
    assert sup.spawner.pid != old_zygote


async def test_an_agents_children_die_with_it(make_supervisor):
    from tests.procs import wait_gone

    sup = await make_supervisor(agent="tests.core_agents:ForkingAgent")
    s = await sup.get_or_create("parent", "default")
    await sup.command(s, "fork", {})
    # the host's pid: the one the agent sees is in its pid namespace when the sandbox gives it one
    [child] = [c.pid for c in psutil.Process(s.pid).children()]
    with pytest.raises(errors.AgentDied):
        await sup.command(s, "crash", {"how": "exit"})
    assert wait_gone([child], timeout=5) == []


async def test_a_lost_interrupt_is_sent_again(make_supervisor):
    sup = await make_supervisor(agent="tests.core_agents:ForkingAgent")
    s = await sup.get_or_create("deaf", "default")
    await sup.command(s, "go_deaf", {})
    turn = asyncio.ensure_future(sup.command(s, "deaf_sleep", {"deaf": 0.8, "seconds": 30}))
    await wait_for_state(sup, s, states.BUSY)
    assert sup.interrupt(s)
    result = await asyncio.wait_for(turn, 10)
    assert result["status"] == "interrupted"
    assert s.life.interrupts >= 2  # the first SIGINT fell on deaf ears; a resend ended the turn
    # A resend never spills into the next turn.
    assert (await sup.command(s, "sleep", {"seconds": 1.5}))["status"] == "done"


async def test_the_spawner_is_a_plug(make_config):
    """A launcher given to the Supervisor launches every process (here: the zygote's, recording)."""
    from corral.supervisor import Supervisor
    from corral.supervisor.spawner import ZygoteSpawner

    launched = []

    class RecordingSpawner(ZygoteSpawner):
        async def launch(self, key, request, *args, **kwargs):
            launched.append(request["session_id"])
            return await super().launch(key, request, *args, **kwargs)

    sup = Supervisor(make_config(), launcher=RecordingSpawner)
    await sup.start()
    try:
        s = await sup.get_or_create("plugged", "default")
        assert (await sup.chat(s, "my name is Ada"))["reply"] == "Got it: your name is Ada."
        assert launched == ["plugged"] and isinstance(sup.spawner, RecordingSpawner)
    finally:
        await sup.close()


async def test_a_session_begun_again_gets_a_cgroup_and_temp_dir_of_its_own(sup):
    # Its generations count from 1 again, and the last process's cgroup is released on a worker
    # thread: with the same name, that release could remove the new process's cgroup under it.
    s = await sup.get_or_create("again", "default")
    await sup.chat(s, "hello")
    first = (s.limits, s.sandbox)
    await sup.queries.end("again", "default")
    s = await sup.get_or_create("again", "default")
    await sup.chat(s, "hello")
    assert s.life.generation == 1
    for before, now in zip(first, (s.limits, s.sandbox)):
        names = [spec.path if isinstance(spec, LimitSpec) else spec.get("tmpdir") for spec in (before, now) if spec]
        assert len(set(names)) == len(names)
    assert first[0] or first[1], "neither a cgroup nor a temp dir here: nothing to compare"
