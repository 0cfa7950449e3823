"""The sandbox's cost (issue 12): ``python -m bench.sandbox`` prints, in one run,

- new session -> first reply at the supervisor, and USS per idle session, with ``--sandbox off``
  and with every layer this host allows (``auto``; as root: all of them), the Landlock rules and
  seccomp filter built in each child (as before) and built once in the zygote (as now)
- the same with ``--agent-disk 0`` (no tmpfs mounted on each TMPDIR), back to back with the default
- each layer alone, timed inside freshly forked children (median of ``--layer-runs``); the user and
  pid namespaces an unprivileged server's zygote makes once are timed the same way, and the disk
  layer's tmpfs mount and lazy unmount per spawn
"""

import argparse
import asyncio
import os
import pickle
import statistics
import sys
import tempfile
import time

from corral.agent_proc import disk as disk_bound
from corral.agent_proc import sandbox as layers
from corral.agent_proc import userns
from bench import footprint
from bench.spawn import agents, bring_live, first_reply
from corral.supervisor import Config, Supervisor
from corral.supervisor import sandbox_plan as policy
from corral.supervisor.logs import configure

MB = 1024 * 1024


async def server_figures(mode: str, args, *, prebuild: bool = True, disk: int = 256 * MB) -> dict:
    """First-reply times and USS per idle session under one sandbox mode (layers built in the zygote or in each child)."""
    policy.Sandbox.prebuild = prebuild
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        config = Config(agent="bench.agents:EchoAgent", data_dir=tmp, database_url="memory://", rate_limit=0,
                        max_sessions=args.sessions + 100, idle_timeout=3600, sandbox=mode, agent_disk=disk)
        sup = Supervisor(config)
        await sup.start()
        try:
            await first_reply(sup, 5)  # fault in the zygote's pages first
            times = await first_reply(sup, args.n)
            await bring_live(sup, f"mem-{mode}", args.sessions - sup.count(), 16)
            mem = footprint.memory(agents(sup))
            in_force = [name for name, layer in (sup.sandbox.layers or {}).items() if layer["in_force"]]
        finally:
            await sup.close()
    return {"median": statistics.median(times), "p99": footprint.percentile(times, 99),
            "uss": mem["uss"] / mem["count"], "count": mem["count"], "layers": in_force}


def time_in_child(step, *, mount_namespace: bool = False) -> float:
    """Seconds ``step()`` takes in a freshly forked child (in a mount namespace of its own, made before the clock starts)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        if mount_namespace:
            disk_bound.enter_mount_namespace()
        start = time.perf_counter()
        step()
        os.write(w, pickle.dumps(time.perf_counter() - start))
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        took = pickle.loads(f.read())
    os.waitpid(pid, 0)
    return took


def layer_steps() -> dict:
    """Each layer as the agent applies it, with this host's real read paths."""
    read_paths = policy.python_read_paths() + list(policy.SYSTEM_READ_PATHS)
    tmp = tempfile.mkdtemp(prefix="corral-bench-tmp-")
    abi = layers.landlock_abi()
    steps = {"nothing (the fork's own page faults: subtract)": lambda: None, "no_new_privs": layers.set_no_new_privs, "rlimits": lambda: layers.limit_open_files(1024)}
    if os.geteuid() == 0:
        steps["capabilities + uid"] = lambda: (layers.drop_capabilities(), layers.drop_to_uid(60990, 60990))
    steps["user + pid namespace, caps dropped (once per zygote)"] = lambda: (
        userns.enter_user_namespace(), layers.unshare_pid_namespace(), userns.drop_every_capability())
    if os.geteuid() == 0:  # not root, the zygote mounts inside its user namespace: not timed here
        steps["tmpfs on TMPDIR + lazy unmount (mount namespace made before)"] = lambda: (
            disk_bound.mount_tmpfs(tmp, size=256 * MB, uid=os.geteuid(), gid=os.getegid()), disk_bound.unmount(tmp))
    if abi:
        steps[f"landlock ({len(read_paths)} read paths)"] = lambda: (
            layers.set_no_new_privs(), layers.apply_landlock(abi, read_paths, [tmp]))
    if layers.AUDIT_ARCH is not None:
        steps["seccomp"] = lambda: (layers.set_no_new_privs(), layers.apply_seccomp())
    steps["all (as confine applies them)"] = lambda: layers.confine({
        "uid": 60990 if os.geteuid() == 0 else None, "gid": 60990, "tmpdir": tmp, "max_open_files": 1024,
        "max_pids": 64, "landlock": abi, "read_paths": read_paths, "write_paths": [tmp],
        "seccomp": layers.AUDIT_ARCH is not None})
    return steps


def main(argv=None) -> int:
    """Print the figures as a table."""
    parser = argparse.ArgumentParser(prog="python -m bench.sandbox", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="new sessions timed for the first reply")
    parser.add_argument("--sessions", type=int, default=100, help="idle sessions for the USS figure")
    parser.add_argument("--layer-runs", type=int, default=50)
    args = parser.parse_args(argv)
    configure("error")
    print(f"command: python -m bench.sandbox {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"kernel {os.uname().release}, Landlock ABI {layers.landlock_abi()}, uid {os.geteuid()}")
    for mode, prebuild, disk, label in (("off", True, 0, "off"), ("auto", False, 256 * MB, "auto, built in each child"),
                                        ("auto", True, 0, "auto, --agent-disk 0"),
                                        ("auto", True, 256 * MB, "auto, built in the zygote")):
        f = asyncio.run(server_figures(mode, args, prebuild=prebuild, disk=disk))
        print(f"sandbox {label:<26}  first reply median / p99 {f['median'] * 1000:.2f} / {f['p99'] * 1000:.2f} ms   "
              f"USS per idle session {f['uss'] / MB:.2f} MB ({f['count']} live)   layers: {', '.join(f['layers']) or '-'}")
    for name, step in layer_steps().items():
        runs = [time_in_child(step, mount_namespace="tmpfs" in name) for _ in range(args.layer_runs)]
        print(f"layer {name:<54} median {statistics.median(runs) * 1e6:7.0f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
