"""How the zygote forks agents (agent_proc/forking.py): the C library's fork when the zygote is
single-threaded, os.fork when it is not, and in both cases what os.fork promises an agent: its own
random stream and every at-fork hook its modules registered. Also the zygote's rehearsal
(agent_proc/warmup.py): it leaves the zygote as it was and never makes the user's agent."""

import signal

import psutil
import pytest

AGENTS = {"single-threaded": ("tests.core_agents:ForkFacts", "libc fork"),
          "threaded": ("tests.agents.threaded:ThreadedForkFacts", "os.fork (the zygote has 2 threads)")}


@pytest.fixture(params=list(AGENTS))
async def facts_sup(request, make_supervisor):
    agent, fork = AGENTS[request.param]
    sup = await make_supervisor(agent=agent)
    return sup, fork


async def facts(sup, session_id):
    s = await sup.get_or_create(session_id, "default")
    result = await sup.command(s, "fork_facts", {})
    assert result["status"] == "done", result
    return result["reply"]


async def test_the_zygote_forks_the_way_its_threads_allow(facts_sup):
    sup, fork = facts_sup
    assert sup.spawner.fork == fork


async def test_each_agent_gets_its_own_random_stream(facts_sup):
    sup, _ = facts_sup
    draws = [(await facts(sup, f"r{i}"))["random"] for i in range(4)]
    assert len(set(draws)) == 4  # one shared stream would give every agent the same first draw


async def test_every_at_fork_hook_an_agent_module_registered_runs(facts_sup):
    sup, _ = facts_sup
    first = await facts(sup, "h1")
    second = await facts(sup, "h2")
    # after_in_child ran once in each agent; before ran in the zygote ahead of each fork
    assert first["hooks"]["in_child"] == second["hooks"]["in_child"] == 1
    assert second["hooks"]["before"] == first["hooks"]["before"] + 1 >= 2


async def test_the_rehearsal_never_makes_the_users_agent_and_leaves_the_zygote_as_it_was(facts_sup):
    sup, _ = facts_sup
    assert (await facts(sup, "i1"))["instances"] == 1  # its own: none made in the zygote before the fork
    zygote = psutil.Process(sup.spawner.pid)
    assert " ".join(zygote.cmdline()).startswith("corral: zygote agent=")  # not the rehearsal's agent title
    with open(f"/proc/{zygote.pid}/status") as f:
        ignored = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
    assert ignored & (1 << (signal.SIGINT - 1))  # the rehearsal's agent loop handled SIGINT; the zygote ignores it again
