"""What one process-stats pass costs for N live sessions (default 1000), and what the loop feels.

Starts a real supervisor with N real agents, then times ProcStats passes a second apart (on the
worker thread, as the server runs them while someone looks; each pass re-reads the USS of the
processes whose turn it is) and the event loop's worst lateness while a pass runs. Baselines in the
same run: a pass over one session (fixed overhead) and an RSS-only pass over the same N processes
(what USS, threads, fds and cgroup figures add).

    .venv/bin/python bench/procstats.py [--sessions 1000] [--passes 15]
"""

import argparse
import asyncio
import statistics
import tempfile
import time

import psutil

from corral.supervisor import Config, Supervisor
from corral.supervisor.logs import configure
from corral.supervisor.procstats import ProcStats


async def spawn(sup: Supervisor, n: int, batch: int = 50) -> list:
    """Start n sessions, ``batch`` at a time."""
    sessions = []
    for start in range(0, n, batch):
        group = [await sup.get_or_create(f"bench-{i}", f"tenant-{i % 10}") for i in range(start, min(n, start + batch))]
        await asyncio.gather(*(sup.ensure_live(s) for s in group))
        sessions += group
    return sessions


async def timed_passes(stats: ProcStats, passes: int, every: float = 0.0) -> tuple[list[float], float]:
    """Run passes ``every`` seconds apart; their seconds on the worker thread and the loop's worst lateness."""
    durations, worst_lag = [], 0.0
    for i in range(passes):
        if i and every:
            await asyncio.sleep(every)  # the server's cadence while someone looks
        stop = asyncio.Event()
        ticker = asyncio.ensure_future(_lag_probe(stop))
        await stats.refresh()
        stop.set()
        worst_lag = max(worst_lag, await ticker)
        durations.append(stats.last_pass_seconds)
    return durations, worst_lag


async def _lag_probe(stop: asyncio.Event, tick: float = 0.001) -> float:
    """Worst lateness of a 1 ms timer until ``stop``: how long the loop could not run."""
    worst = 0.0
    while not stop.is_set():
        due = time.perf_counter() + tick
        await asyncio.sleep(tick)
        worst = max(worst, time.perf_counter() - due)
    return worst


async def quiet_lag(seconds: float, rounds: int = 15) -> float:
    """The loop's worst lateness over as many windows as long as a pass, with no pass running."""
    worst = 0.0
    for _ in range(rounds):
        stop = asyncio.Event()
        probe = asyncio.ensure_future(_lag_probe(stop))
        await asyncio.sleep(seconds)
        stop.set()
        worst = max(worst, await probe)
    return worst


def rss_only_pass(pids: list[int]) -> float:
    """Seconds to read just RSS of every pid (the cheapest useful pass)."""
    started = time.perf_counter()
    for pid in pids:
        try:
            psutil.Process(pid).memory_info()
        except psutil.Error:
            pass
    return time.perf_counter() - started


async def main(n: int, passes: int) -> None:
    """Spawn, measure, print."""
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        config = Config(data_dir=f"{tmp}/data", run_dir=f"{tmp}/run", max_sessions=n + 10, rate_limit=0)
        sup = Supervisor(config)
        await sup.start()
        try:
            started = time.perf_counter()
            sessions = await spawn(sup, n)
            print(f"spawned {len(sessions)} agents in {time.perf_counter() - started:.1f} s; "
                  f"limit mechanism {sup.limiter.mechanism}")
            stats = ProcStats(sup, max_age=0)
            first = await timed_passes(stats, 1)
            later, lag = await timed_passes(stats, passes, every=1.0)
            one = ProcStats(_OneSession(sup), max_age=0)
            single, _ = await timed_passes(one, passes)
            rss = [rss_only_pass(list(sup.by_pid)) for _ in range(passes)]
            idle_lag = await quiet_lag(statistics.median(later))
            report(n, first[0][0], later, (lag, idle_lag), single, rss, stats)
        finally:
            await sup.close()


class _OneSession:
    """A view of the supervisor with only its first live agent (the fixed-cost baseline)."""

    def __init__(self, sup: Supervisor):
        pid, s = next(iter(sup.by_pid.items()))
        self.by_pid, self.limiter = {pid: s}, sup.limiter


def report(n, first, later, lag, single, rss, stats) -> None:
    """Print the figures."""
    med, med_single, med_rss = statistics.median(later), statistics.median(single), statistics.median(rss)
    print(f"first pass (every process new, every USS read): {first * 1000:.1f} ms = {first / n * 1e6:.0f} us/session")
    print(f"pass over {n} sessions: median {med * 1000:.1f} ms "
          f"(min {min(later) * 1000:.1f}, max {max(later) * 1000:.1f}) = {med / n * 1e6:.0f} us/session")
    print(f"pass over 1 session (baseline): median {med_single * 1000:.2f} ms")
    print(f"RSS-only read of {n} processes (baseline): median {med_rss * 1000:.1f} ms; "
          f"full figures cost {med / med_rss:.1f}x that")
    print(f"worst event-loop lateness of a 1 ms timer: {lag[0] * 1000:.1f} ms during passes, "
          f"{lag[1] * 1000:.1f} ms with no pass (baseline: the machine's own scheduling noise)")
    print(f"at one pass a second while someone looks: {med * 100:.1f}% of one core; nobody looking: 0")
    print(f"agents' memory: RSS {stats.total_rss() / 2**20:.0f} MiB, USS {stats.total_uss() / 2**20:.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=15, help="passes, one a second (default 15)")
    args = parser.parse_args()
    configure("warning")
    asyncio.run(main(args.sessions, args.passes))
