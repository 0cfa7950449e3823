"""Soak: the reliability tests' chaos and churn engines, longer and bigger, printing figures.

    .venv/bin/python bench/soak.py                      # 200 sessions x 64 clients x 300 s chaos, 10,000 churn
    .venv/bin/python bench/soak.py --seconds 60 --churn 2000

Same code as tests/test_chaos.py and tests/test_churn.py (tests/chaos_kit.py, tests/churn_kit.py);
the figures go to stdout as JSON and into docs/reliability.md by hand.
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout

from corral.supervisor import Config, Supervisor  # noqa: E402
from corral.supervisor.logs import configure  # noqa: E402
from tests.chaos_kit import ADMIN_TOKEN, ChaosPlan, ChaosRun, client_session, running_app  # noqa: E402
from tests.churn_kit import churn  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """The soak's knobs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200, help="chaos: sessions (default 200)")
    parser.add_argument("--clients", type=int, default=64, help="chaos: concurrent clients (default 64)")
    parser.add_argument("--seconds", type=float, default=300.0, help="chaos: seconds of load (default 300)")
    parser.add_argument("--churn", type=int, default=10_000, help="churn: sessions (default 10,000; 0 skips)")
    parser.add_argument("--concurrency", type=int, default=32, help="churn: sessions at once (default 32)")
    return parser.parse_args(argv)


def base_config(tmp: str, **overrides) -> Config:
    """A config with its data and run dirs under tmp (as the tests' make_config)."""
    values = dict(data_dir=Path(tmp) / "data", run_dir=Path(tmp) / "run", stop_timeout=2.0, rate_limit=0)
    values.update(overrides)
    return Config(**values)


async def soak_chaos(args, tmp: str) -> dict:
    """The chaos run, at soak size."""
    plan = ChaosPlan(sessions=args.sessions, clients=args.clients, seconds=args.seconds)
    config = base_config(tmp, memory_limit=plan.memory_limit_mib * 2**20, max_restarts=1_000_000,
                         admin_token=ADMIN_TOKEN, max_sessions=plan.sessions + 10, request_timeout=60.0)
    async with running_app(config) as (app, url), client_session(plan.clients) as http:
        report = await ChaosRun(app, url, http, plan).run()
    summary = report.summary()
    summary["violation_samples"] = report.violations[:10]
    return summary


async def soak_churn(args, tmp: str) -> dict:
    """The churn run, at soak size."""
    sup = Supervisor(base_config(tmp, idle_timeout=0.5, restart_window=0.5, max_sessions=args.concurrency * 4))
    await sup.start()
    try:
        return await churn(sup, sessions=args.churn, concurrency=args.concurrency)
    finally:
        await sup.close()


async def main(argv=None) -> int:
    """Run chaos, then churn; print both reports; exit 1 on any violation."""
    args = parse_args(argv)
    configure("error", json=True)
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="corral-soak-") as tmp:
        if args.seconds > 0:
            results["chaos"] = await soak_chaos(args, os.path.join(tmp, "chaos"))
            print(json.dumps({"chaos": results["chaos"]}, indent=1), flush=True)
        if args.churn > 0:
            results["churn"] = await soak_churn(args, os.path.join(tmp, "churn"))
            print(json.dumps({"churn": results["churn"]}, indent=1), flush=True)
    bad = results.get("chaos", {}).get("violations", 0) or results.get("churn", {}).get("violations")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
