"""How agent processes are launched: a pluggable piece (like jupyter_client's provisioners).

``ZygoteSpawner`` starts one zygote with ``multiprocess`` and asks it to fork a child per
session, handing it the child's hub connection (SCM_RIGHTS over a socket pair of their own);
the zygote reports each child's pid and, the moment it dies, its wait status.
"""

import asyncio
import contextlib
import itertools
import os
import socket
import sys
from collections.abc import Callable

import multiprocess

from corral.agent_proc.zygote import recv_msg, send_msg, zygote_main
from corral.supervisor.logs import get_logger

log = get_logger(component="spawner")


class SpawnError(Exception):
    """The spawner could not start a process."""


class Spawner:
    """Interface of a process launcher."""

    async def start(self) -> None:
        """Get ready to spawn."""

    async def spawn(self, request: dict, conn: socket.socket, *, stdio: tuple[int, int] | None = None) -> int:
        """Start one agent process for ``request`` speaking on ``conn`` (stdout and stderr onto ``stdio``); return its pid."""
        raise NotImplementedError

    async def close(self) -> None:
        """Stop spawning and release resources."""


@contextlib.contextmanager
def _hidden_main_module():
    """Keep multiprocess's spawn from re-importing our entry script in the zygote.

    The entry script (``corral``, pytest, ...) imports the web stack; the zygote and every agent
    forked from it must not carry it.
    """
    main = sys.modules.get("__main__")
    saved = getattr(main, "__file__", None)
    if saved is not None:
        del main.__file__
    try:
        yield
    finally:
        if saved is not None:
            main.__file__ = saved


class ZygoteSpawner(Spawner):
    """Forks agents from a pre-warmed zygote process."""

    def __init__(
        self,
        agent_spec: str,
        *,
        on_exit: Callable[[int, int], None],
        on_lost: Callable[[], None],
        start_timeout: float = 30.0,
        zygote_options: dict | None = None,
    ):
        self.agent_spec = agent_spec
        self.on_exit = on_exit
        self.on_lost = on_lost
        self.start_timeout = start_timeout
        self.zygote_options = zygote_options or {}
        self.process = None
        self.conn = None
        self.fd_channel: socket.socket | None = None
        self.pid: int | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._ready: asyncio.Future | None = None
        self._closing = False

    async def start(self) -> None:
        """Start the zygote and wait until it has imported the agent code."""
        loop = asyncio.get_running_loop()
        ctx = multiprocess.get_context("spawn")
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.fd_channel, child_fds = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = ctx.Process(
            target=zygote_main,
            args=(child_conn, child_fds, self.agent_spec, os.getpid(), self.zygote_options),
            name="corral-zygote",
            daemon=True,
        )
        with _hidden_main_module():
            self.process.start()
        child_conn.close()
        child_fds.close()
        self.pid = self.process.pid
        self._ready = loop.create_future()
        loop.add_reader(self.conn.fileno(), self._on_readable)
        try:
            await asyncio.wait_for(self._ready, self.start_timeout)
        except asyncio.TimeoutError:
            await self.close()
            raise SpawnError(f"the zygote did not start within {self.start_timeout}s") from None
        except SpawnError:
            await self.close()
            raise
        log.info("zygote_ready", pid=self.pid, agent=self.agent_spec)

    async def spawn(self, request: dict, conn: socket.socket, *, stdio: tuple[int, int] | None = None) -> int:
        """Ask the zygote for one child speaking on ``conn``, writing stdout and stderr to ``stdio``; return its pid."""
        if self.conn is None or self._closing:
            raise SpawnError("the zygote is not running")
        spawn_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[spawn_id] = fut
        try:
            # The descriptors first (the connection, then the stdio pipes): the zygote takes them when
            # it reads the request. A few bytes on a socket of their own, so neither send blocks the loop.
            socket.send_fds(self.fd_channel, [b"c"], [conn.fileno(), *(stdio or ())])
            send_msg(self.conn, ("spawn", {**request, "spawn_id": spawn_id, "stdio": stdio is not None}))
        except (OSError, ValueError) as exc:
            self._pending.pop(spawn_id, None)
            raise SpawnError(f"the zygote is gone: {exc}") from None
        return await fut

    def _on_readable(self) -> None:
        """Handle everything the zygote has reported."""
        try:
            while self.conn is not None and self.conn.poll(0):
                self._handle(recv_msg(self.conn))
        except (EOFError, OSError):
            self._lost()

    def _handle(self, msg) -> None:
        """Dispatch one report from the zygote."""
        kind = msg[0]
        if kind == "exited":
            self.on_exit(msg[1], msg[2])
        elif kind == "spawned":
            fut = self._pending.pop(msg[1], None)
            if fut is not None and not fut.done():
                fut.set_result(msg[2])
        elif kind == "spawn_failed":
            fut = self._pending.pop(msg[1], None)
            if fut is not None and not fut.done():
                fut.set_exception(SpawnError(msg[2]))
        elif kind == "ready":
            if not self._ready.done():
                self._ready.set_result(msg[1])
        elif kind == "failed":
            if not self._ready.done():
                self._ready.set_exception(SpawnError(msg[1]))

    def _lost(self) -> None:
        """The zygote's pipe closed: it died (its children die with it)."""
        self._detach()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(SpawnError("the zygote died"))
        self._pending.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(SpawnError("the zygote exited during start-up"))
        if not self._closing:
            log.error("zygote_lost", pid=self.pid)
            self.on_lost()

    def _detach(self) -> None:
        """Stop watching the pipe and close it."""
        if self.conn is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.conn.fileno())
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None
        if self.fd_channel is not None:
            self.fd_channel.close()
            self.fd_channel = None

    async def close(self) -> None:
        """Tell the zygote to quit and wait for it; kill it if it does not go."""
        self._closing = True
        if self.conn is not None:
            with contextlib.suppress(Exception):
                send_msg(self.conn, ("quit",))
        self._detach()
        if self.process is not None:
            await _wait_process(self.process, timeout=2.0)
            self.process = None


async def _wait_process(process, *, timeout: float) -> None:
    """Wait for a child process to exit without blocking the loop; SIGKILL it past the timeout."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(process.pid)
    except (ProcessLookupError, OSError):
        process.join(0)
        return
    gone = loop.create_future()
    loop.add_reader(pidfd, lambda: gone.done() or gone.set_result(None))
    try:
        await asyncio.wait_for(gone, timeout)
    except asyncio.TimeoutError:
        process.kill()
        await gone
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        process.join(1)
