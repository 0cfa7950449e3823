"""Streaming at the supervisor: time to the first chunk and chunks/s, one session and many at once.

Used when the SSE route is not there to measure over HTTP; it is the path every SSE ``delta``
takes before the web layer (agent -> ROUTER -> Turn.on_chunk).
"""

import asyncio
import statistics
import tempfile
import time

from bench.agents import StreamAgent
from corral.supervisor import Config, Supervisor
from corral.supervisor.logs import configure


async def _one_turn(sup: Supervisor, s) -> tuple[float, int, float]:
    """(seconds to first chunk, chunks, seconds to the reply) of one streamed turn."""
    first: list[float] = []
    chunks = 0
    start = time.perf_counter()

    def on_chunk(_text):
        nonlocal chunks
        chunks += 1
        if not first:
            first.append(time.perf_counter() - start)

    await sup.chat(s, "x", on_chunk=on_chunk)
    return first[0], chunks, time.perf_counter() - start


async def _run(concurrency: tuple[int, ...], rounds: int) -> dict:
    """Stream one turn per session for each level of concurrency."""
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        config = Config(agent="bench.agents:StreamAgent", data_dir=tmp, database_url="memory://", rate_limit=0,
                        max_sessions=max(concurrency) + 10)
        sup = Supervisor(config)
        await sup.start()
        try:
            out = {}
            for n in concurrency:
                sessions = [await sup.get_or_create(f"stream-{n}-{i}", "bench") for i in range(n)]
                await asyncio.gather(*(sup.ensure_live(s) for s in sessions))
                results, chunks, seconds = [], 0, 0.0
                for _ in range(max(1, rounds // n)):  # a single session gets several turns
                    begin = time.perf_counter()
                    batch = await asyncio.gather(*(_one_turn(sup, s) for s in sessions))
                    seconds += time.perf_counter() - begin
                    chunks += sum(r[1] for r in batch)
                    results += batch
                out[n] = {
                    "first_chunk_median": statistics.median(r[0] for r in results),
                    "chunks_per_second": chunks / seconds,
                    "chunks_per_turn": StreamAgent.chunks,
                }
            return out
        finally:
            await sup.close()


def measure(concurrency: tuple[int, ...] = (1, 100), rounds: int = 20) -> dict:
    """Run the streaming figures on a fresh supervisor (``rounds`` turns for the single session)."""
    configure("warning")
    return asyncio.run(_run(concurrency, rounds))
