"""Memory and CPU of a set of processes, as psutil reports them."""

import contextlib
import time

import psutil


def memory(procs: list[psutil.Process]) -> dict:
    """Total USS and PSS (bytes) of the processes, and how many could be read."""
    uss = pss = counted = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            info = proc.memory_full_info()
            uss += info.uss
            pss += info.pss
            counted += 1
    return {"uss": uss, "pss": pss, "count": counted}


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds the processes have used so far."""
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def idle_cpu(groups: dict[str, list[psutil.Process]], seconds: float) -> dict:
    """CPU % (of one core) each group of processes used over ``seconds``, and the whole machine's %."""
    before = {name: cpu_seconds(procs) for name, procs in groups.items()}
    machine_before = psutil.cpu_times()
    time.sleep(seconds)  # the measurement window itself
    machine_after = psutil.cpu_times()
    out = {name: (cpu_seconds(procs) - before[name]) / seconds * 100 for name, procs in groups.items()}
    busy = sum(machine_after) - sum(machine_before)
    idle = (machine_after.idle - machine_before.idle) + (machine_after.iowait - machine_before.iowait)
    out["machine"] = (busy - idle) / busy * 100 if busy else 0.0
    return out


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]
