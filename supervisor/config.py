"""Every setting of a corral server, with its default, in one place.

``corral serve`` builds its flags from ``SETTINGS``; each flag is also read from the
environment as ``CORRAL_`` plus its name in upper snake case.
"""

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from corral.supervisor.limits import MECHANISMS
from corral.supervisor.sandbox import MODES as SANDBOX_MODES
from corral.supervisor.sandbox import parse_uid_range

DEFAULT_AGENT = "corral.agent_proc.demo:DemoAgent"
LOOPS = ("auto", "asyncio", "uvloop")
LOG_LEVELS = ("debug", "info", "warning", "error")
_SECONDS = ("idle_timeout", "max_age", "stop_timeout", "spawn_timeout", "request_timeout", "restart_window",
            "retention", "rate_limit")


class SettingError(ValueError):
    """A setting's value is out of its range; ``name`` says which setting, ``problem`` what is wrong."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem
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
    metrics_token: str | None = None  # bearer token GET /metrics requires; None = /metrics is open
    cors_origins: tuple[str, ...] = ()
    log_level: str = "info"
    agent_log_lines: int = 200  # lines of each session's agent output kept for the admin API; 0 = none
    sandbox: str = "auto"  # auto: every layer the host allows | strict: refuse to start without them | off
    sandbox_uid_range: str = "60000-60999"  # as root: one uid (and gid) per live session from this range
    agent_network: str = "on"  # off: agents get no TCP/UDP (Landlock + seccomp)
    max_pids: int = 64  # processes per session (its own uid's RLIMIT_NPROC, or cgroup v2 pids.max); 0 = no cap
    max_open_files: int = 1024  # RLIMIT_NOFILE per agent process; 0 = inherited
    cpu_limit: float = 0.0  # cores per session (cgroup cpu.max / cfs_quota_us); 0 = no cap
    # cluster (PostgreSQL): where other nodes reach this one (default http://host:port), and the
    # seconds a node stays alive for the others without renewing its row (docs/cluster.md)
    advertise_url: str | None = None
    node_lease: float = 10.0
    loop: str = "auto"  # event loop of `corral serve`: auto (uvloop when importable) | asyncio | uvloop

    def __post_init__(self):
        """Validate values that would otherwise fail far from their cause."""
        for name in _SECONDS:
            if not math.isfinite(getattr(self, name)):
                raise SettingError(name, "must be a finite number")
        for name in ("idle_timeout", "stop_timeout", "spawn_timeout", "request_timeout", "restart_window",
                     "node_lease"):
            if getattr(self, name) <= 0:
                raise SettingError(name, "must be positive")
        for name in ("max_sessions", "mailbox_size", "max_message_bytes", "rate_burst", "max_turn_bytes", "history_limit"):
            if getattr(self, name) < 1:
                raise SettingError(name, "must be at least 1")
        for name in ("max_restarts", "max_age", "memory_limit", "max_sessions_per_tenant", "retention", "rate_limit"):
            if getattr(self, name) < 0:
                raise SettingError(name, "cannot be negative")
        if self.agent_frame_rate < 0:
            raise SettingError("agent_frame_rate", "cannot be negative")
        if not 0 <= self.history_limit_bytes <= MAX_HISTORY_BYTES:
            raise SettingError("history_limit_bytes", f"must be between 0 and {MAX_HISTORY_BYTES} (the START frame must fit)")
        if not 0 <= self.port <= 65535:
            raise SettingError("port", "must be 0-65535")
        self._check_choice("loop", LOOPS)
        self._check_choice("sandbox", SANDBOX_MODES)
        self._check_choice("agent_network", ("on", "off"))
        for name in ("max_pids", "max_open_files", "agent_log_lines"):
            if getattr(self, name) < 0:
                raise SettingError(name, "cannot be negative")
        if self.max_open_files and self.max_open_files < 16:
            raise SettingError("max_open_files", "below 16 leaves an agent unable to start")
        try:
            self.uid_range = parse_uid_range(self.sandbox_uid_range)
        except ValueError as exc:
            raise SettingError("sandbox_uid_range", str(exc)) from None
        self._check_choice("log_level", LOG_LEVELS)
        if self.limit_mechanism is not None:
            self._check_choice("limit_mechanism", MECHANISMS)
        self.data_dir = Path(self.data_dir)

    def _check_choice(self, name: str, allowed: tuple[str, ...]) -> None:
        """Refuse a value outside a fixed set, naming the set."""
        if getattr(self, name) not in allowed:
            raise SettingError(name, f"must be one of {', '.join(allowed)}")


def setting_names() -> list[str]:
    """The names of every setting, in declaration order."""
    return [f.name for f in fields(Config)]
