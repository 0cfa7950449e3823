"""Ready agents for what people build on corral: a model's chat API, MCP tools, LangGraph graphs.

Each is one module, imported only when named by ``--agent`` (its extra installs what it needs):
``corral.agent_proc.contrib.openai_chat:OpenAIChat``, ``corral.agent_proc.contrib.mcp_tools:MCPTools``,
``corral.agent_proc.contrib.langgraph:GraphAgent``.
"""
