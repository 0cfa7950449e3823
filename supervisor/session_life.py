"""One session's process life: spawn, exit, the stop sequence, interrupt, its timers.

``SessionLife`` is to the registry (``Supervisor``, supervisor/registry.py) what jupyter_client's
``KernelManager`` is to its ``MultiKernelManager``: one per session (``session.life``), it owns the
state that is not in the state table (``dying``, ``stop_reason``, ``kill_reason``, the
``starting``/``ready``/``exited`` futures) and everything that happens to the session's process,
and cancels the session's named timers when it goes. Its turns are a part it holds, ``turns``
(supervisor/turns.py), which asks it for what it needs through ``TurnsProcess``. It reaches the
registry only through ``SessionHost`` (supervisor/session_host.py), changes the session's state
only through its ``transition``, and reaches processes only through the spawner
(supervisor/spawner.py).
"""

import asyncio
import contextlib
import functools
import secrets
import signal
import time

from corral.agent_proc import protocol as p
from corral.supervisor import descriptors, errors, states
from corral.supervisor.launcher import RESOURCE_CODES
from corral.supervisor.logs import get_logger
from corral.supervisor.reaper import classify_exit
from corral.supervisor.session_host import SessionHost
from corral.supervisor.spawner import SpawnError
from corral.supervisor.turns import DEATH_CODES, Turns, consume

log = get_logger(component="supervisor")

# An interrupt is signalled again this often while its turn is still running (a lost SIGINT).
INTERRUPT_RESEND_AFTER = 0.5
INTERRUPT_RESENDS = 4


class SessionLife:
    """The life of one session's process, and the state of it that is not the session's state."""

    def __init__(self, session, host: SessionHost):
        self.session = session
        self.host = host  # the registry, through the interface a session may use (supervisor/session_host.py)
        self.dying = False  # the agent announced its death (FAIL agent_crashed/agent_oom) and is exiting
        self.stop_reason: str | None = None  # the state a stop we asked for ends in
        self.kill_reason: str | None = None  # why the supervisor killed the current process (flood, unresponsive, ...)
        self.starting: asyncio.Future | None = None  # resolves when a spawn finishes (either way)
        self.ready: asyncio.Future | None = None  # resolves on the agent's READY
        self.exited: asyncio.Future | None = None  # resolves when the current process is gone
        self.turns = Turns(session, host, self)  # the turns sent to the current process (supervisor/turns.py)
        self.interrupts = 0  # SIGINTs sent to the current process
        self.generation = 0  # spawns so far
        # The routing id of the current process's hub connection: the session id plus a per-spawn suffix.
        self.routing_id = b""
        self.process = None  # the spawner's AgentProcess for the current process
        self.launcher = None  # the spawner that launched it (signals go through it)

    def cancel_timer(self, name: str) -> None:
        """Cancel one named timer, if set."""
        handle = self.session.timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    def cancel_timers(self, *names: str) -> None:
        """Cancel the named timers, or all of them."""
        for name in names or list(self.session.timers):
            self.cancel_timer(name)

    async def ensure_live(self) -> None:
        """Make sure the session has a ready process, spawning (or respawning) it if needed."""
        s = self.session
        while True:
            if s.state in (states.IDLE, states.BUSY) and self.dying:
                await asyncio.shield(self.exited)  # its exit report brings it down; then respawn
                continue
            if s.state in (states.IDLE, states.BUSY):
                return
            if s.state == states.STARTING:
                await asyncio.shield(self.starting)
                if s.state not in (states.IDLE, states.BUSY):
                    raise errors.AgentDied(f"session {s.id} failed to start ({s.exit_description})")
                return
            if s.state == states.STOPPING:
                await asyncio.shield(self.exited)
                continue
            self._begin_spawn()

    def _begin_spawn(self) -> None:
        """Check policy and capacity, then start a spawn task (synchronously, so checks hold)."""
        s = self.session
        if self.host.closing:
            raise errors.Unavailable("the server is shutting down", retry_after=5)
        restart = s.state in states.UNPLANNED or s.state == states.FAILED
        if restart:
            wait = self.host.policy.retry_after(s)
            if wait:
                if s.state != states.FAILED:
                    self.host.transition(s, states.FAILED, reason="restart budget spent")
                raise errors.SessionFailed(
                    f"session {s.id} crashed {len(s.restarts)} times in {self.host.config.restart_window:g}s; "
                    f"it can restart in {wait:.0f}s or be removed by an admin",
                    retry_after=wait,
                )
        self.host.check_capacity(s)
        self.cancel_timer("forget")
        if restart:
            self.host.policy.record(s)
            self.host.counters["restarts"] += 1
        self.host.transition(s, states.STARTING)
        self.starting = asyncio.ensure_future(self._spawn())
        self.starting.add_done_callback(consume)

    async def _spawn(self) -> None:
        """Fork the agent, wait for READY, hand it its history; the session ends up idle."""
        s = self.session
        loop = asyncio.get_running_loop()
        self.generation += 1
        # Unique per spawn, so a frame still in flight from a previous process of the session
        # (on its own, older connection) is never taken for the new one's.
        self.routing_id = f"{s.key}/{self.generation}/{secrets.token_hex(4)}".encode()
        self.stop_reason = s.end_reason = s.exit_description = self.kill_reason = None
        self.dying = False
        self.turns.new_process()
        self.interrupts = 0
        self.ready, self.exited = loop.create_future(), loop.create_future()
        self.exited.add_done_callback(consume)
        self.host.index(s, routing_id=self.routing_id)
        started = time.monotonic()
        try:
            history = await self.host.prepare_spawn(s)
            await self._fork()
            await asyncio.wait_for(asyncio.shield(self.ready), self.host.config.spawn_timeout)
            self._still_starting()  # it may have died between READY and now
            start = self.turns.send(p.START, p.start_body(history, s.metadata), None)
            await asyncio.wait_for(asyncio.shield(start.future), self.host.config.spawn_timeout)
        except asyncio.TimeoutError as exc:
            await self._spawn_failed(exc)
            raise errors.AgentDied(f"session {s.id} failed to start ({s.exit_description})") from None
        except BaseException as exc:
            await self._spawn_failed(exc)
            raise
        s.spawned_at = time.monotonic()
        self.host.counters["spawns"] += 1
        self.host.events.publish("spawned", s.key, tenant=s.tenant, pid=s.pid, seconds=s.spawned_at - started)
        self.host.transition(s, states.BUSY if self.turns.pending else states.IDLE)
        self.host.reaper.arm_age(s)

    def _still_starting(self) -> None:
        """Raise if the process being started has already died."""
        s = self.session
        if s.state != states.STARTING:
            raise errors.AgentDied(f"session {s.id} died while starting ({s.exit_description})")

    async def _fork(self) -> None:
        """Ask the spawner for a process inside the session's memory limit."""
        s = self.session
        spawner = await self.host.ready_spawner()
        conn = await self._agent_connection()
        try:
            proc = await spawner.launch(f"s{self.generation}-{s.key.replace('/', '-')}",
                                        {"session_id": s.id, "routing_id": self.routing_id, "tenant": s.tenant,
                                         "env": self.host.agent_env(s.tenant)},
                                        conn, output=self.host.output.attach(s))
        except SpawnError as exc:
            self.host.output.detach(s)
            raise errors.Unavailable(str(exc), retry_after=exc.retry_after, code=exc.code) from None
        except BaseException:
            self.host.output.detach(s)
            raise
        finally:
            conn.close()  # the zygote has its own copy, and the child takes it over
        self.process, self.launcher = proc, spawner
        s.pid, s.limits, s.sandbox = proc.pid, proc.limits, proc.sandbox
        self.host.index(s, pid=proc.pid)
        # If it is already dead, this runs on the next turn of the loop: nothing is lost in between.
        proc.exited.add_done_callback(functools.partial(self._on_exit, proc))
        if self.kill_reason is not None:  # it abused its connection before we knew its pid
            self.send_signal(signal.SIGKILL)

    async def _agent_connection(self):
        """The new process's end of its hub connection (its output pipe is the relay's); 503 when descriptors run out."""
        conn = None
        try:
            conn = await self.host.hub.connect(self.routing_id)
            descriptors.ensure_headroom(conn.fileno())  # the pair's second: the higher number
        except OSError as exc:
            if conn is not None:
                conn.close()
            raise errors.Unavailable(f"cannot open the agent's descriptors: {exc.strerror or exc}", retry_after=5,
                                     code=RESOURCE_CODES.get(exc.errno, "unavailable")) from None
        return conn

    async def _spawn_failed(self, exc: BaseException) -> None:
        """Make sure a failed spawn leaves no process behind and the session down."""
        s = self.session
        if self.process is not None:
            if s.exit_description is None and isinstance(exc, asyncio.TimeoutError):
                s.exit_description = f"did not start within spawn_timeout ({self.host.config.spawn_timeout:g}s)"
            self.send_signal(signal.SIGKILL)
            await asyncio.shield(self.exited)
        elif s.state == states.STARTING:
            self._release()
            s.exit_description = str(exc) or type(exc).__name__
            if isinstance(exc, errors.Unavailable):
                # The server could not start it (store down, zygote restarting): not the agent's
                # crash, so it must not spend the restart budget and leave the session failed.
                self.host.transition(s, states.STOPPING, reason="unavailable")
                self._went_down(states.ENDED)
            else:
                self._went_down(states.CRASHED)
        log.warning("spawn_failed", session_id=s.id, tenant=s.tenant, error=str(exc) or type(exc).__name__)

    def _on_exit(self, proc, fut: asyncio.Future) -> None:
        """The spawner reports the death of a session's process: classify it and bring the session down."""
        s = self.session
        if self.process is not proc:
            return  # a process the session already let go of (a failed spawn)
        exit = fut.result()
        final = classify_exit(exit.status, stop_reason=self.stop_reason, oom_killed=exit.oom)
        if s.exit_description is None:
            s.exit_description = exit.description
        self._release()
        self._went_down(final, cpu_seconds=exit.cpu_seconds)

    def _release(self) -> None:
        """Free what a dead process held: its routing id, pid and output pipes (the spawner frees its limits)."""
        s = self.session
        self.host.output.detach(s)
        self.process = s.limits = s.sandbox = None
        self.host.unindex(s, routing_id=self.routing_id, pid=s.pid)
        self.host.hub.disconnect(self.routing_id)
        s.pid = None

    def _went_down(self, final: str, *, cpu_seconds: float | None = None) -> None:
        """Fail what was waiting on the process, record the end, tell everyone."""
        s = self.session
        self.cancel_timers("idle", "age", "term", "kill", "interrupt")
        code = DEATH_CODES.get(final, "session_ended")
        why = s.exit_description if self.kill_reason is None else f"{self.kill_reason}: {s.exit_description}"
        err = errors.AgentDied(f"the agent {_verb(final)} ({why})", code=code)
        if self.host.drain.ended:  # stopped by the shutdown: the caller may send it again elsewhere
            err = self.host.drain.error()
        self.turns.fail_all(err)
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(err)
            self.ready.add_done_callback(consume)
        s.end_reason = self.kill_reason or final
        self.host.counters[final] += 1
        self.host.transition(s, final, exit=s.exit_description)
        if self.exited is not None and not self.exited.done():
            self.exited.set_result(final)
        self.host.events.publish("end", s.key, tenant=s.tenant, reason=final, end_reason=s.end_reason,
                                 exit=s.exit_description, cpu_seconds=cpu_seconds)
        self.host.record_end(s, final)
        self.host.forget(s)

    async def stop(self, reason: str, *, force: bool = False) -> str | None:
        """Stop a session's process: shutdown message, SIGTERM, SIGKILL on the stop_timeout ladder."""
        s = self.session
        if s.state == states.STARTING:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.starting)
        if s.state == states.STOPPING:
            if force:
                self.send_signal(signal.SIGKILL)
            return await asyncio.shield(self.exited)
        if s.state not in (states.IDLE, states.BUSY):
            return s.state
        self.stop_reason = reason
        self.host.transition(s, states.STOPPING, reason=reason)
        if force:
            self.send_signal(signal.SIGKILL)
        else:
            self.host.hub.send(self.routing_id, p.pack_shutdown(self.interrupts))
            loop = asyncio.get_running_loop()
            timers, stop_timeout = self.session.timers, self.host.config.stop_timeout
            timers["term"] = loop.call_later(stop_timeout / 2, self.send_signal, signal.SIGTERM)
            timers["kill"] = loop.call_later(stop_timeout, self.send_signal, signal.SIGKILL)
        return await asyncio.shield(self.exited)

    async def kill(self) -> str | None:
        """Kill a session now (admin)."""
        return await self.stop(states.KILLED, force=True)

    def interrupt(self) -> bool:
        """SIGINT the agent's process group; the turn in progress (or about to start) ends as interrupted."""
        s = self.session
        current = self.turns.current()
        if s.pid is None or current is None or s.state not in (states.BUSY, states.STOPPING):
            return False
        self.cancel_timer("interrupt")
        return self._send_interrupt(current, INTERRUPT_RESENDS)

    def _send_interrupt(self, target: int, resends: int) -> bool:
        """Signal the agent, and look again shortly in case the signal was lost.

        CPython loses a SIGINT that lands between its last signal check and a blocking call
        such as time.sleep (the handler then runs only when the call returns), so while the
        interrupted turn is still the one in progress, it is signalled again a few times.
        The agent counts signals against the count on each frame, so a resend that lands
        after the turn ended does not interrupt the next one.
        """
        self.interrupts += 1
        sent = self.send_signal(signal.SIGINT)
        if sent and resends > 0:
            loop = asyncio.get_running_loop()
            self.session.timers["interrupt"] = loop.call_later(INTERRUPT_RESEND_AFTER, self._resend_interrupt,
                                                               target, resends)
        return sent

    def _resend_interrupt(self, target: int, resends: int) -> None:
        """The interrupt timer fired: signal again if the target turn is still the one running."""
        s = self.session
        self.session.timers.pop("interrupt", None)
        if s.pid is not None and self.turns.current() == target:
            self._send_interrupt(target, resends - 1)

    def send_signal(self, sig: int) -> bool:
        """Send a signal to the session's process group (through the spawner that launched it)."""
        if self.process is None or self.launcher is None:
            return False
        return self.launcher.signal(self.process, sig)

    def kill_for(self, reason: str, sig: int = signal.SIGKILL, detail: str | None = None) -> None:
        """End a session's process because of what it did: it ends ``killed`` with ``reason``."""
        s = self.session
        if self.kill_reason is not None:
            return
        self.kill_reason = reason
        self.host.hub.disconnect(self.routing_id)  # nothing more it sends is read
        if detail is not None:
            s.exit_description = detail
        if s.state in (states.STARTING, states.IDLE, states.BUSY):
            self.stop_reason = states.KILLED
            self.host.transition(s, states.STOPPING, reason=reason)
        self.send_signal(sig)  # no pid yet (its first frames came before the zygote's report): _fork sends it

    def dying_now(self) -> None:
        """The agent said it is exiting: take no more messages until its exit report arrives.

        Without this the session would look idle between the FAIL frame and the exit report,
        and the next request would be sent to a process that is about to vanish.
        """
        s = self.session
        if s.state not in (states.IDLE, states.BUSY):
            return
        self.host.transition(s, states.STOPPING, reason="agent_exiting")
        # stop_reason stays None, so the exit is classified as crashed/oom; the timer covers an
        # agent that announces its death and then does not die.
        self.kill_after(self.host.config.stop_timeout)

    def kill_after(self, delay: float) -> None:
        """SIGKILL the process after ``delay`` seconds (the timer goes with the process)."""
        self.session.timers["kill"] = asyncio.get_running_loop().call_later(delay, self.send_signal, signal.SIGKILL)

    def send_request(self, kind: int, req: int, body) -> None:
        """Write one request frame on the current process's connection (refused if the agent is gone)."""
        self.host.hub.send(self.routing_id, p.pack_request(kind, req, body, self.interrupts))

    def on_ready(self, body) -> None:
        """The agent said READY: the spawn waiting on it goes on."""
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(body)


def _verb(final: str) -> str:
    """How a death reads in an error message."""
    return {
        states.OOM: "ran out of memory",
        states.CRASHED: "crashed",
        states.KILLED: "was killed",
        states.REAPED: "was reaped",
        states.EXPIRED: "reached max_age",
        states.ENDED: "was stopped",
    }.get(final, "stopped")
