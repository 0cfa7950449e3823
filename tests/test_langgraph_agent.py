"""The LangGraph adapter in real agent processes, with graphs over langchain_core's fake chat model
(tests/agents/graphs.py): the reply streams as deltas, the conversation comes from corral's store."""

import asyncio

import pytest

from corral.supervisor import errors, states
from tests.conftest import AgentSays

AGENT = "corral.agent_proc.contrib.langgraph:GraphAgent"
GRAPHS = {
    "compiled": "tests.agents.graphs:graph",
    "with-checkpointer": "tests.agents.graphs:remembering",
    "builder-function": "tests.agents.graphs:build",
}


@pytest.fixture(params=sorted(GRAPHS))
async def sup(request, make_supervisor, monkeypatch):
    """A supervisor serving each test graph (the zygote imports it once)."""
    monkeypatch.setenv("CORRAL_LANGGRAPH_GRAPH", GRAPHS[request.param])
    return await make_supervisor(agent=AGENT)


async def test_the_reply_streams_and_the_conversation_carries_on(sup):
    s = await sup.get_or_create("graph", "default")
    chunks = []
    first = await sup.chat(s, "hello", on_chunk=chunks.append)
    assert first["reply"] == "You said hello, message 1 of this conversation."
    assert "".join(chunks) == first["reply"] and len(chunks) > 5  # word by word, as the model streamed
    assert (await sup.chat(s, "again"))["reply"] == "You said again, message 3 of this conversation."
    # A new process (thread id = session id) starts from corral's store, without repeating a message.
    await sup.kill(s)
    s = await sup.get_or_create("graph", "default")
    third = await sup.chat(s, "once more")
    assert third["reply"] == "You said once more, message 5 of this conversation."
    assert (await sup.chat(s, "and again"))["reply"] == "You said and again, message 7 of this conversation."
    assert (await sup.chat(s, "ok"))["state"] == {"messages": 10}


async def test_an_interrupt_cancels_the_graph(sup):
    s = await sup.get_or_create("patient", "default")
    await sup.chat(s, "hello")
    pid = s.pid
    began = AgentSays(sup, "the node runs")
    turn = asyncio.ensure_future(sup.chat(s, "slow the node runs"))
    await began.wait()
    assert sup.interrupt(s)
    assert (await asyncio.wait_for(turn, 10))["status"] == "interrupted"
    assert s.pid == pid
    # The interrupted message stays in the conversation (it is in the store); no reply to it does.
    assert (await sup.chat(s, "back"))["reply"] == "You said back, message 4 of this conversation."


async def test_a_failing_node_is_a_turn_error_not_a_crash(sup):
    s = await sup.get_or_create("fragile", "default")
    with pytest.raises(errors.UpstreamFailed, match="the graph fell over"):
        await sup.chat(s, "fail")
    assert s.state == states.IDLE


async def test_a_graph_that_cannot_be_loaded_stops_the_server_starting(make_supervisor, monkeypatch):
    monkeypatch.setenv("CORRAL_LANGGRAPH_GRAPH", "tests.agents.graphs:no_such_graph")
    with pytest.raises(errors.StartupError, match="no_such_graph"):
        await make_supervisor(agent=AGENT)


async def test_no_graph_named_stops_the_server_starting(make_supervisor, monkeypatch):
    monkeypatch.delenv("CORRAL_LANGGRAPH_GRAPH", raising=False)
    with pytest.raises(errors.StartupError, match="set CORRAL_LANGGRAPH_GRAPH to module:attribute"):
        await make_supervisor(agent=AGENT)
