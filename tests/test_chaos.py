"""Chaos under load: 200 sessions, 64 clients, while agents are SIGKILLed, OOM-killed, crashed,
interrupted and killed by the admin. Nothing acknowledged is lost, nothing crosses sessions,
nothing leaks. Sizes scale with CORRAL_CHAOS_* (bench/soak.py runs the same code for longer).
"""

import json

import pytest
import time

from tests.chaos_kit import ADMIN_TOKEN, ChaosPlan, ChaosRun, agent_pids, client_session, running_app, scaled
from tests.procs import wait_gone

pytestmark = pytest.mark.slow

# Bounds on the supervisor process after the run, against the same 200 live sessions before it.
MAX_FD_GROWTH = 16  # a few sockets of a connection pool or the store may come and go
MAX_THREAD_GROWTH = 4
MAX_RSS_GROWTH_MIB = 64  # allocator high-water marks, not per-request leaks (the soak shows the trend)


async def test_chaos_under_load(make_config):
    plan = ChaosPlan(
        sessions=scaled("chaos_sessions", 200),
        clients=scaled("chaos_clients", 64),
        seconds=scaled("chaos_seconds", 10.0),
    )
    config = make_config(
        memory_limit=plan.memory_limit_mib * 2**20, max_restarts=10_000, admin_token=ADMIN_TOKEN,
        max_sessions=plan.sessions + 10, request_timeout=60.0,
    )
    async with running_app(config) as (app, url), client_session(plan.clients) as http:
        run = ChaosRun(app, url, http, plan)
        report = await run.run()
        pids = agent_pids(run.prefix)
        closing = time.monotonic()
    report.figures["shutdown_s"] = round(time.monotonic() - closing, 2)
    print(json.dumps(report.summary(), indent=1))
    print("\n".join(report.violations[:20]))
    assert report.violations == []
    assert report.actions["sigkill"] and report.actions["oom"] and report.actions["kill"]
    assert report.actions["interrupt"] and all(report.actions[f"crash_{k}"] for k in ("exit", "signal", "exception"))
    assert len(report.harmed) < plan.sessions  # some sessions were never harmed, and never failed
    growth = report.figures["growth"]
    assert growth["fds"] <= MAX_FD_GROWTH, growth
    assert growth["threads"] <= MAX_THREAD_GROWTH, growth
    assert growth["rss_mib"] <= MAX_RSS_GROWTH_MIB, growth
    assert wait_gone(sorted(pids), timeout=10) == []  # and the shutdown took every agent
