"""The cluster's costs: one forward between nodes, and throughput with 1, 2 and 3 nodes behind nginx.

    .venv/bin/python bench/cluster.py [--database-url postgresql://...] [--rounds 5] [--turns 200]

Forward: two nodes, one session owned by the first; warm chat round trips sent one at a time to
the owner and through the other node (which relays them), in interleaved rounds; the median of
each path and their difference, the forward's cost. Throughput: 1, 2, then 3 real `corral serve`
nodes behind Debian's nginx with deploy/nginx.conf, ``--connections`` clients each on a session of
its own sending ``X-Session-Id`` (so nginx hashes them to their owners), for ``--seconds``. Every
node, nginx, PostgreSQL and the load generator share this machine's cores: with 2 cores, more
nodes cannot add CPU, so the figure shows what the cluster machinery costs, not how it scales on
separate machines. Each run uses a database of its own, dropped afterwards.
"""

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster_kit import NGINX, Cluster, create_database, drop_database  # noqa: E402


async def one_turn(http: aiohttp.ClientSession, url: str, sid: str) -> float:
    """Seconds for one chat round trip; raise on anything but 200."""
    started = time.perf_counter()
    async with http.post(f"{url}/api/chat", json={"session_id": sid, "message": "hello"},
                         headers={"X-Session-Id": sid}) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"POST /api/chat -> {r.status}: {await r.text()}")
    return time.perf_counter() - started


async def forward_cost(cluster: Cluster, rounds: int, turns: int) -> dict:
    """Median round trip to the owner and through another node, interleaved rounds."""
    owner, other = cluster.start_node(), cluster.start_node()
    sid = f"fwd-{uuid.uuid4().hex[:8]}"
    direct, relayed = [], []
    async with aiohttp.ClientSession() as http:
        await one_turn(http, owner.url, sid)  # claimed by the owner
        for _ in range(20):  # warm both paths (connections, the relay's pool)
            await one_turn(http, owner.url, sid)
            await one_turn(http, other.url, sid)
        for _ in range(rounds):
            direct.append(statistics.median([await one_turn(http, owner.url, sid) for _ in range(turns)]))
            relayed.append(statistics.median([await one_turn(http, other.url, sid) for _ in range(turns)]))
    d, r = statistics.median(direct), statistics.median(relayed)
    return {"direct_ms": d * 1e3, "relayed_ms": r * 1e3, "forward_ms": (r - d) * 1e3}


async def throughput(cluster: Cluster, nodes: int, connections: int, seconds: float) -> dict:
    """Warm chats/s through nginx in front of ``nodes`` nodes."""
    for _ in range(nodes):
        cluster.start_node()
    url = cluster.start_nginx()
    sids = [f"tp{nodes}-{uuid.uuid4().hex[:6]}-{i}" for i in range(connections)]
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(one_turn(http, url, sid) for sid in sids))  # spawned on their hashed nodes
        deadline = time.perf_counter() + seconds

        async def client(sid: str) -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                try:
                    latencies.append(await one_turn(http, url, sid))
                except (RuntimeError, aiohttp.ClientError):
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(client(sid) for sid in sids))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"nodes": nodes, "requests_per_s": len(latencies) / elapsed, "errors": errors,
            "p50_ms": latencies[len(latencies) // 2] * 1e3, "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3}


async def run(args) -> None:
    """Each measurement on a fresh cluster and database."""
    if NGINX is None:
        raise SystemExit("bench/cluster.py: nginx is not installed (apt-get install -y nginx)")
    print(f"cores: {os.cpu_count()}  turns/round: {args.turns}  rounds: {args.rounds}  "
          f"connections: {args.connections}  seconds: {args.seconds}")
    plans = [("forward", None)] + [("throughput", n) for n in (1, 2, 3)]
    for kind, nodes in plans:
        name, db_url = await create_database(args.database_url)
        cluster = Cluster(Path(tempfile.mkdtemp(prefix="corral-bench-cluster-")), db_url)
        try:
            if kind == "forward":
                f = await forward_cost(cluster, args.rounds, args.turns)
                print(f"forward: owner {f['direct_ms']:.2f} ms, through another node {f['relayed_ms']:.2f} ms, "
                      f"one forward costs {f['forward_ms']:.2f} ms (median of {args.rounds} round medians)")
            else:
                t = await throughput(cluster, nodes, args.connections, args.seconds)
                print(f"throughput: {t['nodes']} node(s) behind nginx: {t['requests_per_s']:.0f} chats/s, "
                      f"p50 {t['p50_ms']:.1f} ms, p99 {t['p99_ms']:.1f} ms, errors {t['errors']}")
        finally:
            await asyncio.to_thread(cluster.close)
            await drop_database(name, args.database_url)


def main(argv=None) -> None:
    """Parse flags and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("CORRAL_TEST_DATABASE_URL"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    if not args.database_url:
        raise SystemExit("bench/cluster.py: --database-url or CORRAL_TEST_DATABASE_URL is needed")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
