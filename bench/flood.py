"""``python -m bench.flood``: 8 sessions print ``\\x01`` lines as fast as they can (issue 19 item 6).

Prints how much the server's log grew over the flood, against the bound the output budgets allow
(8 × (BYTE_BURST + BYTE_RATE × seconds)), and the chat latency of a ninth, quiet session meanwhile.
"""

import argparse
import concurrent.futures
import json
import os
import time
import urllib.request

from bench import footprint, server
from corral.supervisor.agent_output import BYTE_BURST, BYTE_RATE

FLOODERS = 8


def _post(url: str, path: str, body: dict) -> float:
    """One POST; its seconds."""
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
    return time.perf_counter() - start


def main(argv=None) -> None:
    """Run the flood and print one JSON line of figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__)
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args(argv)
    with server.corral("memory", agent="bench.agents:FloodAgent", log_level="info") as srv:
        for sid in ["quiet", *(f"flood{i}" for i in range(FLOODERS))]:
            _post(srv.url, "/api/chat", {"message": "hi", "session_id": sid})
        log = os.path.join(srv.tmp.name, "server.log")
        before, quiet = os.path.getsize(log), []
        with concurrent.futures.ThreadPoolExecutor(FLOODERS) as pool:
            floods = [pool.submit(_post, srv.url, "/api/mcp-command",
                                  {"command": "flood", "args": {"seconds": args.seconds}, "session_id": f"flood{i}"})
                      for i in range(FLOODERS)]
            while not all(f.done() for f in floods):
                quiet.append(_post(srv.url, "/api/chat", {"message": "x", "session_id": "quiet"}))
        grown = os.path.getsize(log) - before
    bound = FLOODERS * (BYTE_BURST + BYTE_RATE * args.seconds)
    print(json.dumps({"seconds": args.seconds, "log_growth_mb": round(grown / 1e6, 2), "bound_mb": round(bound / 1e6, 2),
                      "quiet_turns": len(quiet), "quiet_p50_ms": round(footprint.percentile(quiet, 50) * 1000, 2),
                      "quiet_p99_ms": round(footprint.percentile(quiet, 99) * 1000, 1)}))


if __name__ == "__main__":
    main()
