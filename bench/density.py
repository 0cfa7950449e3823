"""``python -m bench density``: N sandboxed sessions live on one node, and what each one costs (issue 21).

As root with every sandbox layer the host has, ``corral serve`` brings ``--density`` sessions live
(one turn each, 32 clients), then reads: memory all in (MemAvailable before − after ÷ N), where it
went (``/proc/meminfo`` fields and the slab caches that grew most, per session), the USS median of
sampled agents, descriptors per session in the server, the supervisor's CPU while they idle, and
warm chat p50/p99 with the turns spread over all of them (32 clients, then 4). ``corral serve`` runs on
the interpreter that runs the bench: compare Pythons with a venv of each.
"""

import json
import os
import random
import statistics

import psutil

from bench import footprint, server

MIB = 1024 * 1024
# /proc/meminfo fields that say where a session's bytes go (user pages by kind, then the kernel's)
MEMINFO_FIELDS = ("AnonPages", "Shmem", "Cached", "PageTables", "KernelStack", "SUnreclaim", "SReclaimable", "Percpu")
USS_SAMPLE = 200
# closed-loop clients of the warm phase: 32 keep the machine busy (their p99 is mostly queueing behind each
# other), 4 leave it room (the p99 of a turn on an agent cold in the caches among N)
WARM_CLIENTS = (32, 4)
UID_BASE = 200000  # away from the default range 60000-60999 other servers on the host may be using


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, rest = line.split(":", 1)
            out[name] = int(rest.split()[0]) * 1024
    return out


def slabs() -> dict[str, int]:
    """Bytes held by each slab cache (/proc/slabinfo: active objects × object size); {} if unreadable."""
    out = {}
    try:
        with open("/proc/slabinfo") as f:
            for line in f.readlines()[2:]:
                parts = line.split()
                out[parts[0]] = int(parts[1]) * int(parts[3])
    except OSError:
        pass
    return out


def memory_cgroup_root() -> str | None:
    """Where the memory controller is mounted (cgroup v1's own hierarchy, else the unified one); None if nowhere."""
    unified = None
    with open("/proc/mounts") as f:
        for line in f:
            _, where, kind, options = line.split()[:4]
            if kind == "cgroup" and "memory" in options.split(","):
                return where
            if kind == "cgroup2":
                unified = where
    return unified


def shrinker_map_bytes(count: int = 20) -> float | None:
    """Unreclaimable slab one new memory cgroup takes in kmalloc-1k, measured with ``count`` empty ones.

    The kernel gives every memory cgroup one 520-byte unit (a kmalloc-1k object) per 64 memory-aware
    shrinker ids, sized by the most such shrinkers the host ever had at once (every mounted superblock
    has one, and the number never shrinks until reboot). None where it cannot be measured (not root).
    """
    root = memory_cgroup_root()
    if root is None or os.geteuid() != 0:
        return None
    parent = os.path.join(root, f"corral-density-probe-{os.getpid()}")
    try:
        os.mkdir(parent)
    except OSError:
        return None
    made = []
    try:
        before = _active_objects("kmalloc-1k")
        for i in range(count):
            os.mkdir(os.path.join(parent, str(i)))
            made.append(os.path.join(parent, str(i)))
        return (_active_objects("kmalloc-1k") - before) * 1024 / count
    except OSError:
        return None
    finally:
        for path in reversed(made):
            os.rmdir(path)
        os.rmdir(parent)


def _active_objects(cache: str) -> int:
    """Active objects of one slab cache (/proc/slabinfo)."""
    with open("/proc/slabinfo") as f:
        for line in f:
            if line.startswith(cache + " "):
                return int(line.split()[1])
    return 0


USS_KINDS = ("anonymous mappings", "C heap", "libpython", "python binary", "other libraries", "stack", "other")
USS_KIND_SAMPLE = 20


def uss_by_kind(pid: int) -> dict[str, int]:
    """Bytes of ``pid``'s pages mapped by it alone (its USS), by the kind of mapping they are in.

    Anonymous mappings are CPython's object arenas and large buffers; the C heap is malloc's brk
    area; libpython is the interpreter's static data (small ints, static types, the type cache).
    """
    out: dict[str, int] = {}
    try:
        maps = psutil.Process(pid).memory_maps(grouped=True)  # /proc/PID/smaps, summed by path
    except psutil.Error:
        return out
    for mapping in maps:
        kind = _kind(mapping.path)
        out[kind] = out.get(kind, 0) + mapping.private_clean + mapping.private_dirty
    return out


def _kind(path: str) -> str:
    """Which of USS_KINDS a mapping of ``path`` (psutil's name for it) is."""
    special = {"[anon]": "anonymous mappings", "": "anonymous mappings", "[heap]": "C heap", "[stack]": "stack"}
    if path in special:
        return special[path]
    name = os.path.basename(path)
    if name.startswith("libpython"):
        return "libpython"
    if name.startswith("python"):
        return "python binary"
    if ".so" in name:
        return "other libraries"
    return "other"


def memory_threads() -> list[psutil.Process]:
    """The kernel threads whose work grows with the pages N agents share: DAMON's, reclaim's and KSM's.

    A DAMON or reclaim pass over a page the zygote shares with N agents walks its N mappings
    (docs/benchmarks.md), so on a host running them their CPU is part of what idle sessions cost.
    """
    found = []
    for proc in psutil.process_iter(["name"]):
        if (proc.info["name"] or "").startswith(("kdamond", "kswapd", "ksmd")):
            found.append(proc)
    return found


def fd_count(pid: int) -> int:
    """Open descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def run(table, args, client) -> None:
    """Bring ``args.density`` sessions live and add the figures to ``table``."""
    n = args.density
    uids = f"{UID_BASE}-{UID_BASE + n + 99}"
    flags = dict(flag.split("=", 1) for flag in args.serve_flag)  # e.g. agent_disk=0
    with server.corral("memory", args.loop, max_sessions=n + 100, sandbox="strict" if os.geteuid() == 0 else "auto",
                       sandbox_uid_range=uids, **flags) as srv:
        sup = srv.process()
        client("create", srv.url, n=10, concurrency=10, prefix="warmup")  # fault in the zygote's and server's paths
        map_before = shrinker_map_bytes()
        fds_before, mem_before, slab_before = fd_count(sup.pid), meminfo(), slabs()
        created = client("create", srv.url, n=n, concurrency=32, prefix="dense")
        mem_after, slab_after, fds_after = meminfo(), slabs(), fd_count(sup.pid)
        map_after = shrinker_map_bytes()
        live = json.loads(_get(srv.url + "/health"))["live_sessions"] - 10
        refused = ", ".join(f"{count} × {what}" for what, count in created.get("refused", {}).items()) or "none"
        table.add(f"density: bring {n} sandboxed sessions live (32 clients)",
                  f"{created['seconds']:.1f} s, {live} live, refused: {refused}")
        n = max(1, live)  # the figures per session are per session that came up
        _memory_rows(table, n, mem_before, mem_after, slab_before, slab_after)
        if map_before is not None and map_after is not None:
            table.add("density: kernel shrinker map per memory cgroup (kmalloc-1k), before / with the sessions live",
                      f"{map_before / 1024:.0f} / {map_after / 1024:.0f} KiB (~{map_after / 1024 * 64:.0f} superblocks "
                      "at most ever on this host)")
        agents = srv.agents()
        sample = random.Random(21).sample(agents, min(USS_SAMPLE, len(agents)))
        uss = [footprint.memory([p])["uss"] for p in sample]
        table.add(f"density: USS median of {len(sample)} sampled agents", f"{statistics.median(uss) / 1e6:.2f} MB",
                  target="<= 1.9 MB")
        kinds = [uss_by_kind(p.pid) for p in sample[:USS_KIND_SAMPLE]]
        table.add(f"density: an agent's USS by kind, KiB (median of {len(kinds)})",
                  ", ".join(f"{kind} {statistics.median(k.get(kind, 0) for k in kinds) / 1024:.0f}"
                            for kind in USS_KINDS))
        table.add("density: descriptors per session in the server", f"{(fds_after - fds_before) / n:.2f}",
                  target="<= 1")
        table.add("density: supervisor RSS", f"{sup.memory_info().rss / MIB:.0f} MiB")
        cpu = footprint.idle_cpu({"supervisor": [sup], "kernel": memory_threads()}, args.idle_seconds)
        table.add(f"density: supervisor CPU while {live} idle ({args.idle_seconds:g} s)", f"{cpu['supervisor']:.2f} %",
                  target="<= 1 %")
        table.add(f"density: while {live} idle, the kernel's memory threads (kdamond, kswapd, ksmd) / the whole machine",
                  f"{cpu['kernel']:.1f} % of a core / {cpu['machine']:.1f} % of all cores")
        for connections in WARM_CLIENTS:  # saturating the 2 cores, then a load that leaves them room
            warm = client("warm", srv.url, connections=connections, sessions=n, seconds=args.seconds, prefix="dense")
            table.add(f"density: warm chat across the {n} sessions, {connections} clients: p50 / p99 at the rate it made",
                      f"{warm['p50_us'] / 1000:.2f} / {warm['p99_us'] / 1000:.2f} ms at "
                      f"{warm['requests'] / (warm['duration_us'] / 1e6):,.0f} chats/s", target="p99 <= 20 ms")
        table.add("density: error lines in the server's log", _errors(os.path.join(srv.tmp.name, "server.log")),
                  target="none")


def _errors(path: str) -> str:
    """How many error-level lines the server logged, by event."""
    events: dict[str, int] = {}
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("{") and '"level": "error"' in line:
                event = json.loads(line).get("event", "?")
                events[event] = events.get(event, 0) + 1
    return ", ".join(f"{count} {event}" for event, count in events.items()) or "none"


def _memory_rows(table, n: int, before: dict, after: dict, slab_before: dict, slab_after: dict) -> None:
    """Memory all in per session, and the fields and slab caches it went to."""
    all_in = (before["MemAvailable"] - after["MemAvailable"]) / n
    table.add("density: memory per session all in (MemAvailable before - after, / N)", f"{all_in / MIB:.2f} MiB",
              target="<= 2.0 MiB")
    parts = ", ".join(f"{k} {(after[k] - before[k]) / n / 1024:.0f}" for k in MEMINFO_FIELDS if k in after)
    table.add("density: where it went, KiB per session (/proc/meminfo)", parts)
    grown = sorted(((slab_after.get(k, 0) - v) / n, k) for k, v in slab_before.items())[::-1][:8]
    if grown:
        table.add("density: slab caches that grew most, KiB per session",
                  ", ".join(f"{name} {size / 1024:.1f}" for size, name in grown))


def _get(url: str) -> str:
    """GET a URL."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()

