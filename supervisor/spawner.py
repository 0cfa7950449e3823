"""How agent processes are launched: a pluggable piece (like jupyter_client's provisioners).

``ZygoteSpawner`` starts one zygote with ``multiprocess`` and asks it to fork a child per
session, handing it the child's hub connection (SCM_RIGHTS over a socket pair of their own);
the zygote reports each child's pid and, the moment it dies, its wait status (by spawn id).
It is the one plug between the supervisor and a process: a sandbox layer or another launcher goes
behind the same ``launch``/``signal``/``kill``/``exited`` interface.
"""

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import multiprocess
from multiprocess import resource_tracker

from corral.agent_proc.zygote import STOP_SIGNALS, recv_msg, send_msg, zygote_main
from corral.supervisor.logs import get_logger
from corral.supervisor.reaper import describe_status

log = get_logger(component="spawner")


class SpawnError(Exception):
    """The spawner could not start a process; ``retry_after`` is the client's hint (seconds)."""

    def __init__(self, message: str, *, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


# The wait status reported for agents that died with their zygote.
ZYGOTE_DIED = -1


@dataclass(frozen=True)
class Exit:
    """How an agent process ended: its wait status, the memory limit's verdict, in words."""

    status: int
    oom: bool
    description: str


@dataclass(eq=False)
class AgentProcess:
    """One launched agent process: its pid, what was set up for it, and its exit (a future)."""

    spawn_id: int
    exited: asyncio.Future  # resolves to an Exit once the process is gone and its limits released
    pid: int | None = None
    limits: dict | None = None
    sandbox: dict | None = None


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


@contextlib.contextmanager
def _stop_signals_held():
    """Hold SIGINT/SIGTERM while the zygote is started: it begins with them blocked (until it ignores them).

    A Ctrl-C reaches the whole process group; landing in the new interpreter before the zygote's
    first line, it would kill it with a traceback. Here it waits, pending, for the ``finally``.
    """
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class ZygoteSpawner:
    """The process launcher: forks agents from a pre-warmed zygote, inside their limits and sandbox.

    Everything the supervisor does to an agent's process goes through here: ``launch`` (limits and
    sandbox set up, fork), ``signal``/``kill`` (its whole process group), and its exit, reported on
    the ``AgentProcess``'s ``exited`` future by spawn id (so a child that dies before ``launch``
    returns is never lost) once its limits and sandbox are released.
    """

    def __init__(
        self,
        agent_spec: str,
        *,
        limiter,
        sandbox,
        on_lost: Callable[[], None],
        start_timeout: float = 30.0,
    ):
        self.agent_spec = agent_spec
        self.limiter = limiter  # supervisor/limits.py: a memory limit per process
        self.sandbox = sandbox  # supervisor/sandbox.py: a uid, a temp dir and the layers per process
        self.on_lost = on_lost
        self.start_timeout = start_timeout
        self.zygote_options = sandbox.zygote_options()
        self.process = None
        self.conn = None
        self.fd_channel: socket.socket | None = None
        self.pid: int | None = None  # the zygote's
        self._pending: dict[int, asyncio.Future] = {}  # spawn id -> its pid, until the zygote reports it
        self._procs: dict[int, AgentProcess] = {}  # spawn id -> a launched process, until its exit
        self._releases: set[asyncio.Future] = set()  # cgroups being emptied and removed off the loop
        # One thread of its own for that, not the loop's default pool: that pool grows a thread per
        # overlapping release (up to cpus + 4), which churn saw as the server's thread count creeping.
        self._release_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-release")
        self._ids = itertools.count(1)
        self._ready: asyncio.Future | None = None
        self.fork: str | None = None  # how the zygote forks agents, once it is ready
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
        # the resource tracker first: starting it unblocks SIGINT/SIGTERM, which would undo the hold
        resource_tracker.ensure_running()
        with _hidden_main_module(), _stop_signals_held():
            self.process.start()
        child_conn.close()
        child_fds.close()
        self.pid = self.process.pid
        self._ready = loop.create_future()
        loop.add_reader(self.conn.fileno(), self._on_readable)
        try:
            self.fork = await asyncio.wait_for(self._ready, self.start_timeout)
        except asyncio.TimeoutError:
            await self.close()
            raise SpawnError(f"the zygote did not start within {self.start_timeout}s") from None
        except BaseException:  # its error, or a stop signal during start-up: the zygote goes too
            await self.close()
            raise
        log.info("zygote_ready", pid=self.pid, agent=self.agent_spec, fork=self.fork)

    async def launch(self, key: str, request: dict, conn: socket.socket, *,
                     stdio: tuple[int, int] | None = None) -> AgentProcess:
        """Start one agent process speaking on ``conn`` (stdout and stderr onto ``stdio``).

        ``key`` names its cgroup and temp dir; ``request`` (session_id, routing_id, tenant) goes to
        the child. Raises SpawnError (nothing left behind) if it cannot be started.
        """
        if self.conn is None or self._closing:
            raise SpawnError("the zygote is not running")
        proc = AgentProcess(next(self._ids), asyncio.get_running_loop().create_future())
        proc.exited.add_done_callback(_consume)
        # One name per spawn: a session ended and begun again counts its generations from 1 anew,
        # and its last process's cgroup may still be being released on the worker thread.
        key = f"{key}.{proc.spawn_id}"
        try:
            proc.limits = self.limiter.prepare(key)
        except OSError as exc:
            raise SpawnError(f"cannot set up the memory limit: {exc}", retry_after=5) from None
        try:
            proc.sandbox = self.sandbox.prepare(key)
        except OSError as exc:
            self._release(proc)
            raise SpawnError(f"cannot set up the sandbox: {exc}", retry_after=5) from None
        try:
            proc.pid = await self._fork(proc, {**request, "limits": proc.limits, "sandbox": proc.sandbox}, conn, stdio)
        except BaseException:
            if self._procs.pop(proc.spawn_id, None) is proc:
                self._release(proc)
            raise
        return proc

    async def _fork(self, proc: AgentProcess, request: dict, conn: socket.socket, stdio) -> int:
        """Send the zygote the descriptors and the request; return the child's pid."""
        fut = asyncio.get_running_loop().create_future()
        self._pending[proc.spawn_id] = fut
        self._procs[proc.spawn_id] = proc
        try:
            # The descriptors first (the connection, then the stdio pipes): the zygote takes them when
            # it reads the request. A few bytes on a socket of their own, so neither send blocks the loop.
            socket.send_fds(self.fd_channel, [b"c"], [conn.fileno(), *(stdio or ())])
            send_msg(self.conn, ("spawn", {**request, "spawn_id": proc.spawn_id, "stdio": stdio is not None}))
        except (OSError, ValueError) as exc:
            self._pending.pop(proc.spawn_id, None)
            raise SpawnError(f"the zygote is gone: {exc}") from None
        return await fut

    def signal(self, proc: AgentProcess, sig: int) -> bool:
        """Send a signal to an agent's process group; False if it is gone (or not forked yet)."""
        if proc.pid is None or proc.exited.done():
            return False
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def kill(self, proc: AgentProcess) -> bool:
        """SIGKILL an agent's process group."""
        return self.signal(proc, signal.SIGKILL)

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
            proc = self._procs.pop(msg[1], None)
            if proc is not None:
                self._exited(proc, msg[2], describe_status(msg[2]))
        elif kind in ("spawned", "spawn_failed"):
            fut = self._pending.pop(msg[1], None)
            if fut is not None and not fut.done():
                if kind == "spawned":
                    fut.set_result(msg[2])
                else:
                    fut.set_exception(SpawnError(msg[2]))
        elif kind in ("ready", "failed"):
            if not self._ready.done():
                if kind == "ready":
                    self._ready.set_result(msg[2])  # how it forks agents (agent_proc/forking.py)
                else:
                    self._ready.set_exception(SpawnError(msg[1]))

    def _exited(self, proc: AgentProcess, status: int, description: str) -> None:
        """A process is gone: take the memory limit's verdict, free its limits and sandbox, report it."""
        oom = status != ZYGOTE_DIED and bool(proc.limits) and self.limiter.oom_killed(proc.limits)
        self._release(proc)
        if not proc.exited.done():
            proc.exited.set_result(Exit(status, oom, description))

    def _release(self, proc: AgentProcess) -> None:
        """Free a process's sandbox now and its cgroup on a worker thread (emptying one may wait)."""
        if proc.sandbox:
            self.sandbox.release(proc.sandbox)
            proc.sandbox = None
        if proc.limits:
            task = asyncio.get_running_loop().run_in_executor(self._release_worker, self.limiter.release, proc.limits)
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)
            proc.limits = None

    def _lost(self) -> None:
        """The zygote's pipe closed: it died, and its children with it."""
        self._detach()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(SpawnError("the zygote died"))
        self._pending.clear()
        procs, self._procs = list(self._procs.values()), {}
        for proc in procs:
            self._exited(proc, ZYGOTE_DIED, "the zygote died")
        self._release_worker.shutdown(wait=False)  # this spawner is done; what is queued still runs
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
        """Tell the zygote to quit and wait for it (kill it if it does not go), and for the releases."""
        self._closing = True
        if self.conn is not None:
            with contextlib.suppress(Exception):
                send_msg(self.conn, ("quit",))
        self._detach()
        if self.process is not None:
            await _wait_process(self.process, timeout=2.0)
            self.process = None
        if self._releases:
            await asyncio.wait(list(self._releases))
        self._release_worker.shutdown(wait=False)


def kill_leftover_children() -> None:
    """SIGKILL any zygote still running (its close was cut short): multiprocess's exit hook would wait on it forever.

    At exit multiprocess SIGTERMs its daemonic children and joins them; the zygote ignores SIGTERM.
    """
    for child in multiprocess.active_children():
        child.kill()
        child.join(1)


def _consume(fut: asyncio.Future) -> None:
    """Mark a future's exception as seen (its waiters may be gone)."""
    if not fut.cancelled():
        fut.exception()


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
