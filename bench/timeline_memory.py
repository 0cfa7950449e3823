"""Memory of the dashboard's rings (supervisor/timeline.py) at N live sessions, measured with tracemalloc.

    python bench/timeline_memory.py [--sessions 10000] [--samples 200]

Prints the bytes the rings hold after ``samples`` passes (rings full and merging), in all and per session.
"""

import argparse
import tracemalloc

from corral.supervisor.timeline import Timeline


def main() -> None:
    """Fill a node's timeline with N sessions' samples and print what it holds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    sampled = {f"{i:08x}-0000-4000-8000-000000000000": (50 << 20, 0.01) for i in range(args.sessions)}
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    timeline = Timeline(10.0)
    for k in range(args.samples):
        timeline.sample(k * 10.0, args.sessions, sampled)
    held = tracemalloc.get_traced_memory()[0] - before
    print(f"sessions={args.sessions} samples={args.samples} rings={held / 1e6:.1f} MB "
          f"per_session={held / max(args.sessions, 1):.0f} B node_points={len(timeline.points)}")


if __name__ == "__main__":
    main()
