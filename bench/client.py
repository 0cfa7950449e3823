"""The asyncio HTTP client of the suite, run in its own process (``python -m bench.client MODE URL``).

Modes print one JSON line:
  cold    — first POST /api/chat of ``--n`` new sessions, one after another: latency of each
  create  — bring ``--n`` new sessions live with ``--concurrency`` clients: wall time
  warm    — the wrk load (``chat.lua``) for machines without wrk
  stream  — SSE: time to first ``delta`` and chunks/s for ``--n`` sessions at once
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid

import aiohttp


async def _post_chat(http: aiohttp.ClientSession, url: str, sid: str, message: str = "hello") -> None:
    """One chat turn; raise on anything but 200."""
    async with http.post(url + "/api/chat", json={"message": message, "session_id": sid}) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"POST /api/chat -> {r.status}: {await r.text()}")


async def cold(url: str, n: int, prefix: str) -> dict:
    """Seconds from sending the first message of a new session to its reply, for n sessions."""
    times = []
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            sid = f"{prefix}-{uuid.uuid4().hex[:12]}"
            start = time.perf_counter()
            await _post_chat(http, url, sid)
            times.append(time.perf_counter() - start)
    return {"times": times}


async def create(url: str, n: int, concurrency: int, prefix: str) -> dict:
    """Wall seconds to bring n new sessions live (each answers its first message), and the refusals by status/code."""
    ids = iter(range(n))
    refused: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker():
            for i in ids:
                async with http.post(url + "/api/chat", json={"message": "hello", "session_id": f"{prefix}-{i}"}) as r:
                    body = await r.read()
                    if r.status != 200:
                        code = json.loads(body).get("error", {}).get("code", "?") if body[:1] == b"{" else "?"
                        refused[f"{r.status} {code}"] = refused.get(f"{r.status} {code}", 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return {"seconds": time.perf_counter() - start, "refused": refused}


async def warm(url: str, connections: int, sessions: int, seconds: float, prefix: str) -> dict:
    """wrk's figures from a Python client: every client on a session of its own."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as http:
        stop = time.perf_counter() + seconds

        async def client(i: int):
            turn = i  # client i's k-th request goes to session (i + k * connections) mod sessions: all get turns
            while time.perf_counter() < stop:
                sid = f"{prefix}-{turn % sessions}"
                turn += connections
                t = time.perf_counter()
                await _post_chat(http, url, sid)
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(connections)))
        elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "duration_us": int(elapsed * 1e6), "status_errors": 0, "socket_errors": 0,
            "p50_us": int(q[49] * 1e6), "p90_us": int(q[89] * 1e6), "p99_us": int(q[98] * 1e6),
            "mean_us": statistics.fmean(latencies) * 1e6}


async def stream(url: str, n: int, prefix: str) -> dict:
    """Open the SSE stream of n sessions, send each a message, time the deltas."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        ids = [f"{prefix}-{i}" for i in range(n)]
        await asyncio.gather(*(_post_chat(http, url, sid) for sid in ids))  # live before timing
        results = await asyncio.gather(*(_one_stream(http, url, sid) for sid in ids))
    return {"first_delta": [r[0] for r in results], "chunks": sum(r[1] for r in results),
            "seconds": max(r[2] for r in results)}


async def _one_stream(http: aiohttp.ClientSession, url: str, sid: str) -> tuple[float, int, float]:
    """(seconds to first delta, deltas, seconds to the stored reply) for one streamed turn."""
    async with http.get(url + "/api/chat/stream", params={"session_id": sid}) as r:
        if r.status != 200:
            raise RuntimeError(f"GET /api/chat/stream -> {r.status}")
        events = _events(r)
        while (await anext(events))[0] != "state":
            pass  # the snapshot on connect
        start = time.perf_counter()
        async with http.post(url + "/api/chat", json={"message": "x", "session_id": sid, "wait": False}) as post:
            await post.read()
        first, chunks = None, 0
        async for kind, data in events:
            if kind == "delta":
                chunks += 1
                if first is None:
                    first = time.perf_counter() - start
            elif (kind == "message" and data.get("role") == "assistant") or kind in ("error", "end"):
                break
        return first or 0.0, chunks, time.perf_counter() - start


async def _events(r: aiohttp.ClientResponse):
    """Yield (event name, JSON data) from an SSE response."""
    kind, data = "message", ""
    async for raw in r.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif line == "":
            if data:
                yield kind, json.loads(data)
            kind, data = "message", ""


def main(argv=None) -> None:
    """Run one mode and print its JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("cold", "create", "warm", "stream"))
    parser.add_argument("url")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--prefix", default="b")
    a = parser.parse_args(argv)
    if a.mode == "cold":
        result = asyncio.run(cold(a.url, a.n, a.prefix))
    elif a.mode == "create":
        result = asyncio.run(create(a.url, a.n, a.concurrency, a.prefix))
    elif a.mode == "warm":
        result = asyncio.run(warm(a.url, a.connections, a.sessions, a.seconds, a.prefix))
    else:
        result = asyncio.run(stream(a.url, a.n, a.prefix))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
