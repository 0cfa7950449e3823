"""The cost of persistence: chat round trips per second with SQLite, PostgreSQL and no store.

Every round trip commits the user message before it reaches the agent and the reply before it
is returned, so the store is on the critical path twice per turn. One run measures every
backend, through the supervisor and over HTTP, with the rounds of the backends interleaved so
drift in the machine's load hits all of them alike; it prints the median of the rounds and the
ratio against the memory store ("no store": same code path, nothing durable).

    .venv/bin/python bench/persistence.py [--database-url postgresql://...] [--rounds 7]

PostgreSQL is measured when --database-url or CORRAL_TEST_DATABASE_URL names one (in a scratch
schema that is dropped afterwards).
"""

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg
from aiohttp import web

from corral.supervisor import Config, Supervisor
from corral.supervisor.logs import configure
from corral.supervisor.store import create_store
from corral.web.app import create_app
from corral.web.keys import SUPERVISOR
from tests.procs import free_port

BASELINE = "memory"


def make_store(backend: str, data_dir: Path, database_url: str | None, schema: str):
    """An unopened store of one backend."""
    if backend == "sqlite":
        return create_store(None, data_dir / backend)
    if backend == "postgresql":
        return create_store(database_url, schema=schema)
    return create_store("memory:")


def make_config(data_dir: Path) -> Config:
    """Settings that keep limits out of the measurement."""
    return Config(data_dir=data_dir, run_dir=data_dir / "run", rate_limit=0, memory_limit=0,
                  mailbox_size=1024, idle_timeout=3600)


class Target:
    """One backend, reachable through its supervisor and over HTTP."""

    def __init__(self, backend: str, data_dir: Path, database_url: str | None, schema: str):
        self.backend = backend
        self.app = create_app(make_config(data_dir), store=make_store(backend, data_dir, database_url, schema))
        self.runner = web.AppRunner(self.app, access_log=None)
        self.url = ""

    @property
    def sup(self) -> Supervisor:
        return self.app[SUPERVISOR]

    async def start(self) -> None:
        """Start the app (and so the supervisor) on a loopback port."""
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        """Stop the app and its supervisor."""
        await self.runner.cleanup()


async def supervisor_turns(target: Target, session_ids: list[str], turns: int) -> int:
    """Each session chats ``turns`` times in sequence, sessions concurrently; number of round trips."""
    sup = target.sup

    async def one(sid: str) -> None:
        s = await sup.get_or_create(sid, "bench")
        for i in range(turns):
            await sup.chat(s, f"my note is {i}")

    await asyncio.gather(*(one(sid) for sid in session_ids))
    return len(session_ids) * turns


async def http_turns(target: Target, session_ids: list[str], turns: int, http: aiohttp.ClientSession) -> int:
    """The same over POST /api/chat."""

    async def one(sid: str) -> None:
        for i in range(turns):
            async with http.post(target.url + "/api/chat", json={"message": f"my note is {i}", "session_id": sid}) as r:
                assert r.status == 200, await r.text()
                await r.read()

    await asyncio.gather(*(one(sid) for sid in session_ids))
    return len(session_ids) * turns


async def measure(run, *args) -> float:
    """Round trips per second of one call of ``run``."""
    started = time.perf_counter()
    count = await run(*args)
    return count / (time.perf_counter() - started)


WORKLOADS = [
    # name, path, sessions, turns per session
    ("1 session, sequential", "supervisor", 1, 200),
    ("16 sessions, concurrent", "supervisor", 16, 25),
    ("1 session, sequential", "http", 1, 100),
    ("16 sessions, concurrent", "http", 16, 15),
]


async def run_bench(backends: list[str], rounds: int, database_url: str | None) -> dict:
    """Median round trips per second per (workload, backend)."""
    schema = f"corral_bench_{uuid.uuid4().hex[:10]}"
    results: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        targets = [Target(b, Path(tmp), database_url, schema) for b in backends]
        try:
            for t in targets:
                await t.start()
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
                for w, (name, path, sessions, turns) in enumerate(WORKLOADS):
                    for r in range(rounds + 1):  # round 0 warms up: spawns, caches, connections
                        for t in targets:
                            sids = [f"w{w}-s{k}" for k in range(sessions)]
                            if path == "supervisor":
                                rate = await measure(supervisor_turns, t, sids, turns)
                            else:
                                rate = await measure(http_turns, t, sids, turns, http)
                            if r:
                                results.setdefault((name, path, t.backend), []).append(rate)
        finally:
            for t in targets:
                await t.close()
            if "postgresql" in backends:
                await drop_schema(database_url, schema)
    return {key: statistics.median(rates) for key, rates in results.items()}


async def drop_schema(database_url: str, schema: str) -> None:
    """Remove the scratch schema."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def print_table(medians: dict, backends: list[str], rounds: int) -> None:
    """Markdown table: medians and ratios against the memory store."""
    print(f"chat round trips per second, median of {rounds} rounds (ratio = backend / {BASELINE})\n")
    head = " | ".join(f"{b} rt/s | ratio" if b != BASELINE else f"{b} rt/s" for b in backends)
    print(f"| path | workload | {head} |")
    print("|---|---|" + "---:|" * sum(1 if b == BASELINE else 2 for b in backends))
    for name, path, _, _ in WORKLOADS:
        base = medians[(name, path, BASELINE)]
        cells = []
        for b in backends:
            rate = medians[(name, path, b)]
            cells.append(f"{rate:,.0f}" if b == BASELINE else f"{rate:,.0f} | {rate / base:.2f}")
        print(f"| {path} | {name} | {' | '.join(cells)} |")


def main() -> None:
    """Parse flags, run, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("CORRAL_TEST_DATABASE_URL"))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    configure("error", json=True)
    backends = [BASELINE, "sqlite"] + (["postgresql"] if args.database_url else [])
    medians = asyncio.run(run_bench(backends, args.rounds, args.database_url))
    print_table(medians, backends, args.rounds)
    if not args.database_url:
        print("\n(PostgreSQL not measured: pass --database-url or set CORRAL_TEST_DATABASE_URL)")


if __name__ == "__main__":
    main()
