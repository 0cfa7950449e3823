"""The process figures in the admin API: they match /proc for the agent's pid, and CPU % tells a
session spinning a core from an idle one."""

import os

import pytest

pytest.importorskip("web.routes.admin", reason="the admin API (web/routes/admin.py) is not in this tree")

from tests.test_procstats import MiB, live_session, proc_rss, proc_status  # noqa: E402
from web.app import create_app  # noqa: E402

TOKEN = "figures-admin-token"


@pytest.fixture
async def served(aiohttp_client, make_config):
    """(client, supervisor) of a live app with an admin token."""
    app = create_app(make_config(admin_token=TOKEN))
    return await aiohttp_client(app), app["supervisor"]


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


async def test_admin_cpu_percent_busy_versus_idle(served):
    client, sup = served
    busy, idle = await live_session(sup, "spinner"), await live_session(sup, "sleeper")
    await admin_rows(client)  # a pass: the start of the interval
    await sup.command(busy, "spin", {"seconds": 1.5})  # longer than the figures' one-second cache
    rows = await admin_rows(client)
    # A core's worth of spinning reads 100; on a loaded shared machine it gets less, never ~0.
    assert rows["spinner"]["cpu_percent"] > 10 > 3 > rows["sleeper"]["cpu_percent"], rows
