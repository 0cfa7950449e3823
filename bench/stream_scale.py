"""``python -m bench.stream_scale``: many sessions streaming at once (issue 21's streaming figure).

N sessions each stream a delta ``--rate`` times a second for ``--seconds`` over SSE (the agent
``bench.agents:TickAgent`` stamps each delta with the wall time it made it); against a bare aiohttp
SSE handler streaming from in-process generators at the same rate (``bench.bare``'s ``/ticks``), in
the same run. Figures: deltas per second sustained (all streams together) and the latency of each
delta from its making to the client (p50, p99). The client runs in processes of its own
(``--clients``), each with N / clients streams; on a small machine the client's own CPU bounds both.
"""

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

import aiohttp

from bench import footprint, server


async def _deltas(response: aiohttp.ClientResponse, latencies: list[float], until=("end",)) -> int:
    """Read SSE events; record each delta's latency; stop at an event in ``until`` or an assistant message."""
    kind, count = "message", 0
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data = json.loads(line[5:])
            if kind == "delta":
                latencies.append(time.time() - float(data["text"]))
                count += 1
            elif kind in until or (kind == "message" and data.get("role") == "assistant"):
                return count
    return count


async def _corral_stream(http, url: str, sid: str, rate: float, seconds: float, latencies: list[float]) -> int:
    """One session's SSE stream while it answers one message with rate × seconds deltas."""
    async with http.get(url + "/api/chat/stream", params={"session_id": sid}) as r:
        async for raw in r.content:  # the state snapshot on connect: the stream is joined
            if raw.startswith(b"event: state"):
                break
        async with http.post(url + "/api/chat", json={"message": f"{rate} {seconds}", "session_id": sid,
                                                      "wait": False}) as post:
            await post.read()
        return await _deltas(r, latencies, until=("end", "error"))


async def _bare_stream(http, url: str, rate: float, seconds: float, latencies: list[float]) -> int:
    """One stream of the bare handler."""
    async with http.get(url + "/ticks", params={"rate": rate, "seconds": seconds}) as r:
        return await _deltas(r, latencies)


async def client(url: str, mode: str, n: int, first: int, rate: float, seconds: float) -> dict:
    """Run n streams (sessions first .. first + n - 1); deltas, the wall seconds and a latency sample."""
    latencies: list[float] = []
    timeout = aiohttp.ClientTimeout(total=seconds * 10 + 120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:
        if mode == "corral":  # live before timing: the figure is streaming, not cold start
            for i in range(first, first + n, 50):
                await asyncio.gather(*(http.post(url + "/api/chat", json={"message": "0 0", "session_id": f"t{j}"})
                                       for j in range(i, min(first + n, i + 50))))
        start = time.perf_counter()
        if mode == "corral":
            counts = await asyncio.gather(*(_corral_stream(http, url, f"t{i}", rate, seconds, latencies)
                                            for i in range(first, first + n)))
        else:
            counts = await asyncio.gather(*(_bare_stream(http, url, rate, seconds, latencies) for _ in range(n)))
        wall = time.perf_counter() - start
    return {"deltas": sum(counts), "seconds": wall, "latencies": latencies[:: max(1, len(latencies) // 20000)]}


def _run_clients(url: str, mode: str, args) -> dict:
    """Start the client processes at once and merge their figures."""
    per = args.n // args.clients
    procs = [subprocess.Popen([sys.executable, "-m", "bench.stream_scale", "--client", url, "--mode", mode,
                               "--n", str(per), "--first", str(k * per), "--rate", str(args.rate),
                               "--seconds", str(args.seconds)], stdout=subprocess.PIPE, text=True,
                              env=server.bench_env()) for k in range(args.clients)]
    results = [json.loads(p.communicate()[0].splitlines()[-1]) for p in procs]
    latencies = [x for r in results for x in r["latencies"]]
    deltas = sum(r["deltas"] for r in results)
    return {"deltas": deltas, "expected": per * args.clients * int(args.rate * args.seconds),
            "per_second": deltas / max(r["seconds"] for r in results),
            "p50_ms": statistics.median(latencies) * 1000, "p99_ms": footprint.percentile(latencies, 99) * 1000}


def main(argv=None) -> None:
    """Measure both servers and print a table."""
    parser = argparse.ArgumentParser(prog="python -m bench.stream_scale", description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="streams at once")
    parser.add_argument("--rate", type=float, default=50.0, help="deltas a second per stream")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="corral", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        print(json.dumps(asyncio.run(client(args.client, args.mode, args.n, args.first, args.rate, args.seconds))))
        return
    figures = {}
    with server.bare() as bare:
        figures["bare aiohttp SSE handler"] = _run_clients(bare.url, "bare", args)
    with server.corral("memory", agent="bench.agents:TickAgent", max_sessions=args.n + 10) as srv:
        figures["corral (agent process per session)"] = _run_clients(srv.url, "corral", args)
    print(f"{args.n} streams × {args.rate:g} deltas/s for {args.seconds:g} s, {args.clients} client processes")
    print("| server | deltas/s sustained | deltas received / sent | delta latency p50 / p99 |")
    print("|---|---|---|---|")
    for name, f in figures.items():
        print(f"| {name} | {f['per_second']:.0f} | {f['deltas']} / {f['expected']} | "
              f"{f['p50_ms']:.1f} / {f['p99_ms']:.1f} ms |")


if __name__ == "__main__":
    main()
