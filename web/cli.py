"""The corral command: corral serve and the operator commands.

Every serve flag is also read from the environment as CORRAL_ plus its name in upper
snake case (--idle-timeout <-> CORRAL_IDLE_TIMEOUT); a flag on the command line wins.
"""

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import socket
import sys
from pathlib import Path

from corral.supervisor.config import DEFAULT_AGENT, LOG_LEVELS, LOOPS, SANDBOX_MODES, Config, SettingError
from corral.supervisor.limits import MECHANISMS, parse_cores, parse_size
from corral.web import ops_cli
from corral.web.version import VERSION


def _parser(name: str, convert):
    """An argparse type: ``convert(text)``, its ValueError turned into one line naming what was wanted."""

    def parse(text: str):
        try:
            return convert(text)
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(f"{exc or 'bad value'} (got {text!r})") from None

    parse.__name__ = name
    return parse


def _whole(text: str) -> int:
    """A whole number."""
    if not text.strip().lstrip("-").isdigit():
        raise ValueError("expected a whole number")
    return int(text)


def _seconds(text: str) -> float:
    """A finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not math.isfinite(value):
        raise ValueError("expected a finite number of seconds")
    return value


def _port(text: str) -> int:
    """A TCP port, 0 meaning any free one."""
    port = _whole(text)
    if not 0 <= port <= 65535:
        raise ValueError("a port is 0-65535")
    return port


def _choice(*allowed: str):
    """One of a fixed set of words."""

    def pick(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return text

    return pick


def _text(text: str) -> str:
    """A non-empty string."""
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _token(text: str) -> str:
    """A bearer token: non-empty, no whitespace (it travels in an Authorization header)."""
    if not text or any(ch.isspace() for ch in text):
        raise ValueError("a token is a non-empty string without spaces")
    return text


def _agent(text: str) -> str:
    """An agent class spec, pkg.module:Class (imported later, by the zygote)."""
    module, _, cls = text.partition(":")
    if not module or not cls.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
        raise ValueError("expected pkg.module:Class")
    return text


def _origins(text: str) -> tuple[str, ...]:
    """Comma-separated origins (scheme://host[:port]) or *."""
    origins = tuple(o.strip() for o in text.split(",") if o.strip())
    for origin in origins:
        scheme, sep, rest = origin.partition("://")
        if origin != "*" and (scheme not in ("http", "https") or not sep or not rest or "/" in rest.rstrip("/")):
            raise ValueError(f"an origin looks like https://app.example[:port] or is *, not {origin!r}")
    return origins


def _path(text: str) -> Path:
    """A filesystem path."""
    return Path(_text(text))


# name -> (parser, help); every entry is a Config field
SERVE_FLAGS = {
    "host": (_parser("host", _text), "address to bind (default 127.0.0.1)"),
    "port": (_parser("port", _port), "port to bind, 0-65535 (default 8080)"),
    "agent": (_parser("agent", _agent), f"agent class as pkg.module:Class (default {DEFAULT_AGENT})"),
    "data_dir": (_parser("path", _path), "where the SQLite file lives (default ~/.local/share/corral)"),
    "database_url": (_parser("url", _text), "postgresql://... to share sessions between nodes (default: SQLite in --data-dir)"),
    "run_dir": (_parser("path", _path), "parent of the server's 0700 run directory"),
    "max_sessions": (_parser("count", _whole), "live sessions at most (default 1000)"),
    "max_sessions_per_tenant": (_parser("count", _whole), "live sessions per tenant at most (default 0: no cap)"),
    "idle_timeout": (_parser("seconds", _seconds), "seconds without a message before a session is reaped (default 1800)"),
    "max_age": (_parser("seconds", _seconds), "seconds a session's process may live (default 0: off)"),
    "memory_limit": (_parser("size", parse_size), "memory per session, e.g. 512M (default 512M; 0 = none)"),
    "limit_mechanism": (_parser("mechanism", _choice(*MECHANISMS)), "force cgroup2 | cgroup1 | rlimit | none (default: best available)"),
    "max_restarts": (_parser("count", _whole), "respawns after crashes allowed per --restart-window (default 3)"),
    "restart_window": (_parser("seconds", _seconds), "seconds of the restart window (default 60)"),
    "stop_timeout": (_parser("seconds", _seconds), "seconds from the shutdown request to SIGKILL (default 10)"),
    "spawn_timeout": (_parser("seconds", _seconds), "seconds an agent has to come up (default 10)"),
    "request_timeout": (_parser("seconds", _seconds), "seconds a turn may take before it is interrupted (504) (default 120)"),
    "max_message_bytes": (_parser("size", parse_size), "largest message accepted (default 64K)"),
    "agent_frame_rate": (_parser("rate", _seconds), "frames a second an agent may send on its connection before it is killed (default 50000; 0 = no bound)"),
    "max_turn_bytes": (_parser("size", parse_size), "bytes an agent may send for one turn before it is killed (default 64M)"),
    "history_limit": (_parser("count", _whole), "messages of history handed to a restarted agent, newest first (default 1000)"),
    "history_limit_bytes": (_parser("size", parse_size), "bytes of history handed to a restarted agent, newest first (default 8M, at most 32M)"),
    "mailbox_size": (_parser("count", _whole), "messages in flight per session (default 32)"),
    "rate_limit": (_parser("rate", _seconds), "messages per second per session (default 20; 0 = off)"),
    "rate_burst": (_parser("count", _whole), "burst of the per-session rate limit (default 40)"),
    "retention": (_parser("seconds", _seconds), "seconds ended sessions are kept (default 86400)"),
    "tenants": (_parser("path", _path), "TOML file with tenants and their API keys"),
    "admin_token": (_parser("token", _token), "token for the admin API and dashboard"),
    "metrics_token": (_parser("token", _token), "bearer token /metrics requires (default: none, /metrics is open)"),
    "cors_origins": (_parser("origins", _origins), "comma-separated origins allowed by CORS"),
    "log_level": (_parser("level", _choice(*LOG_LEVELS)), "debug | info | warning | error (default info)"),
    "agent_log_lines": (_parser("count", _whole), "lines of each session's agent stdout/stderr kept for GET /admin/sessions/ID/logs (default 200)"),
    "sandbox": (_parser("mode", _choice(*SANDBOX_MODES)), "agent sandbox: auto (every layer the host allows) | strict (refuse to start without all) | off (default auto)"),
    "sandbox_uid_range": (_parser("range", _text), "as root, uids for agents, one per live session (default 60000-60999)"),
    "agent_network": (_parser("on|off", _choice("on", "off")), "on | off: whether agents may use TCP/UDP (default on)"),
    "max_pids": (_parser("count", _whole), "processes per session (default 64; 0 = no cap)"),
    "max_open_files": (_parser("count", _whole), "open files per agent process (default 1024; 0 = inherited)"),
    "cpu_limit": (_parser("cores", parse_cores), "CPU per session in cores, e.g. 0.5 (default 0: no cap; cgroup cpu.max or cfs_quota_us)"),
    "advertise_url": (_parser("url", _text), "URL other cluster nodes reach this one at (default http://HOST:PORT)"),
    "node_lease": (_parser("seconds", _seconds), "seconds a cluster node stays alive without renewing its heartbeat (default 10)"),
    "loop": (_parser("loop", _choice(*LOOPS)), "event loop: auto (uvloop when installed) | asyncio | uvloop (default auto)"),
}


class CommandParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 1."""

    def error(self, message: str):
        """One line on stderr, exit 1 (argparse's own prints the usage and exits 2)."""
        self.exit(1, f"{self.prog}: {message} (see {self.prog} --help)\n")


def env_name(name: str) -> str:
    """The environment variable for a setting."""
    return "CORRAL_" + name.upper()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``corral``."""
    parser = CommandParser(prog="corral", description="One OS process per chat/agent session.")
    parser.add_argument("--version", action="version", version=f"corral {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server", description=__doc__)
    for name, (parse, help_text) in SERVE_FLAGS.items():
        serve.add_argument("--" + name.replace("_", "-"), dest=name, type=parse, default=None,
                           help=f"{help_text} [env {env_name(name)}]")
    ops_cli.add_parsers(sub)
    return parser


def config_from(args: argparse.Namespace, environ=os.environ) -> Config:
    """Merge flags over environment over defaults; a bad value exits with one line naming where it came from."""
    values, sources = {}, {}
    for name, (parse, _) in SERVE_FLAGS.items():
        value, source = getattr(args, name, None), "--" + name.replace("_", "-")
        if value is None and environ.get(env_name(name)):
            source = env_name(name)
            try:
                value = parse(environ[source])
            except argparse.ArgumentTypeError as exc:
                raise SystemExit(f"corral: {source}: {exc}") from None
        if value is not None:
            values[name], sources[name] = value, source
    try:
        return Config(**values)
    except SettingError as exc:
        raise SystemExit(f"corral: {sources.get(exc.name, exc.name)}: {exc.problem} "
                         f"(got {values.get(exc.name)!r})") from None
    except ValueError as exc:
        raise SystemExit(f"corral: {exc}") from None


def serve(config: Config) -> int:
    """Run the server until SIGINT/SIGTERM."""
    from corral.agent_proc.process import set_title
    from corral.supervisor.errors import StartupError
    from corral.supervisor.logs import configure, get_logger
    from corral.web.app import create_app
    from corral.web.auth import AuthConfigError

    try:
        # the port, then the node's identity, before anything touches the store: a second server
        # on a taken port or a held identity stops here and leaves the live one's sessions alone
        config, sockets = listen(config)
        event_loop = new_event_loop(config.loop)
        store, claim = claim_identity(config, event_loop)
    except StartupError as exc:
        print(f"corral: cannot start: {exc}", file=sys.stderr)
        return 1
    configure(config.log_level)
    agents_importable_from_cwd()
    raise_open_files_limit()
    set_title(f"corral: supervisor {config.host}:{config.port}")
    log = get_logger(component="cli")
    try:
        app = create_app(config, store=store, claim=claim)
    except AuthConfigError as exc:
        print(f"corral: cannot start: {exc}", file=sys.stderr)
        return 1
    log.info("serving", host=config.host, port=config.port, agent=config.agent)
    try:
        run_app(app, sockets=sockets, loop=event_loop)
    except StartupError as exc:
        # e.g. a corrupt SQLite file, an unreachable PostgreSQL, an agent that does not import:
        # the operator's to fix, so one line saying what (and the log event), not a traceback
        log.error("cannot_start", error=str(exc))
        print(f"corral: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def listen(config: Config) -> tuple[Config, list[socket.socket]]:
    """Bind and listen on the configured address; the config gets the real port if it asked for 0."""
    from corral.supervisor.errors import StartupError

    try:
        sockets = bind_sockets(config.host, config.port)
    except OSError as exc:
        raise StartupError(f"cannot listen on {config.host}:{config.port}: {describe_os_error(exc)}") from None
    if config.port == 0:  # the node's name carries the port it really has
        config = dataclasses.replace(config, port=sockets[0].getsockname()[1])
    return config, sockets


def claim_identity(config: Config, event_loop):
    """The store (not yet opened) and this node's claim on its identity in it (supervisor/node.py)."""
    from corral.supervisor.errors import StartupError
    from corral.supervisor.node import claim_node, node_name
    from corral.supervisor.store import StoreError, create_store

    try:
        store = create_store(config.database_url, config.data_dir)
        return store, event_loop.run_until_complete(claim_node(store, node_name(config.port)))
    except StoreError as exc:
        raise StartupError(str(exc)) from None


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (as aiohttp would bind them)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    unique = {(family, address): (family, kind, proto) for family, kind, proto, _, address in infos}
    sockets: list[socket.socket] = []
    try:
        for (family, address), (_, kind, proto) in unique.items():
            if port == 0 and sockets:  # every address on the one port the kernel picked first
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            # listening now holds the port: SO_REUSEADDR lets a second bind through until someone listens
            sock.listen(128)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def describe_os_error(exc: OSError) -> str:
    """An OS error as a short phrase ("address already in use"), without errno noise."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host ({exc.strerror})"
    return (exc.strerror or str(exc)).lower()


def agents_importable_from_cwd() -> None:
    """Let ``--agent mymod:Cls`` name a module in the current directory, as gunicorn does.

    The zygote is started with this process's ``sys.path``. The directory goes last, so a file
    there cannot shadow an installed package (corral's own included).
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def raise_open_files_limit() -> None:
    """Lift the soft open-files limit to the hard one: each live session holds three descriptors here."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def new_event_loop(choice: str = "auto"):
    """A fresh event loop: uvloop when chosen (or, with ``auto``, when importable), else asyncio's."""
    import asyncio

    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit("corral: --loop uvloop needs uvloop (pip install 'corral[speed]')") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_app(app, *, host: str = "127.0.0.1", port: int = 8080, sockets: list[socket.socket] | None = None,
            loop="auto") -> None:
    """Serve an aiohttp app (on ``sockets``, else on host:port) until SIGINT/SIGTERM.

    ``loop`` is an event loop, or the name of the kind to make (``new_event_loop``).
    """
    from aiohttp import web

    from corral.supervisor.logs import get_logger

    event_loop = new_event_loop(loop) if isinstance(loop, str) else loop
    get_logger(component="cli").info("event_loop", loop=type(event_loop).__module__.split(".")[0])
    tune_gc()
    app.on_startup.append(_freeze_startup_objects)
    if sockets is None:
        sockets = bind_sockets(host, port)
    web.run_app(app, sock=sockets, print=None, access_log=None, loop=event_loop)


# Collect the youngest generation every 50,000 net allocations instead of 700. A request allocates
# a few hundred objects that die young; with the default, full collections over a heap of tens of
# thousands of sessions' objects stalled the loop for ~100 ms (the warm p99, docs/benchmarks.md).
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Make the server process's garbage collector run rarely (a process-wide choice: CLI only)."""
    gc.set_threshold(*GC_THRESHOLDS)


async def _freeze_startup_objects(app) -> None:
    """Move everything alive after start-up (modules, the app, the supervisor) out of GC passes."""
    gc.collect()
    gc.freeze()


def main(argv=None) -> int:
    """Entry point of the ``corral`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(config_from(args))
    return ops_cli.run(args)
