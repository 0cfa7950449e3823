"""What big agent snapshots cost the supervisor: ``python -m bench.snapshot``.

Six sessions of an agent whose ``snapshot()`` holds 15 MiB each: the supervisor's RSS growth with
the bound (``--max-snapshot-bytes``, default 64 KiB: the turns answer 502 and nothing is kept) and,
as the baseline in the same run, with the bound raised past the snapshots (they are kept, as before
there was a bound).
"""

import asyncio
import gc
import tempfile

import psutil

from corral.supervisor import Config, Supervisor, errors
from corral.supervisor.logs import configure

SESSIONS, MIB = 6, 15


async def growth(bound: int) -> float:
    """MiB the supervisor's RSS grew by after SESSIONS snapshots of MIB MiB each (bound in bytes)."""
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        sup = Supervisor(Config(agent="tests.agents.hostile:SnapshotHog", data_dir=tmp, database_url="memory://",
                                rate_limit=0, max_snapshot_bytes=bound))
        await sup.start()
        try:
            sessions = [await sup.get_or_create(f"s{i}", "t") for i in range(SESSIONS)]
            for s in sessions:
                await sup.ensure_live(s)
            gc.collect()
            before = psutil.Process().memory_info().rss
            for s in sessions:
                try:
                    await sup.command(s, "bloat", {"mib": MIB})
                except errors.AgentBadReply:
                    pass
            gc.collect()
            return (psutil.Process().memory_info().rss - before) / (1 << 20)
        finally:
            await sup.close()


def main() -> int:
    """Print both figures."""
    configure("warning", json=True)
    bounded = asyncio.run(growth(64 * 1024))
    unbounded = asyncio.run(growth(64 << 20))
    print(f"supervisor RSS growth, {SESSIONS} sessions x {MIB} MiB snapshots: {bounded:.1f} MiB with the "
          f"64 KiB bound, {unbounded:.1f} MiB with the bound past them (baseline)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
