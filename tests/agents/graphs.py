"""LangGraph graphs over langchain_core's fake chat model, for the LangGraph adapter's tests."""

import asyncio

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph


async def respond(state: MessagesState) -> dict:
    """Answer through a fake chat model (it streams its reply word by word) with what it was given."""
    last = state["messages"][-1].content
    if last.startswith("slow "):  # "slow <marker>": print the marker (the test hears it), then take forever
        print(last.split(" ", 1)[1], flush=True)
        await asyncio.sleep(600)
    if last == "fail":
        raise RuntimeError("the graph fell over")
    reply = f"You said {last}, message {len(state['messages'])} of this conversation."
    model = GenericFakeChatModel(messages=iter([AIMessage(reply)]))
    return {"messages": [await model.ainvoke(state["messages"])]}


def build() -> StateGraph:
    """One node: the model's answer."""
    builder = StateGraph(MessagesState)
    builder.add_node("respond", respond)
    builder.add_edge(START, "respond")
    builder.add_edge("respond", END)
    return builder


graph = build().compile()


remembering = build().compile(checkpointer=InMemorySaver())  # keeps each thread's messages itself
