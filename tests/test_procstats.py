"""Per-session process figures in the admin API: they match /proc for the agent's pid, CPU % tells
a session spinning a core from an idle one, and passes are shared and bounded."""

import asyncio
import os

import pytest

from corral.supervisor.procstats import ProcStats
from corral.web.app import create_app
from corral.web.keys import SUPERVISOR

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


TOKEN = "figures-admin-token"


@pytest.fixture
async def served(aiohttp_client, make_config):
    """(client, supervisor) of a live app with an admin token."""
    app = create_app(make_config(admin_token=TOKEN))
    return await aiohttp_client(app), app[SUPERVISOR]


async def admin_rows(client) -> dict:
    """The live sessions' admin rows by session id."""
    response = await client.get("/admin/sessions", params={"state": "live"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200, await response.text()
    return {row["session_id"]: row for row in (await response.json())["sessions"]}


async def test_admin_figures_match_proc(served):
    client, sup = served
    s = await live_session(sup, "figures")
    await sup.command(s, "allocate", {"mib": 20})
    row = (await admin_rows(client))["figures"]
    assert row["pid"] == s.pid
    assert abs(row["rss_bytes"] - proc_rss(s.pid)) < 4 * MiB
    assert row["rss_bytes"] > 20 * MiB
    assert 0 < row["uss_bytes"] <= row["rss_bytes"]
    assert row["threads"] == int(proc_status(s.pid)["Threads"])
    assert abs(row["open_fds"] - len(os.listdir(f"/proc/{s.pid}/fd"))) <= 2
    assert row["memory_limit"] == {"bytes": sup.config.memory_limit, "mechanism": sup.limiter.mechanism}
    if sup.limiter.mechanism.startswith("cgroup"):
        assert row["cgroup"]["current"] >= 20 * MiB
    else:
        assert row["cgroup"] is None
    response = await client.get("/admin/stats", headers={"Authorization": f"Bearer {TOKEN}"})
    assert (await response.json())["agent_memory"]["rss_bytes"] >= row["rss_bytes"]


async def test_admin_rows_carry_the_other_limits_and_the_process_count(aiohttp_client, make_config):
    app = create_app(make_config(admin_token=TOKEN, cpu_limit=0.5, max_pids=16))
    client, sup = await aiohttp_client(app), app[SUPERVISOR]
    s = await live_session(sup, "limited")
    row = (await admin_rows(client))["limited"]
    controls = sup.limiter.controls
    assert row["limits"] == {
        "cpu": {"limit": 0.5, "mechanism": controls["cpu"].mechanism},
        "pids": {"limit": 16, "mechanism": controls["pids"].mechanism},
        "open_files": {"limit": sup.config.max_open_files, "mechanism": "rlimit"},
    }
    if controls["pids"].mechanism.startswith("cgroup"):
        assert row["processes"] == 1  # the agent alone, counted by its pids cgroup
    else:
        assert row["processes"] is None
    assert row["open_fds"] == len(os.listdir(f"/proc/{s.pid}/fd"))
    health = sup.health()["limit"]  # what the admin /health shows: each mechanism beside memory's
    assert (health["cpu"]["mechanism"], health["pids"]["limit"]) == (controls["cpu"].mechanism, 16)


async def test_admin_cpu_percent_busy_versus_idle(served):
    client, sup = served
    busy, idle = await live_session(sup, "spinner"), await live_session(sup, "sleeper")
    await admin_rows(client)  # a pass: the start of the interval
    await sup.command(busy, "spin", {"seconds": 1.5})  # longer than the figures' one-second cache
    rows = await admin_rows(client)
    # A core's worth of spinning reads 100; on a loaded shared machine it gets less, never ~0.
    assert rows["spinner"]["cpu_percent"] > 10 > 3 > rows["sleeper"]["cpu_percent"], rows


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
