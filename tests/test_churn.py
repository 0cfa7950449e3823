"""Churn: thousands of sessions created, used and ended every way a session ends, with the
supervisor's fds, threads, memory and registry staying flat and nothing stale left on disk.

CI runs CORRAL_CHURN_SESSIONS (default 2,000); ``bench/soak.py`` runs 10,000 with the same code.
"""

import json

import pytest

from tests.chaos_kit import scaled
from tests.churn_kit import churn

pytestmark = pytest.mark.slow

# Bounds against a baseline taken after a warm-up churn of the same kind (all sessions ended).
MAX_FD_GROWTH = 8
MAX_THREAD_GROWTH = 2
MAX_RSS_GROWTH_MIB = 48


async def test_churn_leaves_nothing_behind(make_supervisor):
    sup = await make_supervisor(idle_timeout=0.5, restart_window=0.5, max_sessions=2000)
    report = await churn(sup, sessions=scaled("churn_sessions", 2000), concurrency=32)
    print(json.dumps(report, indent=1))
    assert report["violations"] == []
    assert sum(report["ended"].values()) == report["sessions"]
    assert set(report["ended"]) == {"reaped", "killed", "crashed", "ended"}
    growth = report["growth"]
    assert growth["fds"] <= MAX_FD_GROWTH, growth
    assert growth["threads"] <= MAX_THREAD_GROWTH, growth
    assert growth["rss_mib"] <= MAX_RSS_GROWTH_MIB, growth
    assert report["max_sessions_in_memory"] <= 4 * 32, report  # the registry does not grow with churn
    assert report["stale_run_dir"] == [] and report["stale_cgroups"] == []
