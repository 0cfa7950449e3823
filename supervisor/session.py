"""One session as the supervisor sees it: its state, its process, its mailbox of turns."""

import asyncio
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from corral.supervisor import errors, states
from corral.supervisor.session_keys import session_key

# The one statement of the session-id rule: the checks, the error message and the OpenAPI pattern.
# "." and ".." are refused: as a path segment (/api/sessions/..) they name another resource.
SESSION_ID_PATTERN = r"^(?!\.\.?$)[A-Za-z0-9._-]{1,128}$"
SESSION_ID_RULE = "session_id must be 1-128 characters of A-Z a-z 0-9 . _ - (and not . or ..)"
_SESSION_ID = re.compile(SESSION_ID_PATTERN)


def valid_session_id(session_id) -> bool:
    """Whether a client-supplied session id is acceptable."""
    return isinstance(session_id, str) and _SESSION_ID.fullmatch(session_id) is not None


def bad_session_id() -> errors.InvalidRequest:
    """The 400 for a session id that breaks the rule."""
    return errors.InvalidRequest(SESSION_ID_RULE, code="bad_session_id")


def new_session_id() -> str:
    """A fresh session id (uuid4)."""
    return str(uuid.uuid4())


@dataclass(eq=False)
class Turn:
    """One message sent to the agent and awaiting its DONE or FAIL (hashable: compared by identity)."""

    kind: int
    future: asyncio.Future
    on_chunk: object = None  # callable(str) or None
    chunks: int = 0
    abandoned: bool = False  # the caller gave up (timeout); the answer is dropped when it comes
    bytes: int = 0  # what the agent has sent for it so far (bounded by max_turn_bytes)
    in_bytes: int | None = None  # the committed message it carries, in UTF-8 bytes (None: nothing recorded)


class TokenBucket:
    """Per-session rate limit: ``rate`` tokens a second, at most ``burst`` saved up."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self, n: float = 1) -> float:
        """Take ``n`` tokens; return 0 on success, else the seconds until they are available."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate


@dataclass(eq=False)
class Session:
    """A session as the APIs see it: its state, its process's pid, its counts (``life`` does the rest)."""

    id: str  # what its tenant calls it
    tenant: str
    metadata: dict = field(default_factory=dict)
    state: str | None = None
    pid: int | None = None
    limits: dict | None = None
    sandbox: dict | None = None  # this process's sandbox spec (uid, temp dir), freed after it exits
    created_at: float = field(default_factory=time.time)
    spawned_at: float | None = None  # monotonic
    last_activity: float = field(default_factory=time.monotonic)
    message_count: int = 0
    restarts: deque = field(default_factory=deque)  # monotonic times of respawns after a crash
    end_reason: str | None = None
    exit_description: str | None = None
    agent_state: dict = field(default_factory=dict)
    inflight: int = 0  # requests accepted and not answered (including ones waiting for a spawn)
    bucket: TokenBucket | None = None
    epoch: int | None = None  # the cluster claim this node's process runs under (None: not claimed)
    # name -> asyncio.TimerHandle: idle and age (the reaper's), forget (the registry's), term, kill
    # and interrupt (its life's); its life cancels them when the process goes
    timers: dict = field(default_factory=dict)
    life: object = None  # its SessionLife (supervisor/session_life.py): the process, the turns
    key: str = ""  # its tenant and id as one name (supervisor/session_keys.py): what corral knows it by

    def __post_init__(self):
        self.key = session_key(self.tenant, self.id)

    @property
    def live(self) -> bool:
        """Whether the session has (or is getting) a process."""
        return states.is_live(self.state)

    @property
    def is_processing(self) -> bool:
        """Whether a turn is in progress."""
        return self.inflight > 0

    def idle_seconds(self) -> float:
        """Seconds since the last message in or out."""
        return max(0.0, time.monotonic() - self.last_activity)
