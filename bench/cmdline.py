"""How long a secret flag stays readable in /proc/PID/cmdline: ``python -m bench.cmdline``.

Starts ``corral serve --admin-token SECRET`` ``--runs`` times and reads its command line as another
process would, as fast as it can, from the moment it is started. Prints the medians of: the time
until the secret is gone (hidden first thing, web/argv_secrets.py), and, as the baseline measured
in the same runs, the time until the server sets its own title, which is when the secret went
away before it was hidden on purpose.
"""

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time


def one_run(tmp: str) -> tuple[float, float, int]:
    """(ms until the secret is hidden, ms until the supervisor's title, reads that saw the secret)."""
    token = secrets.token_hex(16)
    cmd = [sys.executable, "-c", "from corral.web.cli import main; raise SystemExit(main())", "serve",
           "--port", "0", "--data-dir", tmp, "--database-url", "memory://", "--admin-token", token]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    hidden = titled = None
    seen = 0
    try:
        while titled is None and time.perf_counter() - started < 30:
            try:
                with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                    line = f.read()
            except OSError:
                continue
            now = (time.perf_counter() - started) * 1000
            if token.encode() in line:
                seen += 1
            elif hidden is None and b"-c" in line:  # the exec is done and the secret is no longer shown
                hidden = now
            if b"corral: supervisor" in line:
                titled = now
    finally:
        proc.kill()
        proc.wait()
    return hidden, titled, seen


def main(argv=None) -> int:
    """Print the medians."""
    parser = argparse.ArgumentParser(prog="python -m bench.cmdline", description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        for _ in range(args.runs):
            runs.append(one_run(tmp))
    hidden = statistics.median(r[0] for r in runs)
    titled = statistics.median(r[1] for r in runs)
    print(f"--admin-token readable in /proc/PID/cmdline: median {hidden:.1f} ms from exec "
          f"(baseline, until the supervisor's title: {titled:.1f} ms); "
          f"reads that saw it: median {statistics.median(r[2] for r in runs):.0f} of {args.runs} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
