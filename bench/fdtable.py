"""``python -m bench.fdtable``: what a forked child's descriptor table costs, by how many descriptors its parent holds.

``fork`` gives the child a table as large as the parent's highest open descriptor (rounded up to a
power of two) and closing descriptors never shrinks it. This forks ``--children`` children from a
parent holding 10, 2,000 and 10,000 descriptors (pipes); each child closes them all and waits. The
kernel memory its memory cgroup (v1) gained, per child, is printed for each: the difference is the
table. Root and the cgroup v1 memory controller are needed. It is why the zygote keeps no
descriptor per agent (agent_proc/output_relay.py).
"""

import argparse
import json
import os
import resource
import signal
import time

MEMCG = "/sys/fs/cgroup/memory"


def kernel_bytes_per_child(held: int, children: int) -> float:
    """Kernel memory per child forked from a process holding ``held`` descriptors (in a cgroup of its own)."""
    cgroup = os.path.join(MEMCG, f"corral-fdtable-{os.getpid()}")
    os.mkdir(cgroup)
    pids: list[int] = []
    fds: list[int] = []
    try:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        for _ in range(held // 2):
            fds += os.pipe()
        before = _kmem(cgroup)
        for _ in range(children):
            pid = os.fork()
            if pid == 0:
                os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
                signal.pause()
                os._exit(0)
            pids.append(pid)
        time.sleep(1)
        return (_kmem(cgroup) - before) / children
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for fd in fds:
            os.close(fd)
        with open(os.path.join(MEMCG, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        os.rmdir(cgroup)


def _kmem(cgroup: str) -> int:
    """The cgroup's kernel memory, in bytes."""
    with open(os.path.join(cgroup, "memory.kmem.usage_in_bytes")) as f:
        return int(f.read())


def main(argv=None) -> None:
    """Print one JSON line: KiB of kernel memory per child, by descriptors held in the parent."""
    parser = argparse.ArgumentParser(prog="python -m bench.fdtable")
    parser.add_argument("--children", type=int, default=200)
    args = parser.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    figures = {str(held): round(kernel_bytes_per_child(held, args.children) / 1024, 1) for held in (10, 2000, 10000)}
    print(json.dumps({"children": args.children, "kernel_kib_per_child_by_descriptors_held": figures}))


if __name__ == "__main__":
    main()
