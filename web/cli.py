"""The corral command: corral serve and the operator commands.

Every serve flag is also read from the environment as CORRAL_ plus its name in upper
snake case (--idle-timeout <-> CORRAL_IDLE_TIMEOUT); a flag on the command line wins.
The flags come from the settings' declarations (supervisor/config.py).
"""

import argparse
import contextlib
import dataclasses
import gc
import os
import socket
import sys

from corral.supervisor.config import Config, SettingError, settings
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


class CommandParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 1."""

    def error(self, message: str):
        """One line on stderr, exit 1 (argparse's own prints the usage and exits 2)."""
        self.exit(1, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``corral``."""
    parser = CommandParser(prog="corral", description="One OS process per chat/agent session.")
    parser.add_argument("--version", action="version", version=f"corral {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server", description=__doc__)
    for item in settings():
        serve.add_argument(item.flag, dest=item.name, type=_parser(item.setting.kind.name, item.setting.kind.parse),
                           default=None, help=f"{item.setting.help} (default {item.shown_default}) [env {item.env}]")
    ops_cli.add_parsers(sub)
    return parser


def config_from(args: argparse.Namespace, environ=os.environ) -> Config:
    """Merge flags over environment over defaults; a bad value exits with one line naming where it came from."""
    values, sources = {}, {}
    for item in settings():
        name, parse = item.name, _parser(item.setting.kind.name, item.setting.kind.parse)
        value, source = getattr(args, name, None), item.flag
        if value is None and environ.get(item.env):
            source = item.env
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
    from corral.web.serving import Ladder

    event_loop = new_event_loop(config.loop)
    # first, before the web stack is imported: from here a stop signal is queued, not a traceback
    ladder = Ladder(event_loop)
    from corral.agent_proc.process import set_title
    from corral.supervisor.errors import StartupError
    from corral.supervisor.logs import configure, get_logger
    from corral.web.app import create_app
    from corral.web.auth import AuthConfigError

    try:
        # the port, then the node's identity, before anything touches the store: a second server
        # on a taken port or a held identity stops here and leaves the live one's sessions alone
        config, sockets = listen(config)
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
        run_app(app, sockets=sockets, loop=event_loop, ladder=ladder)
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
            loop="auto", ladder=None) -> None:
    """Serve an aiohttp app (on ``sockets``, else on host:port) until SIGINT/SIGTERM stop it (web/serving.py).

    ``loop`` is an event loop, or the name of the kind to make (``new_event_loop``); ``ladder`` the
    shutdown ladder already installed on it, if any.
    """
    from corral.supervisor.logs import get_logger
    from corral.web import serving
    from corral.web.keys import SUPERVISOR

    event_loop = new_event_loop(loop) if isinstance(loop, str) else loop
    get_logger(component="cli").info("event_loop", loop=type(event_loop).__module__.split(".")[0])
    tune_gc()
    app.on_startup.append(_freeze_startup_objects)
    if sockets is None:
        sockets = bind_sockets(host, port)
    serving.serve(app, sockets, event_loop, ladder=ladder, supervisor=app.get(SUPERVISOR))


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
