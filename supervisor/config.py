"""Every setting of a corral server, with its default, in one place.

``corral serve`` builds its flags from ``SETTINGS``; each flag is also read from the
environment as ``CORRAL_`` plus its name in upper snake case.
"""

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_AGENT = "agent_proc.demo:DemoAgent"
LOOPS = ("auto", "asyncio", "uvloop")
# Half the largest frame an agent accepts (agent_proc.dealer.MAX_FRAME_BYTES): room for msgpack's framing.
MAX_HISTORY_BYTES = 32 * 1024 * 1024


def default_data_dir() -> Path:
    """Where the SQLite file lives unless told otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "corral"


@dataclass
class Config:
    """Settings of one corral server (times in seconds, sizes in bytes)."""

    host: str = "127.0.0.1"
    port: int = 8080
    agent: str = DEFAULT_AGENT
    data_dir: Path = field(default_factory=default_data_dir)
    database_url: str | None = None
    run_dir: Path | None = None  # parent of the 0700 run directory; default: $XDG_RUNTIME_DIR or the temp dir
    max_sessions: int = 1000
    max_sessions_per_tenant: int = 0  # 0 = no per-tenant cap
    idle_timeout: float = 1800.0
    max_age: float = 0.0  # 0 = off
    memory_limit: int = 512 * 1024 * 1024  # 0 = no limit
    limit_mechanism: str | None = None  # force cgroup2 | cgroup1 | rlimit | none
    max_restarts: int = 3
    restart_window: float = 60.0
    stop_timeout: float = 10.0
    spawn_timeout: float = 10.0
    request_timeout: float = 120.0
    max_message_bytes: int = 64 * 1024
    # An agent's own connection (docs/limits.md): frames a second (and the burst), hundreds of times
    # a fast LLM stream, below what a flood sends; bytes it may send for one turn.
    agent_frame_rate: float = 50_000.0  # 0 = no bound
    max_turn_bytes: int = 64 * 1024 * 1024
    # History handed to on_start: the last history_limit messages, as many of those as fit in
    # history_limit_bytes (oldest dropped), so the START frame stays far under the agent's frame limit.
    history_limit: int = 1000
    history_limit_bytes: int = 8 * 1024 * 1024
    mailbox_size: int = 32  # turns in flight per session
    rate_limit: float = 20.0  # messages per second per session (token bucket); 0 = off
    rate_burst: int = 40
    retention: float = 86400.0
    tenants: Path | None = None
    admin_token: str | None = None
    cors_origins: tuple[str, ...] = ()
    log_level: str = "info"
    loop: str = "auto"  # event loop of `corral serve`: auto (uvloop when importable) | asyncio | uvloop

    def __post_init__(self):
        """Validate values that would otherwise fail far from their cause."""
        for name in ("idle_timeout", "stop_timeout", "spawn_timeout", "request_timeout", "restart_window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("max_sessions", "mailbox_size", "max_message_bytes", "max_turn_bytes", "history_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_restarts < 0 or self.max_age < 0 or self.memory_limit < 0:
            raise ValueError("max_restarts, max_age and memory_limit cannot be negative")
        if self.agent_frame_rate < 0:
            raise ValueError("agent_frame_rate cannot be negative")
        if not 0 <= self.history_limit_bytes <= MAX_HISTORY_BYTES:
            raise ValueError(f"history_limit_bytes must be between 0 and {MAX_HISTORY_BYTES} (the START frame must fit)")
        if self.loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}")
        self.data_dir = Path(self.data_dir)


def setting_names() -> list[str]:
    """The names of every setting, in declaration order."""
    return [f.name for f in fields(Config)]
