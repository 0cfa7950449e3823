"""Every setting of a corral server, declared once with its default, kind, checks and help.

``corral serve``'s flags, the ``CORRAL_*`` environment (``CORRAL_`` plus the name in upper snake
case), ``--help`` and the table in docs/configuration.md are derived from these declarations
(supervisor/settings.py).
"""

import os
from dataclasses import dataclass, fields
from pathlib import Path

from corral.supervisor.egress.policy import parse_rule
from corral.supervisor.egress.upstreams import parse_header, parse_upstream
from corral.supervisor.limit_plan import MECHANISMS
from corral.supervisor.sandbox_plan import MODES as SANDBOX_MODES
from corral.supervisor.sandbox_plan import parse_uid_range
from corral.supervisor.settings import http_url
from corral.supervisor.settings import (  # noqa: F401 (SettingError: raised by Config, caught by the CLI)
    AGENT, CORES, COUNT, ENV_ENTRY, PATH, PORT, RATE, SECONDS, SIZE, TEXT, TOKEN, URL, ORIGINS,
    Declared, SettingError, repeated, at_least_one, between, check_all, choice, declared, non_negative, positive, setting,
)

DEFAULT_AGENT = "corral.agent_proc.demo:DemoAgent"
LOOPS = ("auto", "asyncio", "uvloop")
LOG_LEVELS = ("debug", "info", "warning", "error")
NETWORK_MODES = ("proxy", "host", "off")
IMMORTAL_HEAP = ("auto", "off")


def _checked(parse):
    """A parser that validates a text with ``parse`` and keeps the text."""
    def check(text: str) -> str:
        parse(text)
        return text
    check.__doc__ = parse.__doc__
    return check


RULES = repeated("destination", _checked(parse_rule), ",")
UPSTREAMS = repeated("upstream", _checked(parse_upstream), "\n")
UPSTREAM_HEADERS = repeated("header", _checked(parse_header), "\n")
# Half the largest frame an agent accepts (agent_proc.dealer.MAX_FRAME_BYTES): room for msgpack's framing.
MAX_HISTORY_BYTES = 32 * 1024 * 1024


def default_data_dir() -> Path:
    """Where the SQLite file lives unless told otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "corral"


def _uid_range(text: str) -> str | None:
    """The problem with a uid range (``60000-60999``), or None."""
    try:
        parse_uid_range(text)
    except ValueError as exc:
        return str(exc)
    return None


def _enough_files(count: int) -> str | None:
    """Refuse an open-files limit too small for an agent to start (0 means inherited)."""
    return "below 16 leaves an agent unable to start" if 0 < count < 16 else None


@dataclass
class Config:
    """Settings of one corral server (times in seconds, sizes in bytes), each declared once."""

    host: str = setting("127.0.0.1", TEXT, "address to bind")
    port: int = setting(8080, PORT, "port to bind, 0-65535 (0: any free port)")
    agent: str = setting(DEFAULT_AGENT, AGENT, "agent class as pkg.module:Class")
    data_dir: Path = setting(factory=default_data_dir, kind=PATH, help="where the SQLite file lives",
                             default_text="~/.local/share/corral")
    database_url: str | None = setting(None, URL, "postgresql://... to share sessions between nodes",
                                       default_text="SQLite in --data-dir")
    database_url_file: Path | None = setting(
        None, PATH, "file holding the database URL (so its password is on no command line)",
        doc="file holding `--database-url` (its first line, whitespace stripped), so a password is on no command "
            "line or environment; see [security.md](security.md#secrets-in-files)")
    run_dir: Path | None = setting(None, PATH, "parent of the server's 0700 run directory",
                                   default_text="$XDG_RUNTIME_DIR or the temp dir")
    max_sessions: int = setting(1000, COUNT, "live sessions at most", at_least_one)
    max_sessions_per_tenant: int = setting(0, COUNT, "live sessions per tenant at most (0 = no cap)", non_negative)
    idle_timeout: float = setting(1800.0, SECONDS, "seconds without a message before a session is reaped", positive)
    max_age: float = setting(0.0, SECONDS, "seconds a session's process may live (0 = off)", non_negative)
    memory_limit: int = setting(512 * 1024 * 1024, SIZE, "memory per session, e.g. 512M (0 = none)", non_negative)
    limit_mechanism: str | None = setting(None, choice("mechanism", MECHANISMS),
                                          "force cgroup2 | cgroup1 | rlimit | none", default_text="best available")
    max_restarts: int = setting(3, COUNT, "respawns after crashes allowed per --restart-window", non_negative)
    restart_window: float = setting(60.0, SECONDS, "seconds of the restart window", positive)
    stop_timeout: float = setting(10.0, SECONDS, "seconds from the shutdown request to SIGKILL", positive)
    drain_timeout: float = setting(10.0, SECONDS, "seconds a stopping server waits for turns in flight before "
                                   "it interrupts them (503 shutting_down)", non_negative)
    spawn_timeout: float = setting(10.0, SECONDS, "seconds an agent has to come up", positive)
    request_timeout: float = setting(120.0, SECONDS, "seconds a turn may take before it is interrupted (504)",
                                     positive)
    max_message_bytes: int = setting(64 * 1024, SIZE, "largest message accepted", at_least_one)
    # An agent's own connection (docs/limits.md): frames a second (and the burst), hundreds of times
    # a fast LLM stream, below what a flood sends; bytes it may send for one turn.
    agent_frame_rate: float = setting(
        50_000.0, RATE, "frames a second an agent may send on its connection before it is killed (0 = no bound)",
        non_negative,
        doc="frames a second an agent may send on its connection (burst: one second's worth); past it the agent "
            "is killed, `end_reason` `flood` (0 = no bound); see [limits.md](limits.md#an-agents-own-connection)")
    max_turn_bytes: int = setting(
        64 * 1024 * 1024, SIZE, "bytes an agent may send for one turn before it is killed", at_least_one,
        doc="bytes an agent may send for one turn (chunks and its answer); past it the agent is killed, "
            "`end_reason` `turn_too_large`")
    max_snapshot_bytes: int = setting(
        64 * 1024, SIZE, "largest agent state snapshot() kept per session; past it the turn answers 502",
        at_least_one,
        doc="bytes an agent's `snapshot()` may take (as msgpack); past it the turn answers 502 `agent_bad_reply`, "
            "the agent lives and the last state within the bound is kept ([agents.md](agents.md#what-a-hook-may-return))")
    # History handed to on_start: the last history_limit messages, as many of those as fit in
    # history_limit_bytes (oldest dropped), so the START frame stays far under the agent's frame limit.
    history_limit: int = setting(
        1000, COUNT, "messages of history handed to a restarted agent, newest first", at_least_one,
        doc="messages of history handed to a (re)started agent's `on_start`: the newest ones")
    history_limit_bytes: int = setting(
        8 * 1024 * 1024, SIZE, "bytes of history handed to a restarted agent, newest first (at most 32M)",
        between(0, MAX_HISTORY_BYTES, f"must be between 0 and {MAX_HISTORY_BYTES} (the START frame must fit)"),
        doc="bytes of message content in that history, whichever limit comes first (oldest dropped; at most 32M "
            "so the START frame fits)")
    mailbox_size: int = setting(32, COUNT, "messages in flight per session", at_least_one)
    rate_limit: float = setting(20.0, RATE, "messages per second per session, a token bucket (0 = off)",
                                non_negative)
    rate_burst: int = setting(40, COUNT, "burst of the per-session rate limit", at_least_one)
    retention: float = setting(86400.0, SECONDS, "seconds ended sessions are kept", non_negative)
    tenants: Path | None = setting(None, PATH, "TOML file with tenants and their API keys")
    admin_token: str | None = setting(None, TOKEN, "token for the admin API and dashboard")
    admin_token_file: Path | None = setting(
        None, PATH, "file holding the admin token (so it is on no command line)",
        doc="file holding `--admin-token` (whitespace around it stripped), so it is on no command line or "
            "environment; see [security.md](security.md#secrets-in-files)")
    metrics_token: str | None = setting(
        None, TOKEN, "bearer token GET /metrics requires", default_text="none: /metrics is open",
        doc="bearer token `GET /metrics` requires; see [operations.md](operations.md#prometheus-metrics)")
    cors_origins: tuple[str, ...] = setting(
        (), ORIGINS, "comma-separated origins allowed by CORS", default_text="none: same-origin only",
        doc="comma-separated origins whose pages may call the API (`*` = any); see [http-api.md](http-api.md#cors)")
    log_level: str = setting("info", choice("level", LOG_LEVELS), "debug | info | warning | error")
    agent_log_lines: int = setting(
        200, COUNT, "lines of each session's agent stdout/stderr kept for GET /admin/sessions/ID/logs (0 = none)",
        non_negative,
        doc="lines of each session's agent stdout/stderr kept in memory for `GET /admin/sessions/{id}/logs` "
            "(0 = keep none; every line is logged either way); see [operations.md](operations.md)")
    sandbox: str = setting("auto", choice("mode", SANDBOX_MODES),
                           "agent sandbox: auto (every layer the host allows) | strict (refuse to start without "
                           "all) | off")
    # as root: one uid (and gid) per live session from this range
    sandbox_uid_range: str = setting("60000-60999", TEXT, "as root, uids for agents, one per live session",
                                     _uid_range)
    agent_network: str = setting(
        "proxy", choice("mode", NETWORK_MODES),
        "proxy (a network namespace of their own, out only through the egress gateway) | host (the host's network, "
        "warned) | off (no TCP/UDP)",
        doc="`proxy`: agents share a network namespace of their own with only `lo`; their one way out is the egress "
            "gateway (HTTP proxy + CONNECT, checked against the rules below); `host`: the host's network, as before "
            "(warned at start); `off`: TCP and UDP refused (Landlock + seccomp); see [security.md](security.md#network)")
    agent_allow: tuple[str, ...] = setting(
        (), RULES, "destination agents may reach through the gateway though the default refuses it (repeatable)",
        doc="a destination agents may reach through the gateway even where the default refuses it (loopback, "
            "private, link-local, the host's own addresses): `host`, `*.domain`, `host:port`, an address or a CIDR; "
            "repeatable (comma-separated in the variable)")
    agent_deny: tuple[str, ...] = setting(
        (), RULES, "destination agents may not reach through the gateway (repeatable; wins over allow)",
        doc="a destination agents may not reach through the gateway (same forms; wins over an allow rule); repeatable")
    upstream: tuple[str, ...] = setting(
        (), UPSTREAMS, "NAME=URL: an API agents reach as $CORRAL_UPSTREAM_NAME on the gateway (repeatable)",
        doc="`NAME=URL`: an API agents reach over plain HTTP on the gateway as `$CORRAL_UPSTREAM_<NAME>`; the gateway "
            "speaks to the URL (verified TLS for https) and adds its headers; repeatable (one a line in the variable); "
            "see [security.md](security.md#upstreams)")
    upstream_header: tuple[str, ...] = setting(
        (), UPSTREAM_HEADERS, "'NAME=Header: value' added by the gateway to upstream NAME's requests (repeatable)",
        doc="`'NAME=Header: value'` the gateway adds to upstream NAME's requests (replacing the agent's); the value "
            "may end in `env:VAR` or `file:PATH`, read at start, so the secret never enters an agent; repeatable")
    upstream_ca_file: Path | None = setting(
        None, PATH, "CA bundle the gateway verifies https upstreams with", default_text="the system's CAs")
    agent_env: tuple[str, ...] = setting(
        (), ENV_ENTRY, "a variable for agents: NAME (passed through from the server) or NAME=VALUE; repeatable",
        doc="a variable agents get: `NAME` (its value in the server's environment) or `NAME=VALUE`; repeat the flag, "
            "or separate entries with spaces in the variable. Agents start from an empty environment plus `PATH`, "
            "`LANG`, `TMPDIR` and `HOME`; see [security.md](security.md#the-agents-environment)")
    agent_disk: int = setting(
        256 * 1024 * 1024, SIZE, "bytes an agent's TMPDIR holds, e.g. 256M (0 = no bound)", non_negative,
        doc="bytes an agent's `TMPDIR` holds (a tmpfs of that size, inodes bounded too; past it `ENOSPC`, the agent "
            "lives; 0 = no bound); see [limits.md](limits.md#disk)")
    max_pids: int = setting(64, COUNT, "processes per session (0 = no cap)", non_negative)
    max_open_files: int = setting(1024, COUNT, "open files per agent process (0 = inherited)", non_negative,
                                  _enough_files)
    cpu_limit: float = setting(
        0.0, CORES, "CPU per session in cores, e.g. 0.5 (0 = no cap; cgroup cpu.max or cfs_quota_us)",
        doc="CPU per session in cores, e.g. `0.5` (0 = no cap); cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`, "
            "else reported unavailable; see [limits.md](limits.md)")
    # cluster (PostgreSQL): where other nodes reach this one, and the seconds a node stays alive for
    # the others without renewing its row (docs/cluster.md)
    advertise_url: str | None = setting(
        None, URL, "URL other cluster nodes reach this one at", default_text="http://HOST:PORT",
        doc="URL other cluster nodes reach this one at; see [cluster.md](cluster.md)")
    node_lease: float = setting(
        10.0, SECONDS, "seconds a cluster node stays alive without renewing its heartbeat", positive,
        doc="seconds a cluster node stays alive without renewing its heartbeat (PostgreSQL only)")
    webhook: tuple[str, ...] = setting(
        (), repeated("url", http_url, ","), "URL to POST lifecycle events to (repeatable; the variable: comma-separated)",
        default_text="none",
        doc="URL lifecycle events are POSTed to, signed (repeat the flag; `CORRAL_WEBHOOK`: comma-separated; a tenant's own in "
            "the tenants file); see [operations.md](operations.md#lifecycle-webhooks)")
    webhook_secret: str | None = setting(None, TOKEN, "the HMAC-SHA256 key that signs webhook bodies")
    webhook_secret_file: Path | None = setting(None, PATH, "a file holding the webhook key (instead of --webhook-secret)")
    usage_interval: float = setting(
        10.0, SECONDS, "seconds between samples of every agent's CPU and memory (usage, dashboard plots)", positive,
        doc="seconds between samples of every live agent's CPU and memory: usage accounting and the dashboard's "
            "plots; see [operations.md](operations.md#usage)")
    loop: str = setting("auto", choice("loop", LOOPS), "event loop: auto (uvloop when installed) | asyncio | uvloop")
    # agent_proc/immortal.py: ~0.7 MB less per idle agent on CPython 3.12 (docs/benchmarks.md)
    immortal_heap: str = setting(
        "auto", choice("immortal-heap", IMMORTAL_HEAP), "make the zygote's objects immortal before it forks, so agents "
        "share their pages instead of copying them to count references: auto (on CPython 3.12/3.13) | off",
        doc="make the zygote's objects immortal before it forks, so agents share their pages instead of copying them "
            "to count references: `auto` (where the interpreter allows it: CPython 3.12 and 3.13; the start-up log's "
            "`zygote_ready` says `heap=`) or `off`; see [operations.md](operations.md#memory-how-many-sessions-a-node-holds)")

    def __post_init__(self):
        """Validate values that would otherwise fail far from their cause."""
        self.admin_token = _from_file(self, "admin_token", TOKEN)
        self.database_url = _from_file(self, "database_url", URL)
        check_all(self)
        self.uid_range = parse_uid_range(self.sandbox_uid_range)
        self.data_dir = Path(self.data_dir)


def _from_file(config: Config, name: str, kind) -> str | None:
    """A secret setting's value: from its ``_file`` setting when one is given, else as it is."""
    path, value = getattr(config, name + "_file"), getattr(config, name)
    if path is None:
        return value
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingError(name + "_file", f"cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        read = kind.parse(text)
    except ValueError as exc:
        raise SettingError(name + "_file", f"does not hold a valid {kind.name}: {exc}") from None
    if value is not None and value != read:  # (equal: this Config was copied with dataclasses.replace)
        raise SettingError(name + "_file", f"and --{name.replace('_', '-')} are both given: keep one")
    return read


def setting_names() -> list[str]:
    """The names of every setting, in declaration order."""
    return [f.name for f in fields(Config)]


def settings() -> list[Declared]:
    """Every setting of ``Config`` with its declaration (flags, environment and docs come from these)."""
    return declared(Config)
