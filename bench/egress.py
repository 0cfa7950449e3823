"""The agents' network namespace and the egress gateway (issue 19): ``python -m bench.egress``, or the
``egress`` part of ``python -m bench``.

- new session -> first reply at the supervisor and USS per idle session, ``--agent-network host``
  against ``proxy`` (the namespace + the gateway), rounds interleaved back to back;
- time to first byte of a small answer from a loopback origin, through the gateway against direct;
- throughput of 1 and 100 concurrent streams from the origin, through the gateway against direct.

The origin and the client each run in a process of their own; the gateway runs on this process's
loop as in the supervisor (served on a loopback listener: where the listener was made does not
change its path), with the origin's port allowed by a rule, as an agent's traffic would be.
"""

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import sys
import tempfile
import time

from bench import footprint
from bench.spawn import agents, bring_live, first_reply

MB = 1024 * 1024
CHUNK = 256 * 1024
_ZEROS = bytes(CHUNK)


# ------------------------------------------------------------------------------- the origin process

async def _origin_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """GET /bytes/N: N bytes; anything else: a small answer. Then close."""
    head = await reader.readuntil(b"\r\n\r\n")
    path = head.split(b" ", 2)[1].decode()
    size = int(path.rsplit("/", 1)[1]) if path.startswith("/bytes/") else 2
    writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode())
    while size > 0:
        writer.write(_ZEROS[:min(size, CHUNK)])
        size -= CHUNK
        await writer.drain()
    writer.close()


async def _serve_origin() -> None:
    """Listen on loopback, print the port, serve until killed."""
    server = await asyncio.start_server(_origin_reply, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


# ------------------------------------------------------------------------------- the client process

def _request(path: str, origin_port: int, proxy: dict | None, stream: int = 0) -> tuple[tuple[str, int], bytes]:
    """Where to connect and what to send: the origin directly, or the gateway with an absolute URI (stream i
    as session i: one agent holds at most MAX_OPEN connections)."""
    if proxy is None:
        return ("127.0.0.1", origin_port), f"GET {path} HTTP/1.1\r\nHost: o\r\n\r\n".encode()
    token = proxy["tokens"][stream % len(proxy["tokens"])]
    auth = base64.b64encode(f"corral:{token}".encode()).decode()
    return (("127.0.0.1", proxy["port"]),
            f"GET http://127.0.0.1:{origin_port}{path} HTTP/1.1\r\nHost: o\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
            .encode())


async def _one(path: str, origin_port: int, proxy, stream: int = 0) -> tuple[float, int]:
    """One request: seconds to the first byte of the answer, and bytes received."""
    address, request = _request(path, origin_port, proxy, stream)
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(*address)
    writer.write(request)
    first = await reader.read(CHUNK)
    ttfb = time.perf_counter() - start
    got = len(first)
    while data := await reader.read(CHUNK):
        got += len(data)
    writer.close()
    return ttfb, got


async def _client(args: dict) -> dict:
    """Time-to-first-byte median of ``n`` sequential requests, or MB/s of ``streams`` concurrent ones."""
    proxy = args.get("proxy")
    if args["what"] == "ttfb":
        times = [(await _one("/small", args["origin"], proxy))[0] for _ in range(args["n"])]
        return {"median": statistics.median(times)}
    start = time.perf_counter()
    done = await asyncio.gather(*(_one(f"/bytes/{args['size']}", args["origin"], proxy, i) for i in range(args["streams"])))
    seconds = time.perf_counter() - start
    return {"mb_s": sum(got for _, got in done) / MB / seconds}


# ------------------------------------------------------------------------------- the bench process

async def _run_client(args: dict) -> dict:
    """One client process; its JSON answer (this loop keeps serving the gateway meanwhile)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.egress", "client", json.dumps(args),
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return json.loads(out.decode().splitlines()[-1])


async def gateway_figures(args) -> dict:
    """TTFB and throughput through the gateway and direct, rounds interleaved."""
    from corral.supervisor.egress import Gateway
    from corral.supervisor.egress.policy import Policy, parse_rule

    origin = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.egress", "origin",
                                                  stdout=asyncio.subprocess.PIPE)
    port = int((await origin.stdout.readline()).decode())
    gateway = Gateway(Policy([parse_rule(f"127.0.0.1:{port}")]))
    await gateway.serve(socket.create_server(("127.0.0.1", 0), backlog=1024))
    tokens = [gateway.grant(f"bench-{i}", "bench")[0] for i in range(100)]
    runs: dict[str, list[float]] = {}
    try:
        for _ in range(args.rounds):
            for via, proxy in (("direct", None), ("gateway", {"port": gateway.port, "tokens": tokens})):
                ttfb = await _run_client({"what": "ttfb", "origin": port, "proxy": proxy, "n": args.requests})
                runs.setdefault(f"ttfb {via}", []).append(ttfb["median"])
                for streams in (1, 100):
                    size = args.stream_mb * MB // streams
                    got = await _run_client({"what": "throughput", "origin": port, "proxy": proxy,
                                             "streams": streams, "size": size})
                    runs.setdefault(f"{streams} streams {via}", []).append(got["mb_s"])
    finally:
        await gateway.close()
        origin.kill()
        await origin.wait()
    return {name: statistics.median(values) for name, values in runs.items()}


async def _started(network: str, args, tmp: str):
    """A supervisor with one --agent-network mode (sandbox auto), its zygote's pages faulted in."""
    from corral.supervisor import Config, Supervisor

    config = Config(agent="bench.agents:EchoAgent", data_dir=os.path.join(tmp, network), database_url="memory://",
                    rate_limit=0, max_sessions=args.sessions + args.n + 100, idle_timeout=3600, agent_network=network,
                    sandbox_uid_range=args.uid_ranges[network])
    sup = Supervisor(config)
    await sup.start()
    await first_reply(sup, 5)
    return sup


async def cold_figures(args) -> dict:
    """First-reply times (one host session, then one proxy session, in turn) and USS per idle session."""
    times: dict[str, list[float]] = {"host": [], "proxy": []}
    out = {}
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        sups = {network: await _started(network, args, tmp) for network in times}
        try:
            order = list(sups.items())
            for i in range(args.n):
                for network, sup in order if i % 2 else order[::-1]:  # each goes first half the time
                    times[network] += await first_reply_one(sup, f"first-{i}")
            for network, sup in sups.items():
                await bring_live(sup, f"mem-{network}", args.sessions - sup.live_count, 16)
                mem = footprint.memory(agents(sup))
                out[network] = {"median": statistics.median(times[network]), "uss": mem["uss"] / mem["count"],
                                "count": mem["count"], "namespace": sup.sandbox.layers.get("network", {}).get("in_force")}
        finally:
            for sup in sups.values():
                await sup.close()
    return out


async def first_reply_one(sup, session_id: str) -> list[float]:
    """Seconds from get_or_create of a new session to its first reply, as a one-item list."""
    start = time.perf_counter()
    await sup.chat(await sup.get_or_create(session_id, "bench"), "hello")
    return [time.perf_counter() - start]


def spawn_extra(runs: int = 2000) -> float:
    """Seconds the proxy mode adds to one spawn by construction: the grant and its env, then setting that env."""
    from corral.supervisor.egress import Gateway
    from corral.supervisor.egress.policy import Policy

    gateway = Gateway(Policy())
    gateway.port = 1
    times = []
    for i in range(runs):
        start = time.perf_counter()
        token, env = gateway.grant(f"s{i}", "t")
        os.environ.update(env)
        gateway.revoke(token)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def namespace_once(runs: int = 20) -> float:
    """Seconds the zygote spends once on the namespace: unshare, lo up, the gateway's listener (in forked children)."""
    from bench.sandbox import time_in_child
    from corral.agent_proc import netns

    nothing = statistics.median(time_in_child(lambda: None) for _ in range(runs))
    made = statistics.median(time_in_child(lambda: (netns.enter_network_namespace(), netns.gateway_listener()))
                             for _ in range(runs))
    return made - nothing


def report(cold: dict, gateway: dict) -> list[tuple[str, str, str, str, str]]:
    """Rows of figure | corral | baseline | ratio/delta | target."""
    host, proxy = cold["host"], cold["proxy"]
    rows = [
        ("egress: new session -> first reply, proxy (namespace + gateway) vs host", f"{proxy['median'] * 1000:.2f} ms",
         f"{host['median'] * 1000:.2f} ms", f"{(proxy['median'] - host['median']) * 1000:+.2f} ms", "<= +0.3 ms"),
        ("egress: once per zygote, the namespace with lo up and the gateway's listener", f"{cold['once'] * 1000:.2f} ms",
         "", "", ""),
        ("egress: per spawn, the grant, its env and setting it (by construction)", f"{cold['extra'] * 1e6:.0f} µs",
         "", "", ""),
        ("egress: USS per idle session, proxy vs host", f"{proxy['uss'] / MB:.2f} MB", f"{host['uss'] / MB:.2f} MB",
         f"{(proxy['uss'] - host['uss']) / MB:+.2f} MB", "unchanged"),
        ("egress: time to first byte, gateway vs direct", f"{gateway['ttfb gateway'] * 1000:.2f} ms",
         f"{gateway['ttfb direct'] * 1000:.2f} ms",
         f"{(gateway['ttfb gateway'] - gateway['ttfb direct']) * 1000:+.2f} ms", "<= +1 ms"),
    ]
    for streams in (1, 100):
        through, direct = gateway[f"{streams} streams gateway"], gateway[f"{streams} streams direct"]
        rows.append((f"egress: throughput, {streams} stream{'s' if streams > 1 else ''}, gateway vs direct",
                     f"{through:.0f} MB/s", f"{direct:.0f} MB/s", f"{through / direct:.2f}x", ""))
    return rows


def parser() -> argparse.ArgumentParser:
    """The options (shared with python -m bench's egress part)."""
    p = argparse.ArgumentParser(prog="python -m bench.egress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="new sessions timed for the first reply, per mode (in turn)")
    p.add_argument("--sessions", type=int, default=100, help="idle sessions for the USS figure")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the gateway's figures, interleaved (median taken)")
    p.add_argument("--requests", type=int, default=300, help="sequential requests per time-to-first-byte round")
    p.add_argument("--stream-mb", type=int, default=256, help="MB moved per throughput round (split over the streams)")
    return p


def run(args) -> list[tuple[str, str, str, str, str]]:
    """Every figure's row."""
    from corral.supervisor.logs import configure

    configure("error")
    args.uid_ranges = {"host": "62000-62599", "proxy": "62600-63199"}  # apart from other servers' (as root)
    cold = asyncio.run(cold_figures(args))
    cold["extra"], cold["once"] = spawn_extra(), namespace_once()
    gateway = asyncio.run(gateway_figures(args))
    if not cold["proxy"]["namespace"]:
        print("note: no network namespace here, proxy ran as host", file=sys.stderr)
    return report(cold, gateway)


def main(argv=None) -> int:
    """``origin`` / ``client JSON`` (the helper processes), or the bench: print the rows."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["origin"]:
        asyncio.run(_serve_origin())
        return 0
    if argv[:1] == ["client"]:
        print(json.dumps(asyncio.run(_client(json.loads(argv[1])))))
        return 0
    args = parser().parse_args(argv)
    print(f"command: python -m bench.egress {' '.join(argv)}  (uid {os.geteuid()}, kernel {os.uname().release})")
    for row in run(args):
        print(" | ".join(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
