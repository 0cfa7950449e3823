"""What usage accounting adds to a warm turn: turns with it on and off, alternating, in one run.

A real supervisor (SQLite store, one demo agent) answers warm turns one after another; blocks of
``--turns`` turns run with the usage accounting listening (the ``turn`` event, the counts, a batch
write per 50 ms) and with it closed, alternately, so drift on a shared machine hits both alike.
Then what the turn's own path pays, alone: the ``turn`` event as ``complete`` publishes it, with the
accounting listening and without (then nobody wants it and it is not built).

    .venv/bin/python bench/usage.py [--turns 1000] [--blocks 6]
"""

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from corral.supervisor import Config, Supervisor
from corral.supervisor.logs import configure


async def block(sup: Supervisor, s, turns: int) -> list[float]:
    """Seconds of each warm turn of one block."""
    out = []
    for i in range(turns):
        started = time.perf_counter()
        await sup.chat(s, f"turn {i}")
        out.append(time.perf_counter() - started)
    return out


async def run(turns: int, blocks: int) -> None:
    """Alternate blocks with usage on and off; print the medians and the batches written."""
    configure("warning")
    with tempfile.TemporaryDirectory() as tmp:
        sup = Supervisor(Config(data_dir=Path(tmp) / "data", run_dir=Path(tmp) / "run", rate_limit=0))
        await sup.start()
        try:
            s = await sup.get_or_create("bench-usage", "bench")
            await block(sup, s, 200)  # warm up
            on, off = [], []
            for i in range(blocks):
                if i % 2:
                    await sup.usage.close()
                    off += await block(sup, s, turns)
                    sup.usage.start()
                else:
                    on += await block(sup, s, turns)
            batches = sup.usage.batches
            listened = event_cost(sup, s)
            await sup.usage.close()
            alone = event_cost(sup, s)
        finally:
            await sup.close()
    for name, times in (("usage off (baseline)", off), ("usage on", on)):
        print(f"{name:22} turns={len(times)} median={statistics.median(times) * 1e6:.0f} us "
              f"p90={statistics.quantiles(times, n=10)[-1] * 1e6:.0f} us")
    print(f"difference of medians: {(statistics.median(on) - statistics.median(off)) * 1e6:+.0f} us; "
          f"usage batches written: {batches}")
    print(f"the turn event on the turn's path: {listened * 1e6:.2f} us counted, {alone * 1e6:.2f} us without "
          f"usage (baseline): {(listened - alone) * 1e6:+.2f} us a turn")


def event_cost(sup: Supervisor, s, calls: int = 100_000, rounds: int = 5) -> float:
    """Seconds per turn event as Turns.complete sends it (best of ``rounds``, so load spikes drop out)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            if sup.events.wants("turn"):
                sup.events.publish_global("turn", session_id=s.id, tenant=s.tenant, status="done",
                                          in_bytes=12, out_bytes=40)
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def main() -> None:
    """Parse the flags and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--blocks", type=int, default=6)
    args = parser.parse_args()
    asyncio.run(run(args.turns, args.blocks))


if __name__ == "__main__":
    main()
