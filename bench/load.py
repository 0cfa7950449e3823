"""The load generator, in its own process: wrk with ``chat.lua`` (an asyncio client if wrk is missing)."""

import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def have_wrk() -> bool:
    """Whether wrk is installed (``apt-get install -y wrk``)."""
    return shutil.which("wrk") is not None


def warm_chat(url: str, *, connections: int, sessions: int, seconds: float, prefix: str, threads: int = 1) -> dict:
    """POST /api/chat from ``connections`` clients, one session each, for ``seconds``; wrk's figures.

    Returns requests, rps, p50/p90/p99 in ms and the error counts.
    """
    if not have_wrk():
        return _python_load(url, connections=connections, sessions=sessions, seconds=seconds, prefix=prefix)
    env = {**os.environ, "BENCH_PREFIX": prefix, "BENCH_SESSIONS": str(sessions), "BENCH_THREADS": str(threads)}
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
            "-s", os.path.join(HERE, "chat.lua"), url]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    line = [ln for ln in out.splitlines() if ln.startswith("{")][-1]
    return _figures(json.loads(line))


def _figures(raw: dict) -> dict:
    """wrk's microseconds -> requests/s and milliseconds."""
    seconds = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "rps": raw["requests"] / seconds if seconds else 0.0,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "errors": raw["status_errors"] + raw["socket_errors"],
    }


def _python_load(url: str, *, connections: int, sessions: int, seconds: float, prefix: str) -> dict:
    """The same load from ``python -m bench.client`` when wrk is not installed."""
    argv = [sys.executable, "-m", "bench.client", "warm", url, "--connections", str(connections),
            "--sessions", str(sessions), "--seconds", str(seconds), "--prefix", prefix]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=os.path.dirname(HERE)).stdout
    return _figures(json.loads(out.splitlines()[-1]))
