"""``python -m bench``: every figure of issue 6 in one table, ratios taken in the same run.

Servers run as users run them (``corral serve`` and the bare aiohttp baseline, as subprocesses);
the load comes from wrk (``chat.lua``) or ``bench.client`` in processes of their own.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import psutil

from bench import density, footprint, jupyter_peer, load, server, stream

MB = 1024 * 1024


class Table:
    """Rows of figure | value | baseline | ratio | target, printed at the end."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, str, str]] = []

    def add(self, figure: str, value: str, baseline: str = "", ratio: str = "", target: str = "") -> None:
        """Add one row (and echo it, so a long run shows progress)."""
        self.rows.append((figure, value, baseline, ratio, target))
        print(f"  {figure}: {value} {('| ' + baseline) if baseline else ''} {ratio}", file=sys.stderr, flush=True)

    def render(self) -> str:
        """The table as Markdown."""
        head = ("figure", "corral", "baseline", "ratio", "target")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(5)]
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, self.rows)])


def ms(seconds: float) -> str:
    """Seconds as milliseconds."""
    return f"{seconds * 1000:.2f} ms"


def client(mode: str, url: str, **opts) -> dict:
    """Run ``bench.client`` in its own process and return its JSON."""
    argv = [sys.executable, "-m", "bench.client", mode, url]
    for name, value in opts.items():
        argv += ["--" + name, str(value)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=server.bench_env()).stdout
    return json.loads(out.splitlines()[-1])


# ------------------------------------------------------------------------------------------ warm

def warm(table: Table, args) -> None:
    """Warm chat over HTTP: bare handler, naive zmq round trip, corral (memory, SQLite); rounds interleaved."""
    servers = {"bare": server.bare(args.loop), "naive": server.bare(args.loop, "bench.naive_zmq"),
               "memory": server.corral("memory", args.loop), "sqlite": server.corral("sqlite", args.loop)}
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    started = []
    try:
        for srv in servers.values():
            started.append(srv.__enter__())
        for name, srv in servers.items():  # spawn the 64 sessions and warm the code paths
            load.warm_chat(srv.url, connections=64, sessions=64, seconds=2, prefix="warm")
        for _ in range(args.rounds):
            for name, srv in servers.items():
                runs[name].append(_warm_round(srv, args.seconds))
    finally:
        for srv in started:
            srv.stop()
    figures = ("rps", "p50_ms", "p99_ms", "server_us", "peers_us", "load_us")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in figures} for name, rs in runs.items()}
    errors = {name: sum(r["errors"] for r in rs) for name, rs in runs.items()}
    bare = med["bare"]
    table.add("warm: bare aiohttp handler, req/s (p50 / p99)", f"{bare['rps']:.0f} ({bare['p50_ms']:.2f} / "
              f"{bare['p99_ms']:.2f} ms)")
    naive = med["naive"]
    table.add("warm: bare handler + naive zmq.asyncio round trip to one child, req/s (p50)",
              f"{naive['rps']:.0f} ({naive['p50_ms']:.2f} ms)", f"{bare['rps']:.0f}", f"{naive['rps'] / bare['rps']:.2f}x")
    for name, label in (("memory", "memory store (pure transport)"), ("sqlite", "SQLite store (default)")):
        m = med[name]
        table.add(f"warm: corral, {label}, req/s", f"{m['rps']:.0f}", f"{bare['rps']:.0f}",
                  f"{m['rps'] / bare['rps']:.2f}x", ">= 0.7x")
        table.add(f"warm: corral, {label}, p50", f"{m['p50_ms']:.2f} ms", f"{bare['p50_ms']:.2f} ms",
                  f"{m['p50_ms'] / bare['p50_ms']:.2f}x", "<= 1.5x")
        table.add(f"warm: corral, {label}, p99", f"{m['p99_ms']:.2f} ms", f"{bare['p99_ms']:.2f} ms",
                  f"{m['p99_ms'] / bare['p99_ms']:.2f}x")
    for name, label in (("bare", "bare handler"), ("naive", "naive zmq (child)"), ("memory", "corral, memory (agents)"),
                        ("sqlite", "corral, SQLite (agents)")):
        m = med[name]
        table.add(f"warm: CPU per request, server / other side / load generator: {label}",
                  f"{m['server_us']:.0f} / {m['peers_us']:.0f} / {m['load_us']:.0f} µs")
    if not load.have_wrk():
        table.add("warm: note", "no wrk: the Python load generator is the limit, so these ratios say little "
                  "(apt-get install -y wrk)")
    if any(errors.values()):
        table.add("warm: errors (non-200 or socket)", json.dumps(errors))


def _warm_round(srv: server.Server, seconds: float) -> dict:
    """One warm round, with the CPU each side spent per request: where the time goes, every run.

    The server process (all its threads), its children (zygote and agents; the naive peer's
    child), and the load generator (wrk, reaped by this process, so it shows in RUSAGE_CHILDREN).
    """
    sides = {"server": [srv.process()], "peers": srv.process().children(recursive=True)}
    before = {side: footprint.cpu_seconds(procs) for side, procs in sides.items()}
    load_before = _reaped_children_cpu()
    result = load.warm_chat(srv.url, connections=64, sessions=64, seconds=seconds, prefix="warm")
    per_request = 1e6 / max(1, result["requests"])
    for side, procs in sides.items():
        result[f"{side}_us"] = (footprint.cpu_seconds(procs) - before[side]) * per_request
    result["load_us"] = (_reaped_children_cpu() - load_before) * per_request
    return result


def _reaped_children_cpu() -> float:
    """User + system CPU seconds of this process's children that have exited and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------------------ cold

def cold(table: Table, args) -> None:
    """First POST /api/chat of a new session -> reply, against a Jupyter kernel's start."""
    medians = {}
    for store in ("memory", "sqlite"):
        with server.corral(store, args.loop) as srv:
            client("cold", srv.url, n=10, prefix="coldwarm")  # the first spawns fault pages in the zygote
            times = client("cold", srv.url, n=args.cold, prefix="cold")["times"]
        medians[store] = statistics.median(times)
        table.add(f"cold start over HTTP, {store} store, median (p99)",
                  f"{ms(medians[store])} ({ms(footprint.percentile(times, 99))})", target="<= 15 ms")
    why_not = jupyter_peer.available()
    if why_not:
        table.add("Jupyter kernel start", f"skipped: {why_not}")
        return
    peer = jupyter_peer.measure(args.kernels)
    table.add(f"Jupyter kernel start -> ready, median of {peer['n']}", ms(peer["start_median"]))
    table.add("cold start vs Jupyter kernel (SQLite store)", ms(medians["sqlite"]), ms(peer["start_median"]),
              f"{peer['start_median'] / medians['sqlite']:.0f}x faster", ">= 50x")
    table.add("Jupyter kernel idle USS / PSS", f"{peer['uss_median'] / MB:.1f} / {peer['pss_median'] / MB:.1f} MB")
    args.kernel_uss = peer["uss_median"]


# ------------------------------------------------------------------------------------------ agents

READY_AGENTS = {
    "echo agent (the figures above)": ("bench.agents:EchoAgent", {}),
    "OpenAI-compatible agent, local fake API": ("corral.agent_proc.contrib.openai_chat:OpenAIChat", {
        "CORRAL_OPENAI_MODEL": "fake-model"}),
    "LangGraph agent, graph over a fake chat model": ("corral.agent_proc.contrib.langgraph:GraphAgent", {
        "CORRAL_LANGGRAPH_GRAPH": "bench.graph:graph"}),
}


def agents(table: Table, args) -> None:
    """Cold start over HTTP with the ready agents (heavy imports in the zygote), and their warm turn."""
    with server.bare(None, "bench.fake_openai") as api:
        for label, (agent, env) in READY_AGENTS.items():
            env = {**env, "CORRAL_OPENAI_BASE_URL": api.url + "/v1"}
            with server.corral("memory", args.loop, env=env, agent=agent) as srv:
                client("cold", srv.url, n=10, prefix="coldwarm")  # the first spawns fault pages in the zygote
                times = client("cold", srv.url, n=args.cold, prefix="cold")["times"]
                sessions = srv.agents()  # all still live: CPU each spent from fork to its first reply
                cpu = sum(map(_cpu_ns, sessions)) / 1e9 / max(1, len(sessions))
                rss = sum(p.memory_info().rss for p in srv.process().children() if p.cmdline()[:1] == ["corral: zygote"]
                          or " ".join(p.cmdline()).startswith("corral: zygote"))
            table.add(f"cold start over HTTP, {label}, median (p99)",
                      f"{ms(statistics.median(times))} ({ms(footprint.percentile(times, 99))})", target="<= 15 ms")
            table.add(f"CPU of a new session's process up to its first reply, {label}", ms(cpu))
            table.add(f"zygote RSS (its imports, shared by every session), {label}", f"{rss / MB:.0f} MB")


def _cpu_ns(proc) -> int:
    """Nanoseconds a process has run on a CPU (schedstat: exact, where cpu_times counts 10 ms ticks)."""
    try:
        with open(f"/proc/{proc.pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


# ------------------------------------------------------------------------------------------ scale

def scale(table: Table, args) -> None:
    """1000 live sessions: time to create, memory, idle CPU, warm p99 with 10 vs 1000 live."""
    n = args.sessions
    with server.corral("sqlite", args.loop, max_sessions=n + 100) as srv:
        load.warm_chat(srv.url, connections=10, sessions=10, seconds=2, prefix="few")
        few = [load.warm_chat(srv.url, connections=10, sessions=10, seconds=args.seconds, prefix="few")
               for _ in range(args.rounds)]
        seconds = client("create", srv.url, n=n - 10, concurrency=32, prefix="scale")["seconds"]
        live = json.loads(_get(srv.url + "/health"))["live_sessions"]
        table.add(f"scale: bring {n - 10} new sessions live over HTTP (32 clients)", f"{seconds:.2f} s",
                  target=f"<= {5 * (n - 10) / 1000:.2f} s")
        agents = srv.agents()
        mem = footprint.memory(agents)
        table.add(f"scale: live sessions / agent processes", f"{live} / {len(agents)}")
        table.add("scale: agents' total USS / PSS", f"{mem['uss'] / MB:.0f} / {mem['pss'] / MB:.0f} MB")
        per_uss, per_pss = mem["uss"] / max(1, mem["count"]), mem["pss"] / max(1, mem["count"])
        kernel = getattr(args, "kernel_uss", None)
        table.add("scale: USS per idle session", f"{per_uss / MB:.2f} MB",
                  f"{kernel / MB:.1f} MB (kernel)" if kernel else "", f"{kernel / per_uss:.0f}x less" if kernel else "",
                  "<= 2 MB")
        table.add("scale: PSS per idle session", f"{per_pss / MB:.2f} MB")
        sup = srv.process()
        zygote_and_agents = sup.children(recursive=True)
        cpu = footprint.idle_cpu({"supervisor": [sup], "corral": [sup, *zygote_and_agents]}, args.idle_seconds)
        table.add(f"scale: supervisor CPU while {live} idle ({args.idle_seconds:g} s)", f"{cpu['supervisor']:.2f} %")
        table.add("scale: all corral processes' CPU while idle", f"{cpu['corral']:.2f} %")
        table.add("scale: whole machine CPU meanwhile (other users included)", f"{cpu['machine']:.1f} %",
                  target="<= 2 %")
        many = [load.warm_chat(srv.url, connections=10, sessions=10, seconds=args.seconds, prefix="few")
                for _ in range(args.rounds)]
    p99_few = statistics.median(r["p99_ms"] for r in few)
    p99_many = statistics.median(r["p99_ms"] for r in many)
    table.add(f"scale: warm p99, 10 clients, {live} live vs 10 live", f"{p99_many:.2f} ms", f"{p99_few:.2f} ms",
              f"{p99_many / p99_few:.2f}x", "<= 2x")


def _get(url: str) -> str:
    """GET a URL."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


# ------------------------------------------------------------------------------------------ stream

def streaming(table: Table, args) -> None:
    """Time to first delta and chunks/s: over SSE when the route exists, else at the supervisor."""
    with server.corral("memory", args.loop, agent="bench.agents:StreamAgent") as srv:
        has_sse = _has_sse(srv.url)
        if has_sse:
            for n in (1, 100):
                r = client("stream", srv.url, n=n, prefix=f"sse{n}")
                table.add(f"stream (SSE): {n} session(s), first delta median / chunks per s",
                          f"{ms(statistics.median(r['first_delta']))} / {r['chunks'] / r['seconds']:.0f}")
            return
    for n, r in stream.measure().items():
        table.add(f"stream (supervisor, no SSE route yet): {n} session(s), first chunk / chunks per s",
                  f"{ms(r['first_chunk_median'])} / {r['chunks_per_second']:.0f}")


def _has_sse(url: str) -> bool:
    """Whether GET /api/chat/stream answers with an event stream on this server."""
    import urllib.request

    try:
        hello = urllib.request.Request(url + "/api/chat", data=b'{"message": "hi", "session_id": "sse-probe"}',
                                       headers={"Content-Type": "application/json"})
        urllib.request.urlopen(hello, timeout=10).close()  # a live session to ask about
        with urllib.request.urlopen(url + "/api/chat/stream?session_id=sse-probe", timeout=5) as r:
            return r.headers.get("Content-Type", "").startswith("text/event-stream")
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ main

def dense(table: Table, args) -> None:
    """N sandboxed sessions live: memory all in and where it goes, USS, descriptors, idle CPU, warm p99."""
    density.run(table, args, client)


def egress_part(table: Table, args) -> None:
    """The agents' network namespace and the egress gateway (bench/egress.py), with its defaults."""
    from bench import egress

    options = egress.parser().parse_args(["--n", str(args.cold)])
    for row in egress.run(options):
        table.add(*row)


PARTS = {"warm": warm, "cold": cold, "agents": agents, "scale": scale, "stream": streaming, "density": dense,
         "egress": egress_part}


def machine() -> str:
    """One line about the machine the figures come from."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"Linux {platform.release()}, Python {platform.python_version()}, "
            f"load generator: {'wrk' if load.have_wrk() else 'bench.client (asyncio)'}")


def main(argv=None) -> int:
    """Run the chosen parts and print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("parts", nargs="*", default=list(PARTS), help=f"any of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--loop", default="auto", help="event loop of every server: auto | asyncio | uvloop")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one warm load round")
    parser.add_argument("--rounds", type=int, default=3, help="warm rounds per server (median taken)")
    parser.add_argument("--cold", type=int, default=100, help="new sessions timed for the cold start")
    parser.add_argument("--kernels", type=int, default=5, help="Jupyter kernels started for the peer figures")
    parser.add_argument("--sessions", type=int, default=1000, help="live sessions of the scale run")
    parser.add_argument("--density", type=int, default=1000, help="live sandboxed sessions of the density run")
    parser.add_argument("--serve-flag", action="append", default=[], metavar="NAME=VALUE",
                        help="a corral serve setting for the density run, e.g. agent_disk=0 (repeatable)")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="window of the idle CPU figure")
    args = parser.parse_args(argv)
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}")
    settings = {**server.BENCH_SETTINGS, "loop": args.loop}
    print(f"machine: {machine()}", file=sys.stderr)
    print(f"corral serve settings: {json.dumps(settings)} (stores: memory:// and the default SQLite)",
          file=sys.stderr)
    table = Table()
    begin = time.monotonic()
    for part in [p for p in PARTS if p in args.parts]:
        print(f"{part} ...", file=sys.stderr, flush=True)
        PARTS[part](table, args)
    print(f"\nmachine: {machine()}")
    print(f"corral serve settings: {json.dumps(settings)}")
    print(f"command: python -m bench {' '.join(argv if argv is not None else sys.argv[1:])}  "
          f"({time.monotonic() - begin:.0f} s)\n")
    print(table.render())
    return 0
