"""The session state machine. Imports nothing, so it can be read and tested on its own.

    starting -> idle <-> busy -> stopping -> ended | reaped | expired | killed
    any live state -> crashed | oom | killed          (the process died or was killed)
    crashed | oom -> failed                            (restart budget spent)
    any down state -> starting                         (the session comes back, history restored)
    lost -> starting                                   (the store's only: its server died with it)
"""

STARTING = "starting"
IDLE = "idle"
BUSY = "busy"
STOPPING = "stopping"
ENDED = "ended"
CRASHED = "crashed"
OOM = "oom"
KILLED = "killed"
REAPED = "reaped"
EXPIRED = "expired"
FAILED = "failed"
# The server died while the session was live: a status only the store records (set by the server's
# next start, or by a peer that swept the dead node); no live session moves into or out of it.
LOST = "lost"
LOST_REASON = "server_died"  # its end_reason

LIVE = frozenset({STARTING, IDLE, BUSY, STOPPING})
DOWN = frozenset({ENDED, CRASHED, OOM, KILLED, REAPED, EXPIRED, FAILED})
ALL = LIVE | DOWN | {LOST}  # what the APIs may report (and filter on)
# Ways a stop can end; the reason is chosen when the stop begins.
STOP_REASONS = frozenset({ENDED, REAPED, EXPIRED, KILLED})
# Deaths nobody asked for: the restart policy applies.
UNPLANNED = frozenset({CRASHED, OOM})

_DIED = {CRASHED, OOM, KILLED}
TRANSITIONS = {
    None: {STARTING},
    STARTING: {IDLE, STOPPING} | _DIED,
    IDLE: {BUSY, STOPPING} | _DIED,
    BUSY: {IDLE, STOPPING} | _DIED,
    STOPPING: STOP_REASONS | _DIED,
    ENDED: {STARTING},
    REAPED: {STARTING},
    EXPIRED: {STARTING},
    KILLED: {STARTING},
    CRASHED: {STARTING, FAILED},
    OOM: {STARTING, FAILED},
    FAILED: {STARTING},
    LOST: {STARTING},  # as a stored record: its next request brings it back, history restored
}


class InvalidTransition(AssertionError):
    """A transition the state machine does not allow: a bug in the caller."""


def check(old, new) -> None:
    """Assert that ``old -> new`` is allowed."""
    if new not in TRANSITIONS.get(old, ()):
        raise InvalidTransition(f"{old} -> {new} is not a session transition")


def is_live(state) -> bool:
    """Whether a session in this state has (or is getting) a process."""
    return state in LIVE
