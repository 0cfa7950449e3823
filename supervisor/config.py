"""Every setting of a corral server, with its default, in one place.

``corral serve`` builds its flags from ``SETTINGS``; each flag is also read from the
environment as ``CORRAL_`` plus its name in upper snake case.
"""

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from supervisor.sandbox import MODES as SANDBOX_MODES
from supervisor.sandbox import parse_uid_range

DEFAULT_AGENT = "agent_proc.demo:DemoAgent"
LOOPS = ("auto", "asyncio", "uvloop")


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
    mailbox_size: int = 32  # turns in flight per session
    rate_limit: float = 20.0  # messages per second per session (token bucket); 0 = off
    rate_burst: int = 40
    retention: float = 86400.0
    tenants: Path | None = None
    admin_token: str | None = None
    cors_origins: tuple[str, ...] = ()
    log_level: str = "info"
    agent_log_lines: int = 200  # lines of each session's agent output kept for the admin API; 0 = none
    sandbox: str = "auto"  # auto: every layer the host allows | strict: refuse to start without them | off
    sandbox_uid_range: str = "60000-60999"  # as root: one uid (and gid) per live session from this range
    agent_network: str = "on"  # off: agents get no TCP/UDP (Landlock + seccomp)
    max_pids: int = 64  # processes per session (its own uid's RLIMIT_NPROC, or cgroup v2 pids.max); 0 = no cap
    max_open_files: int = 1024  # RLIMIT_NOFILE per agent process; 0 = inherited
    loop: str = "auto"  # event loop of `corral serve`: auto (uvloop when importable) | asyncio | uvloop

    def __post_init__(self):
        """Validate values that would otherwise fail far from their cause."""
        for name in ("idle_timeout", "stop_timeout", "spawn_timeout", "request_timeout", "restart_window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("max_sessions", "mailbox_size", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_restarts < 0 or self.max_age < 0 or self.memory_limit < 0 or self.agent_log_lines < 0:
            raise ValueError("max_restarts, max_age, memory_limit and agent_log_lines cannot be negative")
        if self.sandbox not in SANDBOX_MODES:
            raise ValueError(f"sandbox must be one of {', '.join(SANDBOX_MODES)}")
        if self.agent_network not in ("on", "off"):
            raise ValueError("agent_network must be on or off")
        if self.max_pids < 0 or self.max_open_files < 0:
            raise ValueError("max_pids and max_open_files cannot be negative")
        if self.max_open_files and self.max_open_files < 16:
            raise ValueError("max_open_files below 16 leaves an agent unable to start")
        self.uid_range = parse_uid_range(self.sandbox_uid_range)
        if self.loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}")
        self.data_dir = Path(self.data_dir)


def setting_names() -> list[str]:
    """The names of every setting, in declaration order."""
    return [f.name for f in fields(Config)]
