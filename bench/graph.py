"""The graph the LangGraph agent's figures run: one node answering through langchain_core's fake
chat model (which streams its reply word by word), so the figure is corral's and LangGraph's cost."""

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langgraph.graph import END, START, MessagesState, StateGraph


async def respond(state: MessagesState) -> dict:
    """A short reply from a fake model."""
    model = GenericFakeChatModel(messages=iter([AIMessage("Hello, I am a fake model.")]))
    return {"messages": [await model.ainvoke(state["messages"])]}


builder = StateGraph(MessagesState)
builder.add_node("respond", respond)
builder.add_edge(START, "respond")
builder.add_edge("respond", END)
graph = builder.compile()
