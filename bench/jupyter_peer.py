"""The peer: a Jupyter kernel (jupyter_client + ipykernel) — start time and idle memory."""

import statistics
import time

import psutil

from bench.footprint import memory


def available() -> str | None:
    """None when jupyter_client and ipykernel are importable, else why not."""
    try:
        import ipykernel  # noqa: F401
        import jupyter_client  # noqa: F401
    except ImportError as exc:
        return f"not installed ({exc.name}); pip install -e '.[bench]'"
    return None


def measure(n: int = 5) -> dict:
    """Start n kernels one after another: seconds start -> ready (kernel_info answered), idle USS/PSS."""
    from jupyter_client.manager import start_new_kernel

    starts, uss, pss = [], [], []
    for _ in range(n):
        begin = time.perf_counter()
        km, kc = start_new_kernel(kernel_name="python3", startup_timeout=60)
        starts.append(time.perf_counter() - begin)
        try:
            kc.execute_interactive("1", timeout=30, output_hook=lambda msg: None)  # one cell, like one chat turn, then idle
            mem = memory([psutil.Process(km.provisioner.pid)])
            uss.append(mem["uss"])
            pss.append(mem["pss"])
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
    return {"start_median": statistics.median(starts), "uss_median": statistics.median(uss),
            "pss_median": statistics.median(pss), "n": n}
