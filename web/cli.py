"""The ``corral`` command: ``corral serve`` and the operator commands.

Every ``serve`` flag is also read from the environment as ``CORRAL_`` plus its name in upper
snake case (``--idle-timeout`` <-> ``CORRAL_IDLE_TIMEOUT``); a flag on the command line wins.
"""

import argparse
import gc
import os
import sys
from pathlib import Path

from supervisor.config import DEFAULT_AGENT, Config
from supervisor.limits import parse_size
from web import ops_cli

# name -> (parser, help); every entry is a Config field
SERVE_FLAGS = {
    "host": (str, "address to bind (default 127.0.0.1)"),
    "port": (int, "port to bind (default 8080)"),
    "agent": (str, f"agent class as pkg.module:Class (default {DEFAULT_AGENT})"),
    "data_dir": (Path, "where the SQLite file lives (default ~/.local/share/corral)"),
    "database_url": (str, "postgresql://... to share sessions between nodes (default: SQLite in --data-dir)"),
    "run_dir": (Path, "parent of the server's 0700 run directory"),
    "max_sessions": (int, "live sessions at most (default 1000)"),
    "max_sessions_per_tenant": (int, "live sessions per tenant at most (default 0: no cap)"),
    "idle_timeout": (float, "seconds without a message before a session is reaped (default 1800)"),
    "max_age": (float, "seconds a session's process may live (default 0: off)"),
    "memory_limit": (parse_size, "memory per session, e.g. 512M (default 512M; 0 = none)"),
    "limit_mechanism": (str, "force cgroup2 | cgroup1 | rlimit | none (default: best available)"),
    "max_restarts": (int, "respawns after crashes allowed per --restart-window (default 3)"),
    "restart_window": (float, "seconds of the restart window (default 60)"),
    "stop_timeout": (float, "seconds from the shutdown request to SIGKILL (default 10)"),
    "spawn_timeout": (float, "seconds an agent has to come up (default 10)"),
    "request_timeout": (float, "seconds a turn may take before it is interrupted (504) (default 120)"),
    "max_message_bytes": (parse_size, "largest message accepted (default 64K)"),
    "agent_frame_rate": (float, "frames a second an agent may send on its connection before it is killed (default 50000; 0 = no bound)"),
    "max_turn_bytes": (parse_size, "bytes an agent may send for one turn before it is killed (default 64M)"),
    "history_limit": (int, "messages of history handed to a restarted agent, newest first (default 1000)"),
    "history_limit_bytes": (parse_size, "bytes of history handed to a restarted agent, newest first (default 8M, at most 32M)"),
    "mailbox_size": (int, "messages in flight per session (default 32)"),
    "rate_limit": (float, "messages per second per session (default 20; 0 = off)"),
    "rate_burst": (int, "burst of the per-session rate limit (default 40)"),
    "retention": (float, "seconds ended sessions are kept (default 86400)"),
    "tenants": (Path, "TOML file with tenants and their API keys"),
    "admin_token": (str, "token for the admin API and dashboard"),
    "cors_origins": (lambda v: tuple(o.strip() for o in v.split(",") if o.strip()), "comma-separated origins allowed by CORS"),
    "log_level": (str, "debug | info | warning | error (default info)"),
    "loop": (str, "event loop: auto (uvloop when installed) | asyncio | uvloop (default auto)"),
}


def env_name(name: str) -> str:
    """The environment variable for a setting."""
    return "CORRAL_" + name.upper()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``corral``."""
    parser = argparse.ArgumentParser(prog="corral", description="One OS process per chat/agent session.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server", description=__doc__)
    for name, (parse, help_text) in SERVE_FLAGS.items():
        serve.add_argument("--" + name.replace("_", "-"), dest=name, type=parse, default=None,
                           help=f"{help_text} [env {env_name(name)}]")
    ops_cli.add_parsers(sub)
    return parser


def config_from(args: argparse.Namespace, environ=os.environ) -> Config:
    """Merge flags over environment over defaults."""
    values = {}
    for name, (parse, _) in SERVE_FLAGS.items():
        value = getattr(args, name, None)
        if value is None and environ.get(env_name(name)):
            try:
                value = parse(environ[env_name(name)])
            except (ValueError, TypeError) as exc:
                raise SystemExit(f"corral: {env_name(name)}: {exc}") from None
        if value is not None:
            values[name] = value
    try:
        return Config(**values)
    except ValueError as exc:
        raise SystemExit(f"corral: {exc}") from None


def serve(config: Config) -> int:
    """Run the server until SIGINT/SIGTERM."""
    from agent_proc.process import set_title
    from supervisor.errors import StartupError
    from supervisor.logs import configure, get_logger
    from web.app import create_app
    from web.auth import AuthConfigError

    configure(config.log_level)
    set_title(f"corral: supervisor {config.host}:{config.port}")
    log = get_logger(component="cli")
    try:
        app = create_app(config)
    except AuthConfigError as exc:
        print(f"corral: cannot start: {exc}", file=sys.stderr)
        return 1
    log.info("serving", host=config.host, port=config.port, agent=config.agent)
    try:
        run_app(app, host=config.host, port=config.port, loop=config.loop)
    except StartupError as exc:
        # e.g. a corrupt or locked SQLite file, an unreachable PostgreSQL: the operator's to fix,
        # so one line saying what (and the log event with the cause), not a traceback
        log.error("cannot_start", error=str(exc))
        print(f"corral: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


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


def run_app(app, *, host: str, port: int, loop: str = "auto") -> None:
    """Serve an aiohttp app until SIGINT/SIGTERM on the chosen event loop."""
    from aiohttp import web

    from supervisor.logs import get_logger

    event_loop = new_event_loop(loop)
    get_logger(component="cli").info("event_loop", loop=type(event_loop).__module__.split(".")[0])
    tune_gc()
    app.on_startup.append(_freeze_startup_objects)
    web.run_app(app, host=host, port=port, print=None, access_log=None, loop=event_loop)


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
