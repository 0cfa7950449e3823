"""Per-session process figures: they match /proc, and CPU % tells a busy agent from an idle one."""

import asyncio
import os

from supervisor.procstats import ProcStats

MiB = 1 << 20


def proc_status(pid: int) -> dict:
    """The fields of /proc/PID/status as strings."""
    with open(f"/proc/{pid}/status") as fh:
        return dict(line.split(":", 1) for line in fh if ":" in line)


def proc_rss(pid: int) -> int:
    """VmRSS of a process in bytes."""
    return int(proc_status(pid)["VmRSS"].split()[0]) * 1024


async def live_session(sup, sid: str):
    """A session with a running agent."""
    s = await sup.get_or_create(sid, "acme")
    await sup.ensure_live(s)
    return s


async def test_figures_match_proc(sup):
    s = await live_session(sup, "figures")
    await sup.command(s, "allocate", {"mib": 20})
    stats = ProcStats(sup, max_age=0)
    await stats.refresh()
    fig = stats.for_session(s)
    assert fig["pid"] == s.pid
    assert abs(fig["rss_bytes"] - proc_rss(s.pid)) < 4 * MiB
    assert fig["rss_bytes"] > 20 * MiB
    assert 0 < fig["uss_bytes"] <= fig["rss_bytes"]
    assert fig["threads"] == int(proc_status(s.pid)["Threads"])
    assert abs(fig["open_fds"] - len(os.listdir(f"/proc/{s.pid}/fd"))) <= 2
    assert fig["memory_limit"]["mechanism"] == sup.limiter.describe()["mechanism"]
    assert fig["memory_limit"]["bytes"] == sup.config.memory_limit
    if sup.limiter.mechanism.startswith("cgroup"):
        assert fig["cgroup"]["current"] >= 20 * MiB


async def test_cpu_percent_busy_versus_idle(sup):
    busy, idle = await live_session(sup, "spinner"), await live_session(sup, "sleeper")
    stats = ProcStats(sup, max_age=0)
    await stats.refresh()  # the start of the interval
    await sup.command(busy, "spin", {"seconds": 1.5})
    await stats.refresh()
    # A core's worth of spinning reads 100; on a loaded shared machine it gets less, never ~0.
    assert stats.for_session(busy)["cpu_percent"] > 10 > 3 > stats.for_session(idle)["cpu_percent"]


async def test_refresh_is_shared_and_bounded(sup):
    s = await live_session(sup, "shared")
    stats = ProcStats(sup, max_age=60)
    await asyncio.gather(*(stats.refresh() for _ in range(20)))
    await stats.refresh()
    assert stats.passes == 1  # twenty concurrent callers and a late one: one pass
    assert stats.for_session(s)["rss_bytes"] > 0


async def test_session_without_process(sup):
    s = await sup.get_or_create("never-started", "acme")
    stats = ProcStats(sup, max_age=0)
    await stats.refresh()
    fig = stats.for_session(s)
    assert fig["pid"] is None and fig["rss_bytes"] is None and fig["cpu_percent"] is None
