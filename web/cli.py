"""The corral command: corral serve and the operator commands.

Every serve flag is also read from the environment as CORRAL_ plus its name in upper
snake case (--idle-timeout <-> CORRAL_IDLE_TIMEOUT); a flag on the command line wins.
The flags come from the settings' declarations (supervisor/config.py).
"""

from corral.web import argv_secrets

# First of all, before the imports below take their ~0.1 s: the console script imports this module.
SECRET_FLAGS_GIVEN = argv_secrets.hide()

import os  # noqa: E402 (after hiding the secrets)
import signal  # noqa: E402


def _interrupted_while_loading(signum, frame) -> None:
    """A Ctrl-C while corral's modules load (nothing started yet): leave at once with 130, without a traceback."""
    os._exit(128 + signum)


# Until the imports below are done (the serve command then sets up its own shutdown ladder); the
# previous handler comes back at the end of this module.
try:
    _HANDLER_BEFORE_IMPORTS = signal.signal(signal.SIGINT, _interrupted_while_loading)
except ValueError:  # imported outside the main thread (not as the command): nothing to guard
    _HANDLER_BEFORE_IMPORTS = None

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import difflib  # noqa: E402
import errno  # noqa: E402
import gc  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

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
    """argparse that reports a usage error as one line and exit code 1, by the (sub)command at fault."""

    def __init__(self, *args, **kwargs):
        self.flags: list[str] = []  # every option string, for suggestions
        self.commands = None  # the subparsers action, if this parser has subcommands
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        """Add an argument and remember its option strings."""
        action = super().add_argument(*args, **kwargs)
        self.flags.extend(action.option_strings)
        return action

    def add_subparsers(self, **kwargs):
        """Add subcommands and remember where they are."""
        self.commands = super().add_subparsers(**kwargs)
        return self.commands

    def parse_args(self, args=None, namespace=None):
        """Parse; an unknown argument is reported by the subcommand it was given to, with the nearest flag."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self.chosen(parsed)
            hint = parser.suggest(extras)
            parser.error(f"unrecognized arguments: {' '.join(extras)}" + (f"; did you mean {hint}?" if hint else ""))
        return parsed

    def chosen(self, parsed: argparse.Namespace) -> "CommandParser":
        """The innermost (sub)command parser the parsed arguments went to."""
        parser = self
        while parser.commands is not None and getattr(parsed, parser.commands.dest, None) in parser.commands.choices:
            parser = parser.commands.choices[getattr(parsed, parser.commands.dest)]
        return parser

    def suggest(self, extras: list[str]) -> str | None:
        """The known flag nearest an unknown one among ``extras``, if any is near."""
        for extra in extras:
            if extra.startswith("-"):
                near = difflib.get_close_matches(extra.partition("=")[0], self.flags, n=1, cutoff=0.6)
                if near:
                    return near[0]
        return None

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
                           default=None, action="append" if item.setting.kind.repeat else "store",
                           help=f"{item.setting.help} (default {item.shown_default}) [env {item.env}]")
    ops_cli.add_parsers(sub)
    return parser


def config_from(args: argparse.Namespace, environ=os.environ) -> Config:
    """Merge flags over environment over defaults; a bad value exits with one line naming where it came from."""
    values, sources = {}, {}
    for item in settings():
        name, parse = item.name, _parser(item.setting.kind.name, item.setting.kind.parse_all)
        value, source = getattr(args, name, None), item.flag
        if isinstance(value, list):  # a repeated flag
            value = tuple(value)
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
                         f"(got {_shown(values.get(exc.name))})") from None
    except ValueError as exc:
        raise SystemExit(f"corral: {exc}") from None


def _shown(value) -> str:
    """A setting's value in an error line: a path as the text it was given as."""
    return repr(str(value)) if isinstance(value, os.PathLike) else repr(value)


def serve(config: Config) -> int:
    """Run the server until SIGINT/SIGTERM."""
    from corral.web.serving import Ladder

    event_loop = new_event_loop(config.loop)
    # first, before the web stack is imported: from here a stop signal is queued, not a traceback
    ladder = Ladder(event_loop)
    from corral.agent_proc.process import set_title
    from corral.supervisor import descriptors
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
    log = get_logger(component="cli")
    if SECRET_FLAGS_GIVEN:
        log.warning("secret_on_command_line", flags=sorted(set(SECRET_FLAGS_GIVEN)),
                    detail="hidden from /proc/PID/cmdline at start, but visible to every local user until then and "
                           "kept by shells and process accounting: use --admin-token-file / --database-url-file "
                           "(or CORRAL_ADMIN_TOKEN_FILE / CORRAL_DATABASE_URL_FILE) instead")
    agents_importable_from_cwd()
    soft, hard = descriptors.raise_limit(config.max_sessions)  # a process-wide choice: here, not in the supervisor
    set_title(f"corral: supervisor {config.host}:{config.port}")
    log.info("open_files_limit", soft=soft, hard=hard, needed=descriptors.needed(config.max_sessions))
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
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        # another process took to listening on the port while this one started (bound, not listening)
        print(f"corral: cannot start: cannot listen on {config.host}:{config.port}: {describe_os_error(exc)}",
              file=sys.stderr)
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
    """Sockets bound on every address ``host`` resolves to (as aiohttp would bind them), not yet listening.

    aiohttp listens on them once the app has started (store, zygote, the agent's checks): a server
    that refuses to start never opened its port, and a client is refused rather than left waiting.
    A port someone listens on is refused here already.
    """
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
    event_loop.set_exception_handler(AcceptPauses())
    tune_gc()
    app.on_startup.append(_freeze_startup_objects)
    if sockets is None:
        sockets = bind_sockets(host, port)
    serving.serve(app, sockets, event_loop, ladder=ladder, supervisor=app.get(SUPERVISOR))


# What an accept() that meets a full descriptor table (or no memory) raises: the loop stops accepting
# for a second and tries again, and the server goes on. asyncio reports it to the loop's exception
# handler, whose default logs a traceback at error level.
ACCEPT_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class AcceptPauses:
    """The loop's exception handler: an accept out of descriptors is a warning line (at most one a
    second, with how many it stands for); anything else goes to the loop's default handler."""

    def __init__(self):
        self.last = 0.0
        self.unreported = 0

    def __call__(self, loop, context: dict) -> None:
        """Handle one error the loop reports."""
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in ACCEPT_EXHAUSTION and "accept" in context.get("message", "")):
            loop.default_exception_handler(context)
            return
        self.unreported += 1  # asyncio calls this once per accept it tries in the pass, up to its backlog
        now = time.monotonic()
        if now - self.last >= 1.0:
            from corral.supervisor.logs import get_logger

            get_logger(component="cli").warning("accept_paused", reason=exc.strerror, retry_seconds=1,
                                                times=self.unreported)
            self.last, self.unreported = now, 0


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
    # Ctrl-C goes on leaving quietly while serve loads the web stack, until its shutdown ladder
    # takes the signal over; the other commands have it back as KeyboardInterrupt.
    previous = _quiet_interrupts()
    try:
        args = build_parser().parse_args(argv)
        if args.command == "serve":
            return serve(config_from(args))
    finally:
        _restore_interrupts(previous)
    return ops_cli.run(args)


def _quiet_interrupts():
    """Make a Ctrl-C leave at once with 130 (in the main thread); the handler it replaced, or None."""
    try:
        return signal.signal(signal.SIGINT, _interrupted_while_loading)
    except ValueError:  # not the main thread: nothing to guard
        return None


def _restore_interrupts(previous) -> None:
    """Put ``previous`` back unless someone (serve's ladder) has taken SIGINT over since."""
    if previous is not None and signal.getsignal(signal.SIGINT) is _interrupted_while_loading:
        signal.signal(signal.SIGINT, previous)


_restore_interrupts(_HANDLER_BEFORE_IMPORTS)  # the imports are done: Ctrl-C is the importer's again
