"""Spawning at the supervisor (issue 2): ``python -m bench.spawn`` prints medians for

- new session -> first reply, measured at the supervisor (no HTTP)
- USS and PSS per idle session with 200 sessions live
- time to bring 1000 sessions live, and CPU while they idle (corral's processes and the machine)
- agent death (SIGKILL) -> the supervisor knows (the session's ``end`` event)
"""

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time

import psutil

from bench import footprint
from corral.supervisor import Config, Supervisor
from corral.supervisor.logs import configure

MB = 1024 * 1024


async def first_reply(sup: Supervisor, n: int) -> list[float]:
    """Seconds from get_or_create of a new session to its first reply, n times in a row."""
    times = []
    for i in range(n):
        start = time.perf_counter()
        s = await sup.get_or_create(f"first-{i}", "bench")
        await sup.chat(s, "hello")
        times.append(time.perf_counter() - start)
    return times


async def bring_live(sup: Supervisor, prefix: str, n: int, concurrency: int) -> float:
    """Seconds to bring n new sessions live (spawned, READY, history handed over)."""
    ids = iter(range(n))

    async def worker():
        for i in ids:
            await sup.ensure_live(await sup.get_or_create(f"{prefix}-{i}", "bench"))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


async def death_noticed(sup: Supervisor, n: int) -> list[float]:
    """Seconds from SIGKILL of an idle agent to the supervisor's ``end`` event for it."""
    times = []
    for i in range(n):
        s = await sup.get_or_create(f"death-{i}", "bench")
        await sup.ensure_live(s)
        ended = asyncio.get_running_loop().create_future()
        unsubscribe = sup.events.subscribe_session(
            s.key, lambda e, f=ended: e["type"] == "end" and not f.done() and f.set_result(time.perf_counter()))
        start = time.perf_counter()
        os.kill(s.pid, signal.SIGKILL)
        times.append(await asyncio.wait_for(ended, 10) - start)
        unsubscribe()
    return times


def agents(sup: Supervisor) -> list[psutil.Process]:
    """The live sessions' processes."""
    return [psutil.Process(s.pid) for s in sup.list_sessions() if s.pid is not None]


async def run(args) -> list[tuple[str, str, str]]:
    """Every figure as (name, value, target)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        config = Config(agent="bench.agents:EchoAgent", data_dir=tmp, database_url=args.database_url,
                        rate_limit=0, max_sessions=args.sessions + 100, idle_timeout=3600,
                        immortal_heap=args.immortal_heap)
        sup = Supervisor(config)
        await sup.start()
        try:
            await first_reply(sup, 5)  # fault in the zygote's pages first
            t = await first_reply(sup, args.n)
            rows.append(("new session -> first reply (supervisor), median / p99",
                         f"{statistics.median(t) * 1000:.2f} / {footprint.percentile(t, 99) * 1000:.2f} ms", "<= 10 ms"))
            d = await death_noticed(sup, 20)
            rows.append(("agent SIGKILL -> supervisor's end event, median", f"{statistics.median(d) * 1000:.2f} ms",
                         "<= 5 ms"))
            await bring_live(sup, "mem", 200 - sup.count(), args.concurrency)
            mem = footprint.memory(agents(sup))
            rows.append((f"USS / PSS per idle session ({mem['count']} live)",
                         f"{mem['uss'] / mem['count'] / MB:.2f} / {mem['pss'] / mem['count'] / MB:.2f} MB", "<= 2 MB"))
            more = args.sessions - sup.count()
            seconds = await bring_live(sup, "scale", more, args.concurrency)
            rows.append((f"bring {more} more sessions live ({sup.count()} live), {args.concurrency} at a time",
                         f"{seconds:.2f} s ({seconds / more * 1000:.2f} ms each)", "1000 in <= 5 s"))
            me = psutil.Process()
            cpu = await asyncio.to_thread(footprint.idle_cpu, {"supervisor": [me], "corral": [me, *me.children(True)]},
                                          args.idle_seconds)
            rows.append((f"CPU while {sup.count()} idle, over {args.idle_seconds:g} s: supervisor / all corral",
                         f"{cpu['supervisor']:.2f} % / {cpu['corral']:.2f} %", ""))
            rows.append(("whole machine CPU meanwhile (other users included)", f"{cpu['machine']:.1f} %", "<= 2 %"))
        finally:
            await sup.close()
    return rows


def main(argv=None) -> int:
    """Print the figures as a table."""
    parser = argparse.ArgumentParser(prog="python -m bench.spawn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="new sessions timed for the first reply")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--database-url", default="memory://", help="store (default memory://; '' = SQLite)")
    parser.add_argument("--immortal-heap", default="auto", choices=("auto", "off"), help="corral serve's --immortal-heap")
    args = parser.parse_args(argv)
    configure("warning")
    rows = asyncio.run(run(args))
    print(f"command: python -m bench.spawn {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(json.dumps({"store": args.database_url or "sqlite"}))
    width = max(len(r[0]) for r in rows)
    for name, value, target in rows:
        print(f"{name.ljust(width)}  {value:<28} {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
