"""The agent's source lines, kept in memory so its tracebacks show them inside the sandbox.

A sandboxed agent often cannot read its own files (a uid of its own, Landlock, a module under a
0700 home): ``traceback`` then prints ``File "mybot.py", line 12`` without the line. The zygote
reads them once, before any fork, into ``linecache``; children share the pages.
"""

import linecache
import os
import sys
import sysconfig

MAX_BYTES = 8 * 1024 * 1024  # of source kept in all: an agent importing a whole framework keeps its own files first


def keep_sources(new_modules, agent_cls) -> int:
    """Cache the lines of the agent's modules among ``new_modules`` (names imported by loading it); bytes kept.

    The agent's modules: its own package's, corral's agent side, and whatever was imported from
    outside the Python installation (the user's code next to it).
    """
    top = agent_cls.__module__.partition(".")[0]
    installed = _installation_dirs()
    files = []
    for name in sorted(new_modules | {agent_cls.__module__}):
        path = getattr(sys.modules.get(name), "__file__", None)
        if not path or not path.endswith(".py"):
            continue
        ours = name.partition(".")[0] == top or name.startswith("corral.agent_proc")
        if ours or not any(path.startswith(d) for d in installed):
            files.append((not ours, path))  # the agent's package first, should the budget run out
    kept = 0
    for _, path in sorted(files):
        kept += _cache(path, MAX_BYTES - kept)
    return kept


def _cache(path: str, budget: int) -> int:
    """Put one file's lines in linecache as an entry never re-checked on disk; its size, or 0."""
    try:
        size = os.path.getsize(path)
        if size > budget:
            return 0
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return 0
    # mtime None: linecache.checkcache leaves the entry alone, where a stat the sandbox refuses would drop it
    linecache.cache[path] = (size, None, lines, path)
    return size


def _installation_dirs() -> tuple[str, ...]:
    """Where the Python installation and installed packages live (with a trailing slash)."""
    paths = sysconfig.get_paths()
    dirs = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return tuple(os.path.join(d, "") for d in dirs if d)
