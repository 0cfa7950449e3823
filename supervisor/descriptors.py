"""The server's open-files budget: what ``--max-sessions`` needs, what the limit allows, the headroom check.

A live session holds ``PER_SESSION`` descriptor in the server: its hub connection (one end of a
socket pair). Its output pipe costs none here (the zygote's output relay holds its read end and
sends what the agent writes: agent_proc/output_relay.py), its exit none (reported by spawn id) and its
sandbox uid none (one file holds every uid claim, supervisor/uid_claims.py). The rest of the table
is kept for what is not a session: client connections, the store, logs; ``reserve`` of it. A new
session whose descriptor would eat into that reserve is refused with a 503 (``out_of_descriptors``),
so accepting a connection never meets EMFILE while sessions fill the table.

The reserve is a floor, not a share: sessions stop at ``--max-sessions`` first. 10,000 sessions in a
20,000-descriptor table (this container's hard limit) take 10,000 and leave 10,000 for connections
(a streaming client per session), well above the 4,096 kept; a table too small for ``--max-sessions``
is capped at start-up with a warning (supervisor/lifecycle.py), the 503 is for the limit lowered
on a running server.
"""

import errno
import os
import resource

PER_SESSION = 1
RESERVE = 4096  # descriptors kept for client connections, the store and logs (at most a quarter of the limit)
NR_OPEN = "/proc/sys/fs/nr_open"


def reserve(limit: int) -> int:
    """Descriptors of a table of ``limit`` that sessions may not take."""
    return min(RESERVE, limit // 4)


def needed(max_sessions: int) -> int:
    """The open-files limit ``max_sessions`` live sessions need, with the reserve."""
    return PER_SESSION * max_sessions + RESERVE


def kernel_ceiling() -> int:
    """The highest open-files limit the kernel lets a process have (fs.nr_open)."""
    try:
        with open(NR_OPEN) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024 * 1024


def raise_limit(max_sessions: int) -> tuple[int, int]:
    """Lift the soft open-files limit to what ``max_sessions`` needs (root lifts the hard one too); the new limits.

    The soft limit goes to the hard one as before; a root process may raise the hard limit itself,
    up to fs.nr_open, when it is below the need.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(needed(max_sessions), kernel_ceiling())
    if os.geteuid() == 0 and hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want, want
        except (ValueError, OSError):
            pass
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def sessions_that_fit() -> int:
    """Live sessions the current soft open-files limit has room for."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = kernel_ceiling()
    return max(0, (soft - reserve(soft)) // PER_SESSION)


def ensure_headroom(newest_fd: int) -> None:
    """OSError(EMFILE) if the descriptor just made for a session reaches into the reserve.

    The kernel hands out the lowest free number, so ``newest_fd`` at or past the limit less the
    reserve means the table below it is full: one getrlimit, no count of the table. The limit is
    read each time, so one lowered on a running server (prlimit) takes effect at once.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and newest_fd >= soft - reserve(soft):
        raise OSError(errno.EMFILE, f"open files: {newest_fd + 1} of {soft}, the last {reserve(soft)} kept "
                                    "for connections")
