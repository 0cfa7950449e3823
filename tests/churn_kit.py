"""The churn engine shared by tests/test_churn.py and bench/soak.py: create, use, end, repeat."""

import asyncio
import itertools
import os
import secrets
import time
from collections import Counter

from corral.supervisor import errors, states
from tests.chaos_kit import Figures, leftovers
from tests.conftest import wait_for_state

ENDINGS = ("reaped", "killed", "crashed", "ended")


async def churn(sup, *, sessions: int, concurrency: int, warm_up: int = 200) -> dict:
    """Run ``sessions`` sessions through create -> chat -> end, ``concurrency`` at a time; report."""
    prefix = secrets.token_hex(2) + "-"
    ids = itertools.count()
    violations: list[str] = []
    ended: Counter = Counter()
    peak = {"sessions_in_memory": 0}

    async def one(ending: str) -> None:
        sid = f"{prefix}{next(ids)}"
        try:
            final = await _live_and_end(sup, sid, ending)
        except Exception as exc:  # a broken promise, not a test crash
            violations.append(f"{sid} ({ending}): {exc!r}")
            return
        ended[final] += 1
        peak["sessions_in_memory"] = max(peak["sessions_in_memory"], len(sup.sessions))
        if final != ending:
            violations.append(f"{sid}: asked to end as {ending}, ended as {final}")

    async def wave(n: int) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def gated(i):
            async with gate:
                await one(ENDINGS[i % len(ENDINGS)])

        await asyncio.gather(*(gated(i) for i in range(n)))

    await wave(warm_up)
    ended.clear()
    before = Figures.now()
    started = time.monotonic()
    await wave(sessions)
    seconds = time.monotonic() - started
    after = Figures.now()
    left = leftovers(sup, prefix)
    if left["orphans"] or left["zombies"]:
        violations.append(f"leftover processes: {left}")
    undead = [s.id for s in sup.sessions.values() if s.state != states.CRASHED]
    if undead:
        violations.append(f"sessions held in memory that are not in their restart window: {undead[:5]}")
    return {
        "sessions": sessions,
        "seconds": round(seconds, 2),
        "sessions_per_second": round(sessions / seconds, 1),
        "ended": dict(ended),
        "before": vars(before),
        "growth": before.growth(after),
        "max_sessions_in_memory": peak["sessions_in_memory"],
        "stale_run_dir": sorted(os.listdir(sup.run_dir)),
        "stale_cgroups": _stale_cgroups(sup),
        "violations": violations,
    }


async def _live_and_end(sup, sid: str, ending: str) -> str:
    """Create a session, chat once, then end it the way asked; return the state it ended in."""
    s = await sup.get_or_create(sid, "churn")
    text = f"hello from {sid}"
    result = await sup.chat(s, text)
    if result.get("reply") != f"You said: {text}":
        raise AssertionError(f"wrong reply {result.get('reply')!r}")
    if ending == "reaped":
        return await wait_for_state(sup, s, set(states.DOWN), timeout=60)
    if ending == "killed":
        return await sup.kill(s)
    if ending == "ended":
        await sup.remove(s)
        return s.state
    try:
        await sup.command(s, "crash", {"how": "exit"})
    except errors.AgentDied:
        pass
    return await wait_for_state(sup, s, set(states.DOWN), timeout=60)


def _stale_cgroups(sup) -> list[str]:
    """Per-session cgroup dirs left under the run's cgroup parent (none when all sessions ended)."""
    path = getattr(sup.limiter, "path", None)
    if not path or not os.path.isdir(path):
        return []
    live = {os.path.basename(s.limits.path) for s in sup.sessions.values() if s.limits and s.limits.path}
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and d not in live)
