"""How agent processes are launched: ``ZygoteSpawner``, the ``Launcher`` corral ships (supervisor/launcher.py).

``ZygoteSpawner`` starts one zygote (a fresh interpreter with a clean environment: nothing of the
server's command line, environment or memory) and asks it to fork a child per session, handing it
the child's hub connection (SCM_RIGHTS over a socket pair of their own); the zygote's output relay
(a process it forks: agent_proc/output_relay.py) reports each child's pid, what it writes to stdout
and stderr (the relay holds its output pipe) and, the moment it dies, its wait status (by spawn id,
in the typed records of agent_proc/zygote_messages.py, over a pipe of its own), so the server holds
no descriptor per child but its hub connection.
A sandbox layer or another launcher goes behind the same ``Launcher`` interface.
"""

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import multiprocess

from corral.agent_proc import zygote_messages as msgs
from corral.agent_proc.zygote import STOP_SIGNALS
from corral.supervisor.launcher import LAUNCHER_DIED, AgentProcess, Exit, Launcher, OutputSink, SpawnError
from corral.supervisor.logs import get_logger
from corral.supervisor.reaper import describe_status

__all__ = ["ZygoteSpawner", "SpawnError", "AgentProcess", "Exit", "ZYGOTE_DIED"]

log = get_logger(component="spawner")

ZYGOTE_DIED = LAUNCHER_DIED  # the wait status reported for agents that died with their zygote
REPORTS_PER_WAKEUP = 64  # the zygote's records handled per loop wakeup: a stream of output never starves the loop


# The zygote's whole command line: the interpreter, this, and the numbers of its three descriptors.
# Not multiprocess's spawn: that hands the child the server's environment and pickles its sys.argv
# (which may hold --admin-token), its main module and its authkey into it.
ZYGOTE_BOOT = "from corral.agent_proc.zygote import boot; boot()"


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


class ZygoteSpawner(Launcher):
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
        environment: dict[str, str] | None = None,
        gateway=None,
    ):
        self.agent_spec = agent_spec
        self.limiter = limiter  # supervisor/limit_plan.py: a memory limit per process
        self.sandbox = sandbox  # supervisor/sandbox_plan.py: a uid, a temp dir and the layers per process
        self.on_lost = on_lost
        self.gateway = gateway  # supervisor/egress/gateway.py: serves the listener the zygote makes in the agents' namespace
        self.start_timeout = start_timeout
        self.zygote_options = sandbox.zygote_options()
        # the zygote's whole environment (agent_proc/environment.py): agents fork from it
        self.environment = environment if environment is not None else {}
        self.process = None
        self.conn = None
        self.relay_conn = None  # the output relay's: Spawned, Output and Exited come on it, PauseOutput goes
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
        self.heap: str | None = None  # whether the objects its agents share are immortal (agent_proc/immortal.py)
        self._closing = False

    async def start(self) -> None:
        """Start the zygote and wait until it has imported the agent code."""
        loop = asyncio.get_running_loop()
        self.conn, child_conn = multiprocess.Pipe(duplex=True)
        self.fd_channel, child_fds = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.relay_conn, child_relay = multiprocess.Pipe(duplex=True)
        passed = (child_conn.fileno(), child_fds.fileno(), child_relay.fileno())
        try:
            with _stop_signals_held():  # the new interpreter inherits the mask; the zygote unblocks them
                self.process = subprocess.Popen([sys.executable, "-c", ZYGOTE_BOOT, *map(str, passed)],
                                                env=self.environment, stdin=subprocess.DEVNULL, pass_fds=passed)
        finally:
            child_conn.close()
            child_fds.close()
            child_relay.close()
        msgs.send(self.conn, msgs.Start(agent=self.agent_spec, supervisor_pid=os.getpid(),
                                        options=self.zygote_options, sys_path=list(sys.path)))
        self.pid = self.process.pid
        self._ready = loop.create_future()
        loop.add_reader(self.conn.fileno(), self._on_readable, "conn")
        try:
            ready = await asyncio.wait_for(self._ready, self.start_timeout)
            self.fork, self.heap = ready.fork, ready.heap
        except asyncio.TimeoutError:
            await self.close()
            raise SpawnError(f"the zygote did not start within {self.start_timeout}s") from None
        except BaseException:  # its error, or a stop signal during start-up: the zygote goes too
            await self.close()
            raise
        # Once ready: the relay is forked then, and a zygote that failed to start must be heard saying why.
        loop.add_reader(self.relay_conn.fileno(), self._on_readable, "relay_conn")
        if self.zygote_options.get("net_namespace") and self.gateway is not None:
            await self._serve_gateway()
        log.info("zygote_ready", pid=self.pid, agent=self.agent_spec, fork=self.fork, heap=self.heap)

    async def _serve_gateway(self) -> None:
        """Take the gateway's listener the zygote made in the agents' namespace (queued before "ready") and serve it."""
        try:
            _, fds, _, _ = socket.recv_fds(self.fd_channel, 1, 1, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except OSError as exc:
            await self.close()
            raise SpawnError(f"the zygote sent no gateway listener: {exc}") from None
        await self.gateway.serve(socket.socket(fileno=fds[0]))

    async def launch(self, key: str, request: dict, conn: socket.socket, *,
                     output: OutputSink | None = None) -> AgentProcess:
        """Start one agent process speaking on ``conn`` (what it writes to stdout and stderr fed to ``output``).

        ``key`` names its cgroup and temp dir; ``request`` (session_id, routing_id, tenant) goes to
        the child. Raises SpawnError (nothing left behind) if it cannot be started.
        """
        if self.conn is None or self._closing:
            raise SpawnError("the zygote is not running")
        proc = AgentProcess(next(self._ids), asyncio.get_running_loop().create_future(), output=output)
        proc.exited.add_done_callback(_consume)
        # One name per spawn: a session ended and begun again counts its generations from 1 anew,
        # and its last process's cgroup may still be being released on the worker thread.
        key = f"{key}.{proc.spawn_id}"
        try:
            proc.limits = self.limiter.prepare(key)
        except OSError as exc:
            raise SpawnError.from_os_error(f"cannot set up the memory limit: {exc}", exc.errno, retry_after=5) from None
        try:
            proc.sandbox = self.sandbox.prepare(key)
        except OSError as exc:
            self._release(proc)
            raise SpawnError.from_os_error(f"cannot set up the sandbox: {exc.strerror or exc}", exc.errno,
                                           retry_after=5) from None
        env = dict(request.get("env") or {})
        if self.gateway is not None and self.zygote_options.get("net_namespace"):
            proc.egress_token, grant_env = self.gateway.grant(request["session_id"], request["tenant"])
            env.update(grant_env)
        try:
            spawn = msgs.Spawn(spawn_id=proc.spawn_id, session_id=request["session_id"],
                               routing_id=request.get("routing_id"), tenant=request["tenant"],
                               limits=proc.limits, sandbox=proc.sandbox, output=output is not None, env=env)
            proc.pid = await self._fork(proc, spawn, conn)
        except BaseException:
            if self._procs.pop(proc.spawn_id, None) is proc:
                self._release(proc)
            raise
        return proc

    async def _fork(self, proc: AgentProcess, spawn: msgs.Spawn, conn: socket.socket) -> int:
        """Send the zygote the connection and the request; return the child's pid."""
        fut = asyncio.get_running_loop().create_future()
        self._pending[proc.spawn_id] = fut
        self._procs[proc.spawn_id] = proc
        try:
            # The connection first: the zygote takes it when it reads the request. A few bytes on a
            # socket of their own, so neither send blocks the loop.
            socket.send_fds(self.fd_channel, [b"c"], [conn.fileno()])
            msgs.send(self.conn, spawn)
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

    def _on_readable(self, name: str) -> None:
        """Handle what the zygote (``conn``) or its output relay (``relay_conn``) has reported."""
        try:
            for _ in range(REPORTS_PER_WAKEUP):  # the rest, if any, on the next wakeup
                conn = getattr(self, name)
                if conn is None or not conn.poll(0):
                    break
                self._handle(msgs.recv(conn))
        except (EOFError, OSError, ValueError):
            self._lost()

    def _handle(self, msg) -> None:
        """Dispatch one report from the zygote."""
        if isinstance(msg, msgs.Output):
            self._output(msg.chunks)
        elif isinstance(msg, msgs.Exited):
            proc = self._procs.pop(msg.spawn_id, None)
            if proc is not None:
                self._exited(proc, msg.status, describe_status(msg.status), msg.cpu_seconds)
        elif isinstance(msg, (msgs.Spawned, msgs.SpawnFailed)):
            fut = self._pending.pop(msg.spawn_id, None)
            if fut is not None and not fut.done():
                if isinstance(msg, msgs.Spawned):
                    proc = self._procs.get(msg.spawn_id)
                    if proc is not None:
                        proc.pid = msg.pid  # now: its output may come before launch returns
                    fut.set_result(msg.pid)
                else:
                    fut.set_exception(SpawnError.from_os_error(msg.reason, msg.errno))
        elif isinstance(msg, (msgs.Ready, msgs.Failed)):
            if not self._ready.done():
                if isinstance(msg, msgs.Ready):
                    self._ready.set_result(msg)  # how it forks agents (agent_proc/forking.py), its heap
                else:
                    self._ready.set_exception(SpawnError(msg.reason))

    def _output(self, chunks: tuple) -> None:
        """Feed what agents wrote to their sinks; ask the zygote to pause the pipes whose budget is spent."""
        for spawn_id, data in chunks:
            proc = self._procs.get(spawn_id)
            if proc is not None and proc.output is not None:
                pause = proc.output.feed(proc.pid, data)
                if pause and self.relay_conn is not None:
                    msgs.send(self.relay_conn, msgs.PauseOutput(spawn_id, pause))

    def _exited(self, proc: AgentProcess, status: int, description: str, cpu_seconds: float | None = None) -> None:
        """A process is gone: take the memory limit's verdict, free its limits and sandbox, report it."""
        oom = status != ZYGOTE_DIED and bool(proc.limits) and self.limiter.oom_killed(proc.limits)
        self._release(proc)
        if not proc.exited.done():
            proc.exited.set_result(Exit(status, oom, description, cpu_seconds))

    def _release(self, proc: AgentProcess) -> None:
        """Free a process's sandbox now and its cgroup on a worker thread (emptying one may wait)."""
        if proc.sandbox:
            self.sandbox.release(proc.sandbox)
            proc.sandbox = None
        if proc.egress_token:
            self.gateway.revoke(proc.egress_token)
            proc.egress_token = None
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
        """Stop watching the pipes and close them."""
        for name in ("conn", "relay_conn"):
            conn = getattr(self, name)
            if conn is not None:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(conn.fileno())
                with contextlib.suppress(Exception):
                    conn.close()
                setattr(self, name, None)
        if self.fd_channel is not None:
            self.fd_channel.close()
            self.fd_channel = None

    async def close(self) -> None:
        """Tell the zygote to quit and wait for it (kill it if it does not go), and for the releases."""
        self._closing = True
        if self.conn is not None:
            with contextlib.suppress(Exception):
                msgs.send(self.conn, msgs.Quit())
        self._detach()
        if self.process is not None:
            await _wait_process(self.process, timeout=2.0)
            self.process = None
        if self._releases:
            await asyncio.wait(list(self._releases))
        self._release_worker.shutdown(wait=False)


def _consume(fut: asyncio.Future) -> None:
    """Mark a future's exception as seen (its waiters may be gone)."""
    if not fut.cancelled():
        fut.exception()


async def _wait_process(process: subprocess.Popen, *, timeout: float) -> None:
    """Wait for a child process to exit without blocking the loop; SIGKILL it past the timeout."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(process.pid)
    except (ProcessLookupError, OSError):
        process.poll()
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
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(1)
