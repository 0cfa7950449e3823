"""Runs a LangGraph graph as a corral agent (``corral[langgraph]``).

``CORRAL_LANGGRAPH_GRAPH=mymod:graph corral serve --agent corral.agent_proc.contrib.langgraph:GraphAgent``
serves the compiled graph ``graph`` of module ``mymod`` (a ``StateGraph`` not yet compiled is compiled;
a function is called with no arguments to build one). The graph's state must have a ``messages`` key
(``MessagesState`` or a subclass). Each session runs the graph with thread id = session id; its
conversation comes from corral's store, and the AI messages the graph streams are the reply's deltas.

The graph's module is imported when this one is, in the zygote, so every session shares it.
"""

import contextlib
import importlib
import os

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langgraph.graph import StateGraph

from corral.agent_proc.agent import Agent, ConfigError, UpstreamError

GRAPH_VARIABLE = "CORRAL_LANGGRAPH_GRAPH"
_MESSAGE_TYPES = {"user": HumanMessage, "assistant": AIMessage, "system": SystemMessage}


def load_graph(spec: str | None = None):
    """Import ``module:attribute`` (default: $CORRAL_LANGGRAPH_GRAPH) and return a compiled graph."""
    spec = spec or os.environ.get(GRAPH_VARIABLE, "")
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"set {GRAPH_VARIABLE} to module:attribute naming a LangGraph graph, not {spec!r}")
    graph = getattr(importlib.import_module(module_name), attr)
    if callable(graph) and not hasattr(graph, "astream") and not isinstance(graph, StateGraph):
        graph = graph()  # a builder function
    if isinstance(graph, StateGraph):
        graph = graph.compile()
    if not hasattr(graph, "astream"):
        raise ValueError(f"{spec} is not a LangGraph graph (it has no astream)")
    return graph


# What langchain_core imports lazily on a graph's first run: imported here, in the zygote, instead of
# in every session's first turn.
_FIRST_RUN_IMPORTS = (
    "langchain_core.messages.block_translators.langchain_v0",
    "langchain_core.tracers.context",
    "langchain_core.tracers.run_collector",
    "langchain_core.tracers.stdout",
)
for _name in _FIRST_RUN_IMPORTS:
    with contextlib.suppress(ImportError):  # internal modules: a later release may move them
        importlib.import_module(_name)

if os.environ.get(GRAPH_VARIABLE):
    load_graph()  # in the zygote: import the graph's module (and what it imports) once for every session


def text_of(message) -> str:
    """The text of a message whose content is a string or a list of content blocks."""
    content = message.content
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)


class GraphAgent(Agent):
    """One session's thread of the configured graph."""

    @classmethod
    def check_config(cls, sandbox):
        """Refuse to start without a loadable graph (imported already, in the zygote, when it is set)."""
        try:
            load_graph()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    async def on_start(self, history):
        """Load the graph (already imported in the zygote) and rebuild the conversation."""
        self.graph = load_graph()
        self.config = {"configurable": {"thread_id": self.session_id}}
        self.messages = [_MESSAGE_TYPES[m["role"]](m["content"]) for m in history if m.get("role") in _MESSAGE_TYPES]
        # With a checkpointer of its own the graph keeps the thread's messages: send it the stored
        # conversation once (if its thread is empty), then only new messages. Without one, every turn.
        self.seeded = self.graph.checkpointer is None or bool((await self.graph.aget_state(self.config)).values)

    async def on_message(self, text):
        """Run the graph on the conversation; stream the text of the AI messages it produces."""
        user = HumanMessage(text)
        if self.graph.checkpointer is None or not self.seeded:
            new = self.messages + [user]
        else:
            new = [user]
        self.messages.append(user)
        reply = []
        try:
            async for message, _meta in self.graph.astream({"messages": new}, self.config, stream_mode="messages"):
                if isinstance(message, AIMessage) and (piece := text_of(message)):
                    reply.append(piece)
                    yield piece
        except (MemoryError, UpstreamError):
            raise
        except Exception as exc:  # a node failed (a model's API, a tool): the turn fails, the session lives
            raise UpstreamError(f"the graph failed: {exc!r}") from exc
        self.seeded = True
        self.messages.append(AIMessage("".join(reply)))

    async def on_system(self, text):
        """A system message joins the conversation (and the graph's next input)."""
        self.messages.append(SystemMessage(text))
        if self.graph.checkpointer is not None and self.seeded:
            await self.graph.aupdate_state(self.config, {"messages": [SystemMessage(text)]})
        return "noted"

    def snapshot(self):
        """The conversation's length."""
        return {"messages": len(self.messages)}
