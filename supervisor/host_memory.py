"""What the host's memory management costs a node of many agents: one line at start-up for the operator.

Every agent is forked from the zygote and shares its pages, so each of those pages is mapped once per
live session. A kernel thread that checks whether a physical page was accessed finds its mappings by
walking all of them: DAMON's physical-address monitoring (``paddr``, as set up by proactive reclaim or
a VM's memory balloon) does that for every region it samples, so its CPU grows with the number of
sessions. Measured on a 2-core VM: 10,000 idle sessions made it take 1.3 cores, and sessions came up
5 times slower at 5,000 than at none (docs/benchmarks.md). corral cannot change what the kernel
walks; it says so once, and the operator decides (docs/operations.md, "Memory").
"""
from __future__ import annotations

import os

from corral.supervisor.cgroupfs import read_optional as _read

__all__ = ["DAMON_ADMIN", "physical_monitors", "note"]

DAMON_ADMIN = "/sys/kernel/mm/damon/admin"


def physical_monitors(admin: str = DAMON_ADMIN) -> list[str]:
    """The running DAMON monitors that watch physical memory, as ``kdamond N (pid P)``; [] if none or unreadable."""
    kdamonds = os.path.join(admin, "kdamonds")
    try:
        names = sorted((n for n in os.listdir(kdamonds) if n.isdigit()), key=int)
    except OSError:
        return []
    found = []
    for name in names:
        kdamond = os.path.join(kdamonds, name)
        if _read(os.path.join(kdamond, "state")) != "on":
            continue
        try:
            contexts = [c for c in os.listdir(os.path.join(kdamond, "contexts")) if c.isdigit()]
        except OSError:
            continue
        if any(_read(os.path.join(kdamond, "contexts", c, "operations")) == "paddr" for c in contexts):
            found.append(f"kdamond {name} (pid {_read(os.path.join(kdamond, 'pid')) or '?'})")
    return found


def note(admin: str = DAMON_ADMIN) -> str | None:
    """The start-up warning about the host's memory monitors, or None when there is nothing to say."""
    monitors = physical_monitors(admin)
    if not monitors:
        return None
    return (f"DAMON is monitoring physical memory ({', '.join(monitors)}): each of its access checks walks every "
            "agent that shares a zygote page, so its CPU grows with the live sessions (1.3 cores of 2 at 10,000 "
            f"idle sessions, measured); turn it off on corral nodes ('echo off > {admin}/kdamonds/N/state') "
            "if nothing else needs it (docs/operations.md, \"Memory\")")
