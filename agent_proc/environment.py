"""An agent's environment: a small documented base plus what the operator declared, nothing else.

The zygote is started with an environment built here from nothing (``zygote_environment``): the base
(``PATH``, ``LANG``, ``TMPDIR``, ``HOME`` = that ``TMPDIR``) and the server-wide ``--agent-env``
entries. Each agent, forked from it, then ``enter``s its own: its session's temp dir as ``TMPDIR``
and ``HOME``, and the variables its spawn request carries (the tenant's ``env``, the egress
gateway's). Nothing of the server's own environment (admin token, database URL, keys) is passed on
unless an operator names it. Stdlib only: this runs in the zygote and in every agent.
"""

import os
import re

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_LANG = "C.UTF-8"
# The base every agent gets, whatever is declared: the sandbox owns the temp dir.
BASE = ("PATH", "LANG", "TMPDIR", "HOME")
RESERVED = ("TMPDIR",)
# The ready agents' own settings (agent_proc/contrib), passed through from the server when set, so
# `corral serve --agent corral.agent_proc.contrib...` is configured as docs/agents.md says without an
# --agent-env line each. None is a secret: the API keys (CORRAL_OPENAI_API_KEY, OPENAI_API_KEY) are
# not here; give an agent one with --agent-env, or better keep it out of the sandbox with --upstream.
READY_AGENT_SETTINGS = (
    "CORRAL_OPENAI_BASE_URL", "CORRAL_OPENAI_MODEL", "CORRAL_OPENAI_SYSTEM_PROMPT", "CORRAL_OPENAI_OPTIONS",
    "CORRAL_OPENAI_RETRY_FOR", "CORRAL_OPENAI_READ_TIMEOUT",
    "CORRAL_MCP_SERVERS", "CORRAL_MCP_CONFIG",
    "CORRAL_LANGGRAPH_GRAPH",
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def valid_name(name: str) -> bool:
    """Whether ``name`` can be an environment variable's name (and is not one the sandbox owns)."""
    return bool(_NAME.fullmatch(name)) and name not in RESERVED


def parse_entry(text: str) -> tuple[str, str | None]:
    """``NAME=VALUE`` -> (NAME, VALUE); ``NAME`` -> (NAME, None), passed through from the server."""
    name, sep, value = text.partition("=")
    if not valid_name(name):
        raise ValueError(f"expected NAME or NAME=VALUE with NAME of A-Z a-z 0-9 _ (not {', '.join(RESERVED)})")
    return name, value if sep else None


def ready_agent_settings(source) -> dict[str, str]:
    """The ready agents' settings (``READY_AGENT_SETTINGS``) that ``source`` sets."""
    return {name: source[name] for name in READY_AGENT_SETTINGS if name in source}


def declared_values(entries, source) -> dict[str, str]:
    """The variables ``entries`` (``NAME`` or ``NAME=VALUE``) declare; a ``NAME`` missing from ``source`` is left out."""
    values = {}
    for entry in entries:
        name, value = parse_entry(entry)
        if value is None:
            value = source.get(name)
        if value is not None:
            values[name] = value
    return values


def zygote_environment(tmpdir: str, declared: dict[str, str], source) -> dict[str, str]:
    """The zygote's whole environment: the base (``PATH`` and ``LANG`` from ``source``, else defaults) and ``declared``."""
    env = {"PATH": source.get("PATH") or DEFAULT_PATH, "LANG": source.get("LANG") or DEFAULT_LANG,
           "HOME": tmpdir}
    env.update(declared)
    env["TMPDIR"] = tmpdir
    return env


def enter(declared: dict | None, tmpdir: str | None) -> None:
    """In a forked agent: its temp dir as ``TMPDIR`` and ``HOME``, then its spawn request's variables over the zygote's."""
    if tmpdir:
        if os.environ.get("HOME") == os.environ.get("TMPDIR"):  # else the operator declared a HOME
            os.environ["HOME"] = tmpdir
        os.environ["TMPDIR"] = tmpdir
    for name, value in (declared or {}).items():
        if valid_name(name):
            os.environ[name] = str(value)
