"""How the zygote forks an agent: the C library's ``fork`` where that is safe, ``os.fork`` otherwise.

``os.fork`` runs, in every child, the Python-level at-fork hooks of every module the zygote has
imported. The standard library's (threading, logging, concurrent.futures) rebuild locks that
another thread might have held at the fork, and random reseeds. Their first run in a child
allocates, frees and touches objects all over the zygote's heap: about 0.3 MB of copied pages in
every agent, more than an idle agent's whole own work (bench/sandbox.py, docs/benchmarks.md).

A single-threaded zygote holds no lock another thread could have taken, so those repairs have
nothing to repair; random is reseeded here. Hooks registered after ``record_hooks()`` (by the
agent's imports: a client library resetting its connection pool, say) are run here exactly as
``os.fork`` would run them. If the zygote has a second thread (an agent module started one),
``fork`` is ``os.fork``, and every hook runs as usual.
"""

import ctypes
import os
import sys
import traceback

_libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the GIL is held across fork, as os.fork holds it
_libc.fork.restype = ctypes.c_int
_register_at_fork = os.register_at_fork

# (before, after_in_parent, after_in_child) for each os.register_at_fork call since record_hooks()
_hooks: list[tuple] = []


def record_hooks() -> None:
    """From now on, remember every at-fork hook registered (they are registered as usual too)."""
    def register_at_fork(*, before=None, after_in_parent=None, after_in_child=None):
        _register_at_fork(**{name: hook for name, hook in (
            ("before", before), ("after_in_parent", after_in_parent), ("after_in_child", after_in_child))
            if hook is not None})
        _hooks.append((before, after_in_parent, after_in_child))

    os.register_at_fork = register_at_fork


def why_not_cheap() -> str | None:
    """Why this process must fork with ``os.fork`` (another thread), or None."""
    threads = len(os.listdir("/proc/self/task"))
    return f"the zygote has {threads} threads" if threads != 1 else None


class Forker:
    """Forks agents the cheap way when the zygote is single-threaded at its start, else with os.fork."""

    def __init__(self):
        self.reason = why_not_cheap()  # checked once: after its start the zygote starts no thread

    def describe(self) -> str:
        """How agents are forked, for the start-up log."""
        return "libc fork" if self.reason is None else f"os.fork ({self.reason})"

    def fork(self) -> int:
        """Fork; in the child return 0 with the recorded hooks run and random reseeded."""
        if self.reason is not None:
            return os.fork()
        for before, _, _ in reversed(_hooks):
            _run(before)
        pid = _libc.fork()
        if pid < 0:
            err = ctypes.get_errno()
            # as os.fork does, the parent's hooks run after a failed fork too: a before-hook may hold a
            # lock its in-parent hook releases (concurrent.futures.thread's shutdown lock), and the next
            # fork would wait on it for ever
            for _, in_parent, _ in _hooks:
                _run(in_parent)
            raise OSError(err, "fork failed")
        for _, in_parent, in_child in _hooks:
            _run(in_child if pid == 0 else in_parent)
        if pid == 0 and "random" in sys.modules:
            sys.modules["random"]._inst.seed()  # the one stdlib hook a single-threaded child needs
        return pid


def _run(hook) -> None:
    """Call an at-fork hook as os.fork does: what it raises is reported, never propagated."""
    if hook is None:
        return
    try:
        hook()
    except Exception:  # noqa: BLE001  os.fork too reports and goes on; a child must not return into the zygote's loop
        traceback.print_exc()
