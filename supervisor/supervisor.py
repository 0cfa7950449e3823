"""The Supervisor: the session registry and everything that happens to a session's process.

One asyncio loop, no threads of its own, no per-session polling: agent frames arrive through
the hub's reader, deaths through the zygote's reports, idle and age through timers. Each
session's turns form its own mailbox; nothing takes a global lock.
"""

import asyncio
import contextlib
import functools
import itertools
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections import Counter

from corral.agent_proc import protocol as p
from corral.supervisor import errors, states
from corral.supervisor.cluster.activation import Activation
from corral.supervisor.agent_output import AgentOutput
from corral.supervisor.config import Config
from corral.supervisor.deadlines import Deadlines
from corral.supervisor.events import EventBus
from corral.supervisor.hub import Hub
from corral.supervisor.limits import choose_limiter
from corral.supervisor.logs import debug_enabled, get_logger
from corral.supervisor.node import claim_node, node_name
from corral.supervisor.reaper import Reaper, classify_exit, describe_status
from corral.supervisor.restarts import RestartPolicy
from corral.supervisor.sandbox import SandboxRefused, choose_sandbox
from corral.supervisor.session import Session, TokenBucket, Turn, bad_session_id, new_session_id, valid_session_id
from corral.supervisor.spawner import SpawnError, ZygoteSpawner
from corral.supervisor.store import SessionNotFound as StoredSessionMissing
from corral.supervisor.store import StaleEpoch, StoreError, create_store

log = get_logger(component="supervisor")

_FAIL_ERRORS = {
    p.UNKNOWN_COMMAND: errors.UnknownCommand,
    p.BAD_REQUEST: errors.BadRequest,
    p.UPSTREAM_ERROR: errors.UpstreamError,
    p.AGENT_CRASHED: errors.AgentDied,
    p.AGENT_OOM: errors.AgentDied,
    p.AGENT_BAD_REPLY: errors.AgentBadReply,
}
# An interrupt is signalled again this often while its turn is still running (a lost SIGINT).
INTERRUPT_RESEND_AFTER = 0.5
INTERRUPT_RESENDS = 4
_DEATH_CODES = {states.OOM: p.AGENT_OOM, states.CRASHED: p.AGENT_CRASHED}
_TURN_STATES = (states.IDLE, states.BUSY)
# Store status of a session whose server died while it was live (not a state of a live server).
LOST, LOST_REASON = "lost", "server_died"
# Frames an agent may send for turns it was never given before it is killed as hostile.
# A well-behaved agent sends none.
STRAY_FRAME_LIMIT = 10_000
# Why an agent was killed for what it did (a session's end_reason; docs/limits.md).
UNRESPONSIVE, STRAY_FRAMES, TURN_TOO_LARGE = "unresponsive", "stray_frames", "turn_too_large"


class Supervisor(Activation):
    """Owns every session of one corral server."""

    def __init__(self, config: Config, *, store=None, claim=None, events: EventBus | None = None,
                 tenant_limits=None):
        """``claim``: this node's identity, already claimed in ``store`` (supervisor/node.py); else claimed at start."""
        self.config = config
        self.store = store
        self.events = events or EventBus()
        self.tenant_limits: dict[str, int] = dict(tenant_limits or {})
        self.sessions: dict[str, Session] = {}
        self.by_pid: dict[int, Session] = {}
        self.by_rid: dict[bytes, Session] = {}
        self.live_count = 0
        self.live_by_tenant: Counter = Counter()
        self.counters: Counter = Counter()  # spawns, restarts, crashes, ooms, reaps ... since start
        self.policy = RestartPolicy(config.max_restarts, config.restart_window)
        self.reaper = Reaper(idle_timeout=config.idle_timeout, max_age=config.max_age, on_due=self._on_due)
        self.turn_deadlines = Deadlines(on_due=self._time_out)  # turn -> its session, until request_timeout
        # A timed-out turn -> its session, for stop_timeout/2 more: then the agent is unresponsive.
        self.hung_turns = Deadlines(on_due=self._turn_hung)
        self.run_dir: str | None = None
        self.limiter = None
        self.sandbox = None
        self.hub: Hub | None = None
        self.spawner: ZygoteSpawner | None = None
        self.output = AgentOutput(config.agent_log_lines, self.events)  # every agent's stdout/stderr, and each session's tail
        self.started_at = time.time()
        # Names this server in the store's sessions.node (supervisor/node.py says what it means)
        self.node = node_name(config.port)
        self.claim = claim  # this server's hold on its identity, from before the store opens; released at close
        self._req_ids = itertools.count(1)
        self._background: set[asyncio.Task] = set()
        # session id -> the store write recording its last death, awaited before it respawns
        self._status_writes: dict[str, asyncio.Task] = {}
        self._retention_timer = None
        self._zygote_restart: asyncio.Task | None = None
        self._closing = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Open the store, bind the hub, start the zygote."""
        self.run_dir = tempfile.mkdtemp(prefix="corral-", dir=self._run_parent())
        os.chmod(self.run_dir, 0o700)
        try:
            await self._start_parts()
        except (SpawnError, StoreError, OSError, ValueError, SandboxRefused) as exc:
            await self.close()
            raise errors.StartupError(str(exc)) from exc
        except BaseException:
            await self.close()
            raise
        self._schedule_retention()
        log.info("supervisor_started", run_dir=self.run_dir, limit=self.limiter.describe(), agent=self.config.agent)

    def _run_parent(self) -> str | None:
        """Parent of the run directory."""
        if self.config.run_dir:
            os.makedirs(self.config.run_dir, mode=0o700, exist_ok=True)
            return str(self.config.run_dir)
        return os.environ.get("XDG_RUNTIME_DIR") or None

    async def _start_parts(self) -> None:
        """Start each part in dependency order."""
        limit = self.config.memory_limit or None
        # probing may sweep a dead server's cgroups, which waits for the kernel: off the loop
        self.limiter = await asyncio.to_thread(
            choose_limiter, limit, run_id=os.path.basename(self.run_dir).removeprefix("corral-"),
            prefer=self.config.limit_mechanism)
        for reason in getattr(self.limiter, "fallback_reasons", ()):
            log.info("limit_mechanism_skipped", reason=reason)
        for path in getattr(self.limiter, "swept", ()):
            log.info("stale_cgroup_removed", path=path)
        log.info("limit_mechanism", **self.limiter.describe())
        self._choose_sandbox()
        if self.store is None:
            self.store = create_store(self.config.database_url, self.config.data_dir)
        # the identity first: a server whose identity is held by a live one must not touch the store
        if self.claim is None:
            self.claim = await claim_node(self.store, self.node)
        await self.store.open()
        await self._join_cluster()
        await self._end_orphans()
        self.hub = Hub(on_frame=self._on_frame, on_drop=self._on_drop, on_abuse=self._on_abuse,
                       on_pause=self._on_pause, frame_rate=self.config.agent_frame_rate)
        await self._start_spawner()

    def _choose_sandbox(self) -> None:
        """Probe the sandbox layers; log each, in force or missing and why (strict refuses here)."""
        c = self.config
        protected = [str(c.data_dir), self.run_dir, str(c.tenants) if c.tenants else None]
        self.sandbox = choose_sandbox(
            c.sandbox, protected=protected, network=c.agent_network == "on", uid_range=c.uid_range,
            max_pids=c.max_pids, max_open_files=c.max_open_files,
            run_id=os.path.basename(self.run_dir).removeprefix("corral-"))
        for name, layer in self.sandbox.layers.items():
            if layer["in_force"]:
                log.info("sandbox_layer", layer=name, detail=layer["detail"])
            else:
                log.warning("sandbox_layer_missing", layer=name, reason=layer["reason"])
        for note in self.sandbox.notes:
            log.warning("sandbox_note", note=note)
        log.info("sandbox", mode=self.sandbox.mode, network=self.sandbox.network)

    async def _end_orphans(self) -> None:
        """End the sessions this server's previous run left live in the store (it died with them)."""
        lost = await self.store.end_orphans(self.claim.orphans_of, status=LOST, end_reason=LOST_REASON)
        if lost:
            log.warning("orphans_ended", node=self.node, sessions=lost, reason=LOST_REASON)

    async def _start_spawner(self) -> None:
        """Start a zygote."""
        spawner = ZygoteSpawner(self.config.agent, limiter=self.limiter, sandbox=self.sandbox,
                                on_lost=self._on_zygote_lost)
        await spawner.start()
        self.spawner = spawner

    async def close(self) -> None:
        """Stop every session, the zygote and the hub; remove the run directory."""
        if self._closing:
            return
        self._closing = True
        if self._retention_timer is not None:
            self._retention_timer.cancel()
        live = [s for s in self.sessions.values() if s.live]
        if live:
            stops = [self.stop(s, states.ENDED) for s in live]
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*stops, return_exceptions=True), self.config.stop_timeout + 2)
        if self.spawner is not None:
            await self.spawner.close()
        with contextlib.suppress(Exception):
            await self._leave_cluster()
        self.output.close()
        if self._background:
            await asyncio.wait(list(self._background), timeout=5)
        self.turn_deadlines.close()
        self.hung_turns.close()
        if self.hub is not None:
            self.hub.close()
        if self.limiter is not None:
            await asyncio.to_thread(self.limiter.close)  # emptying cgroups waits for the kernel: off the loop
        if self.sandbox is not None:
            self.sandbox.close()
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.close()
        if self.claim is not None:
            await self.claim.release()
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        log.info("supervisor_stopped")

    # ---------------------------------------------------------------- registry

    async def get_or_create(self, session_id: str | None, tenant: str, metadata: dict | None = None) -> Session:
        """The session with this id (from memory or the store), or a new one; 404 if another tenant's.

        The tenant is checked before a stored session is registered: a refused request loads nothing.
        """
        if session_id is None:
            session_id = new_session_id()
        elif not valid_session_id(session_id):
            raise bad_session_id()
        s = self.sessions.get(session_id)
        if s is None or (not s.live and self.directory.fenced):
            record = await self._placed(session_id)
            if record is not None and record.tenant != tenant:
                raise errors.SessionNotFound(f"no session {session_id}")
            s = self.sessions.get(session_id)  # another request may have registered it meanwhile
            if s is None:
                s = self._register(session_id, tenant, metadata, record)
        if s.tenant != tenant:
            raise errors.SessionNotFound(f"no session {session_id}")
        return s

    async def find(self, session_id: str, tenant: str | None = None):
        """The live Session, else the stored record, else None; never spawns or registers."""
        if not valid_session_id(session_id):
            return None
        found = self.sessions.get(session_id)
        if found is None or (not found.live and self.directory.fenced):
            record = await self._placed(session_id)
            found = found or record
        if found is None or (tenant is not None and found.tenant != tenant):
            return None
        return found

    def _register(self, session_id: str, tenant: str, metadata, record) -> Session:
        """Put a session object in the registry."""
        if record is not None:
            tenant, metadata = record.tenant, record.metadata
        s = Session(id=session_id, tenant=tenant, metadata=dict(metadata or {}))
        if record is not None:
            s.created_at, s.message_count = record.created_at, record.message_count
        if self.config.rate_limit > 0:
            s.bucket = TokenBucket(self.config.rate_limit, self.config.rate_burst)
        self.sessions[session_id] = s
        return s

    def agent_output(self, session_id: str) -> list[dict]:
        """The kept lines of a session's agent output, oldest first (empty if none are kept)."""
        return self.output.lines_of(session_id, self.sessions.get(session_id)) or []

    def list_sessions(self) -> list[Session]:
        """Every session the supervisor holds in memory (live, and recently crashed or failed)."""
        return list(self.sessions.values())

    def count(self) -> int:
        """Number of live sessions."""
        return self.live_count

    def _forget(self, s: Session) -> None:
        """Drop a down session from memory once nobody waits on it (the store keeps its data)."""
        if s.live or s.inflight:
            return
        if s.state in states.STOP_REASONS or s.state is None:
            self._unregister(s)
            s.cancel_timers()
        elif "forget" not in s.timers:
            # Keep crash history for the restart window, then let it go.
            loop = asyncio.get_running_loop()
            s.timers["forget"] = loop.call_later(self.config.restart_window, self._forget_after_window, s)

    def _forget_after_window(self, s: Session) -> None:
        """The restart window of a crashed session has passed."""
        s.timers.pop("forget", None)
        if not s.live and not s.inflight:
            self._unregister(s)

    def _unregister(self, s: Session) -> None:
        """Take a session out of memory; its output's tail stays readable a while (AgentOutput.retire)."""
        if self.sessions.get(s.id) is s:
            del self.sessions[s.id]
            self.output.retire(s)

    # ---------------------------------------------------------------- turns

    async def chat(self, s: Session, text: str, *, on_chunk=None) -> dict:
        """Send a user message and wait for the reply."""
        turn = await self.submit_chat(s, text, on_chunk=on_chunk)
        return await self.complete(s, turn)

    async def submit_chat(self, s: Session, text: str, *, on_chunk=None) -> Turn:
        """Commit a user message and put it in the agent's mailbox; ``complete`` waits for the reply."""
        return await self.submit(s, p.MESSAGE, text, on_chunk=on_chunk, record_as="user")

    async def system(self, s: Session, text: str) -> dict:
        """Send a system message and wait for the agent's answer."""
        turn = await self.submit(s, p.SYSTEM, text, record_as="system")
        return await self.complete(s, turn)

    async def command(self, s: Session, command: str, args) -> dict:
        """Run an agent command and wait for its result."""
        turn = await self.submit(s, p.COMMAND, {"command": command, "args": args})
        return await self.complete(s, turn)

    async def submit(self, s: Session, kind: int, body, *, on_chunk=None, record_as: str | None = None) -> Turn:
        """Admit, persist and send one message; return the turn to wait on.

        When this returns, the message is committed to the store and in the agent's mailbox.
        """
        try:
            self._admit(s, body)
        except errors.CorralError:
            if not s.inflight:
                self._drop_if_new(s)  # a refused first message must not leave an unstarted session behind
            raise
        s.inflight += 1
        s.last_activity = time.monotonic()
        try:
            await self.ensure_live(s)
            if record_as is not None:
                try:
                    await self._record(s, record_as, body)
                except errors.SessionMoved:
                    raise await self._moved(s.id) from None  # not committed: the new owner may take it
                # The process may have died (and a respawn begun) while the message was committed:
                # sending now would put the turn in a mailbox nobody reads.
                await self.ensure_live(s)
            return self._send(s, kind, body, on_chunk)
        except BaseException:
            self._turn_over(s)
            raise

    async def complete(self, s: Session, turn: Turn) -> dict:
        """Wait for a submitted turn's answer (within request_timeout); persist and return it."""
        # A deadline that fails the turn's future, rather than asyncio.timeout/wait_for around a
        # shield or a timer per turn: those cost a task, futures, callbacks or a timer per turn,
        # a measurable share of a warm turn (docs/benchmarks.md).
        self.turn_deadlines.add(turn, self.config.request_timeout, s)
        try:
            done = await turn.future
            if done.get("status") == "done":
                s.agent_state = done.get("state") or s.agent_state
                if turn.kind == p.MESSAGE:
                    done["message"] = await self._record(s, "assistant", done.get("reply") or "")
            return done
        except errors.CorralError as exc:
            # The session's listeners learn why no reply is coming (a wait=false caller has no other way).
            self.events.publish("error", s.id, to_all=False, code=exc.code, message=exc.message)
            raise
        finally:
            self.turn_deadlines.discard(turn)
            self._turn_over(s)

    def _time_out(self, turn: Turn, s: Session) -> None:
        """request_timeout passed without an answer: interrupt the turn and fail its waiter (504)."""
        if turn.future.done():
            return
        turn.abandoned = True
        self.interrupt(s)
        # If the interrupt is ignored, the agent is unresponsive (_turn_hung): one timer for all.
        self.hung_turns.add(turn, self.config.stop_timeout / 2, s)
        turn.future.set_exception(errors.TurnTimeout(
            f"no reply within request_timeout ({self.config.request_timeout:g}s); the turn was interrupted"
        ))

    def _turn_hung(self, turn: Turn, s: Session) -> None:
        """A timed-out turn is still running stop_timeout/2 after its interrupt: SIGTERM, then SIGKILL.

        The session ends ``killed`` with end_reason ``unresponsive`` and comes back, history
        restored, on its next message.
        """
        if s.state != states.BUSY or turn not in s.turns.values():
            return  # answered (or the process is already gone)
        self.counters["agents_unresponsive"] += 1
        log.warning("agent_unresponsive", session_id=s.id, tenant=s.tenant, pid=s.pid)
        self._kill_for(s, UNRESPONSIVE, signal.SIGTERM)
        s.timers["kill"] = asyncio.get_running_loop().call_later(
            self.config.stop_timeout / 2, self._signal, s, signal.SIGKILL
        )

    def _kill_for(self, s: Session, reason: str, sig: int = signal.SIGKILL, detail: str | None = None) -> None:
        """End a session's process because of what it did: it ends ``killed`` with ``reason``."""
        if s.kill_reason is not None:
            return
        s.kill_reason = reason
        self.hub.disconnect(s.routing_id)  # nothing more it sends is read
        if detail is not None:
            s.exit_description = detail
        if s.state in (states.STARTING, states.IDLE, states.BUSY):
            s.stop_reason = states.KILLED
            self._transition(s, states.STOPPING, reason=reason)
        self._signal(s, sig)  # no pid yet (its first frames came before the zygote's report): _fork sends it

    def _admit(self, s: Session, body) -> None:
        """Refuse a message that cannot be sent or is over the size, mailbox or rate bounds (before any work)."""
        # JSON admits what msgpack refuses: lone surrogates ("\ud800"), ints over 64 bits.
        try:
            if isinstance(body, str):  # the common case: the size check's encode catches surrogates
                if len(body.encode()) > self.config.max_message_bytes:
                    raise errors.TooLarge(f"message is over max_message_bytes ({self.config.max_message_bytes})")
            else:
                p.pack(body)
        except (TypeError, ValueError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
            raise errors.BadRequest(f"the message cannot be encoded for the agent: {exc}") from None
        if s.inflight >= self.config.mailbox_size:
            raise errors.MailboxFull(f"session {s.id} has {s.inflight} messages in flight", retry_after=1)
        if s.bucket is not None:
            wait = s.bucket.take()
            if wait:
                raise errors.RateLimited(f"session {s.id} is over its rate limit", retry_after=wait)

    def _send(self, s: Session, kind: int, body, on_chunk) -> Turn:
        """Put one frame in the agent's mailbox."""
        req = next(self._req_ids)
        turn = Turn(kind, asyncio.get_running_loop().create_future(), on_chunk)
        s.turns[req] = turn
        # If the agent is already gone, the frame is refused; its exit report fails the turn.
        self.hub.send(s.routing_id, p.pack([kind, req, body, s.interrupts]))
        if s.state == states.IDLE:
            self._transition(s, states.BUSY)
        return turn

    def _turn_over(self, s: Session) -> None:
        """A request has been answered (or refused): settle busy/idle and bookkeeping."""
        s.inflight -= 1
        s.last_activity = time.monotonic()
        if s.state == states.BUSY and not s.turns:
            self._transition(s, states.IDLE)
        elif s.state == states.IDLE:
            self.reaper.arm_idle(s)  # a request refused before its frame left skips the idle timer's re-arm
        elif not s.live:
            self._forget(s)

    async def _record(self, s: Session, role: str, content) -> dict:
        """Commit one message to the store and tell listeners."""
        text = content if isinstance(content, str) else str(content)
        try:
            msg = await self._store_call(self.store.append_message(s.id, role, text, epoch=s.epoch))
        except errors.SessionMoved:
            self._fence_out(s, f"its {role} message was refused for a stale epoch")
            raise
        s.message_count = msg.seq
        data = msg.to_dict()
        self.events.publish("message", s.id, to_all=False, message=data)
        return data

    def interrupt(self, s: Session) -> bool:
        """SIGINT the agent's process group; the turn in progress (or about to start) ends as interrupted."""
        if s.pid is None or not s.turns or s.state not in (states.BUSY, states.STOPPING):
            return False
        s.cancel_timer("interrupt")
        return self._send_interrupt(s, next(iter(s.turns)), INTERRUPT_RESENDS)

    def _send_interrupt(self, s: Session, target: int, resends: int) -> bool:
        """Signal the agent, and look again shortly in case the signal was lost.

        CPython loses a SIGINT that lands between its last signal check and a blocking call
        such as time.sleep (the handler then runs only when the call returns), so while the
        interrupted turn is still the one in progress, it is signalled again a few times.
        The agent counts signals against the count on each frame, so a resend that lands
        after the turn ended does not interrupt the next one.
        """
        s.interrupts += 1
        sent = self._signal(s, signal.SIGINT)
        if sent and resends > 0:
            loop = asyncio.get_running_loop()
            s.timers["interrupt"] = loop.call_later(INTERRUPT_RESEND_AFTER, self._resend_interrupt, s, target, resends)
        return sent

    def _resend_interrupt(self, s: Session, target: int, resends: int) -> None:
        """The interrupt timer fired: signal again if the target turn is still the one running."""
        s.timers.pop("interrupt", None)
        if s.pid is not None and s.turns and next(iter(s.turns)) == target:
            self._send_interrupt(s, target, resends - 1)

    def _signal(self, s: Session, sig: int) -> bool:
        """Send a signal to the session's process group (through the spawner that launched it)."""
        if s.process is None or s.spawner is None:
            return False
        return s.spawner.signal(s.process, sig)

    # ---------------------------------------------------------------- spawning

    async def ensure_live(self, s: Session) -> None:
        """Make sure the session has a ready process, spawning (or respawning) it if needed."""
        while True:
            if s.state in (states.IDLE, states.BUSY) and s.dying:
                await asyncio.shield(s.exited)  # its exit report brings it down; then respawn
                continue
            if s.state in (states.IDLE, states.BUSY):
                return
            if s.state == states.STARTING:
                await asyncio.shield(s.starting)
                if s.state not in (states.IDLE, states.BUSY):
                    raise errors.AgentDied(f"session {s.id} failed to start ({s.exit_description})")
                return
            if s.state == states.STOPPING:
                await asyncio.shield(s.exited)
                continue
            self._begin_spawn(s)

    def _begin_spawn(self, s: Session) -> None:
        """Check policy and capacity, then start a spawn task (synchronously, so checks hold)."""
        if self._closing:
            raise errors.Unavailable("the server is shutting down", retry_after=5)
        restart = s.state in states.UNPLANNED or s.state == states.FAILED
        if restart:
            wait = self.policy.retry_after(s)
            if wait:
                if s.state != states.FAILED:
                    self._transition(s, states.FAILED, reason="restart budget spent")
                raise errors.SessionFailed(
                    f"session {s.id} crashed {len(s.restarts)} times in {self.config.restart_window:g}s; "
                    f"it can restart in {wait:.0f}s or be removed by an admin",
                    retry_after=wait,
                )
        self._check_capacity(s)
        s.cancel_timer("forget")
        if restart:
            self.policy.record(s)
            self.counters["restarts"] += 1
        self._transition(s, states.STARTING)
        s.starting = asyncio.ensure_future(self._spawn(s))
        s.starting.add_done_callback(_consume)

    def _check_capacity(self, s: Session) -> None:
        """Refuse a spawn past max_sessions (503) or the tenant's quota (429)."""
        cap = self.tenant_limits.get(s.tenant) or self.config.max_sessions_per_tenant
        if self.live_count >= self.config.max_sessions:
            self._drop_if_new(s)
            self.counters["refused_capacity"] += 1
            raise errors.AtCapacity(f"the server is at max_sessions ({self.config.max_sessions})", retry_after=5)
        if cap and self.live_by_tenant[s.tenant] >= cap:
            self._drop_if_new(s)
            self.counters["refused_quota"] += 1
            raise errors.QuotaExceeded(f"tenant {s.tenant} is at its session quota ({cap})", retry_after=5)

    def _drop_if_new(self, s: Session) -> None:
        """Forget a session that was never started."""
        if s.state is None and self.sessions.get(s.id) is s:
            del self.sessions[s.id]

    async def _spawn(self, s: Session) -> None:
        """Fork the agent, wait for READY, hand it its history; the session ends up idle."""
        loop = asyncio.get_running_loop()
        s.generation += 1
        # Unique per spawn, so a frame still in flight from a previous process of the session
        # (on its own, older connection) is never taken for the new one's.
        s.routing_id = f"{s.id}/{s.generation}/{secrets.token_hex(4)}".encode()
        s.stop_reason = s.end_reason = s.exit_description = s.kill_reason = None
        s.dying = False
        s.stray_frames = 0
        s.interrupts = 0
        s.ready, s.exited = loop.create_future(), loop.create_future()
        s.exited.add_done_callback(_consume)
        self.by_rid[s.routing_id] = s
        started = time.monotonic()
        try:
            history = await self._prepare_spawn(s)
            await self._fork(s)
            await asyncio.wait_for(asyncio.shield(s.ready), self.config.spawn_timeout)
            self._still_starting(s)  # it may have died between READY and now
            start = self._send(s, p.START, {"history": history, "metadata": s.metadata}, None)
            await asyncio.wait_for(asyncio.shield(start.future), self.config.spawn_timeout)
        except asyncio.TimeoutError as exc:
            await self._spawn_failed(s, exc)
            raise errors.AgentDied(f"session {s.id} failed to start ({s.exit_description})") from None
        except BaseException as exc:
            await self._spawn_failed(s, exc)
            raise
        s.spawned_at = time.monotonic()
        self.counters["spawns"] += 1
        self.events.publish("spawned", s.id, tenant=s.tenant, pid=s.pid, seconds=s.spawned_at - started)
        self._transition(s, states.BUSY if s.turns else states.IDLE)
        self.reaper.arm_age(s)

    def _still_starting(self, s: Session) -> None:
        """Raise if the process being started has already died."""
        if s.state != states.STARTING:
            raise errors.AgentDied(f"session {s.id} died while starting ({s.exit_description})")

    async def _prepare_spawn(self, s: Session) -> list[dict]:
        """Record the session in the store and fetch its history."""
        ended = self._status_writes.get(s.id)
        if ended is not None:
            # Otherwise, with a pool of connections, the old end could land after the new start
            # and leave a live session marked ended (and purgeable by retention).
            await asyncio.wait([ended])
        record = await self._claim(s)
        s.created_at, s.message_count = record.created_at, record.message_count
        history = await self._store_call(self.store.history(s.id, limit=self.config.history_limit))
        return recent_history(history, self.config.history_limit_bytes)

    async def _fork(self, s: Session) -> None:
        """Ask the spawner for a process inside the session's memory limit."""
        if self.spawner is None and self._zygote_restart is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._zygote_restart), self.config.spawn_timeout)
        if self.spawner is None:
            raise errors.Unavailable("the zygote is restarting", retry_after=1)
        conn = await self.hub.connect(s.routing_id)
        read_fds, write_fds = self.output.pipes()
        spawner = self.spawner
        try:
            proc = await spawner.launch(f"s{s.generation}-{s.id}",
                                        {"session_id": s.id, "routing_id": s.routing_id, "tenant": s.tenant},
                                        conn, stdio=write_fds)
        except SpawnError as exc:
            _close_all(read_fds)
            raise errors.Unavailable(str(exc), retry_after=exc.retry_after) from None
        except BaseException:
            _close_all(read_fds)
            raise
        finally:
            conn.close()  # the zygote has its own copy, and the child takes it over
            _close_all(write_fds)  # the agent holds them now; EOF comes when it (and its children) are gone
        s.process, s.spawner = proc, spawner
        s.pid, s.limits, s.sandbox = proc.pid, proc.limits, proc.sandbox
        self.by_pid[proc.pid] = s
        self.output.attach(s, proc.pid, read_fds)
        # If it is already dead, this runs on the next turn of the loop: nothing is lost in between.
        proc.exited.add_done_callback(functools.partial(self._on_exit, s, proc))
        if s.kill_reason is not None:  # it abused its connection before we knew its pid
            self._signal(s, signal.SIGKILL)

    async def _spawn_failed(self, s: Session, exc: BaseException) -> None:
        """Make sure a failed spawn leaves no process behind and the session down."""
        if s.process is not None:
            if s.exit_description is None and isinstance(exc, asyncio.TimeoutError):
                s.exit_description = f"did not start within spawn_timeout ({self.config.spawn_timeout:g}s)"
            self._signal(s, signal.SIGKILL)
            await asyncio.shield(s.exited)
        elif s.state == states.STARTING:
            self._release(s)
            s.exit_description = str(exc) or type(exc).__name__
            if isinstance(exc, errors.Unavailable):
                # The server could not start it (store down, zygote restarting): not the agent's
                # crash, so it must not spend the restart budget and leave the session failed.
                self._transition(s, states.STOPPING, reason="unavailable")
                self._went_down(s, states.ENDED)
            else:
                self._went_down(s, states.CRASHED)
        log.warning("spawn_failed", session_id=s.id, tenant=s.tenant, error=str(exc) or type(exc).__name__)

    # ---------------------------------------------------------------- agent frames

    def _on_frame(self, rid: bytes, kind: int, req: int, body, size: int) -> None:
        """Handle one frame from an agent (its connection says which: rid is bound at spawn)."""
        s = self.by_rid.get(rid)
        if s is None:
            return  # the last words of a process that is already gone
        if kind in (p.CHUNK, p.DONE, p.FAIL):
            turn = s.turns.get(req)
            if turn is None:
                self._stray(s)
                return
            turn.bytes += size
            if turn.bytes > self.config.max_turn_bytes:
                self._kill_for(s, TURN_TOO_LARGE, detail=f"sent over {self.config.max_turn_bytes} bytes for one turn")
                return
        if kind == p.CHUNK:
            if not turn.abandoned:
                turn.chunks += 1
                if turn.on_chunk is not None:
                    turn.on_chunk(body)
                if self.events.watched(s.id):
                    self.events.publish("delta", s.id, to_all=False, req=req, seq=turn.chunks, text=body)
        elif kind == p.DONE:
            problem = p.reply_problem(body)  # any ZeroMQ peer may be an agent: it is checked, not trusted
            if problem is not None:
                self._fail_turn(s, req, {"code": p.AGENT_BAD_REPLY, "message": problem})
                return
            turn = s.turns.get(req)
            if turn is not None and turn.kind == p.MESSAGE and not turn.chunks and body.get("reply"):
                # A reply the agent returned whole comes without a CHUNK frame (one frame less per
                # turn); listeners still see it as the turn's one chunk, as if it had been streamed.
                self._on_frame(rid, p.CHUNK, req, body["reply"], 0)  # its bytes are counted with the DONE
            self._finish_turn(s, req, {"status": "done", **(body or {})})
        elif kind == p.FAIL:
            self._fail_turn(s, req, body or {})
        elif kind == p.READY:
            if s.ready is not None and not s.ready.done():
                s.ready.set_result(body)

    def _on_abuse(self, rid: bytes, reason: str, detail: str) -> None:
        """The hub cut an agent's connection (flood, protocol error): kill that agent, and only it."""
        s = self.by_rid.get(rid)
        if s is not None:
            self.counters["agents_killed_for_abuse"] += 1
            self._kill_for(s, reason, detail=f"{reason}: {detail}")

    def _on_pause(self, rid: bytes) -> None:
        """Count a connection the hub stopped reading: its agent sends PINGs and reads no PONGs."""
        self.counters["agent_reads_paused"] += 1

    def _on_drop(self, rid: bytes, why: str) -> None:
        """Count a frame the hub refused and tell global listeners (metrics, tests)."""
        self.counters["frames_dropped"] += 1
        self.events.publish_global("frame_dropped", routing_id=rid[:128].decode("utf-8", "replace"), reason=why)
        s = self.by_rid.get(rid)
        if s is not None:
            # The hub routes by connection, so a live session's own process sent it.
            self._stray(s)

    def _stray(self, s: Session) -> None:
        """Count a frame an agent had no business sending; kill the agent past STRAY_FRAME_LIMIT."""
        s.stray_frames += 1
        if s.stray_frames == STRAY_FRAME_LIMIT:
            self.counters["agents_killed_for_abuse"] += 1
            log.warning("agent_flooding_killed", session_id=s.id, tenant=s.tenant, pid=s.pid, frames=s.stray_frames)
            self._kill_for(s, STRAY_FRAMES, detail=f"killed after {STRAY_FRAME_LIMIT} frames for turns it was not given")

    def _finish_turn(self, s: Session, req: int, result: dict) -> None:
        """Resolve a turn."""
        turn = s.turns.pop(req, None)
        if turn is not None and turn.abandoned:
            self.hung_turns.discard(turn)
        if turn is not None and not turn.future.done():
            turn.future.set_result(result)
        if s.state == states.BUSY and not s.turns and not s.inflight:
            self._transition(s, states.IDLE)

    def _fail_turn(self, s: Session, req: int, body: dict) -> None:
        """Resolve a turn the agent reported as failed."""
        code = str(body.get("code", p.AGENT_CRASHED))
        message = str(body.get("message", "the agent failed"))
        if code == p.INTERRUPTED:
            self._finish_turn(s, req, {"status": "interrupted", "reply": None, "message_text": message})
            return
        if code in (p.AGENT_CRASHED, p.AGENT_OOM):
            s.dying = True  # it exits right after this frame: new turns must wait for the respawn
        turn = s.turns.pop(req, None)
        if turn is not None and turn.abandoned:
            self.hung_turns.discard(turn)
        if turn is not None and not turn.future.done():
            err_cls = _FAIL_ERRORS.get(code, errors.AgentDied)
            turn.future.set_exception(err_cls(message, code=code if err_cls is errors.AgentDied else None))
            turn.future.add_done_callback(_consume)
        if code in _DEATH_CODES.values():
            self._dying(s)

    def _dying(self, s: Session) -> None:
        """The agent said it is exiting: take no more messages until its exit report arrives.

        Without this the session would look idle between the FAIL frame and the exit report,
        and the next request would be sent to a process that is about to vanish.
        """
        if s.state not in (states.IDLE, states.BUSY):
            return
        self._transition(s, states.STOPPING, reason="agent_exiting")
        # stop_reason stays None, so the exit is classified as crashed/oom; the timer covers an
        # agent that announces its death and then does not die.
        s.timers["kill"] = asyncio.get_running_loop().call_later(
            self.config.stop_timeout, self._signal, s, signal.SIGKILL
        )

    # ---------------------------------------------------------------- deaths

    def _on_exit(self, s: Session, proc, fut: asyncio.Future) -> None:
        """The spawner reports the death of a session's process: classify it and bring the session down."""
        if s.process is not proc:
            return  # a process the session already let go of (a failed spawn)
        exit = fut.result()
        final = classify_exit(exit.status, stop_reason=s.stop_reason, oom_killed=exit.oom)
        if s.exit_description is None:
            s.exit_description = exit.description
        self._release(s)
        self._went_down(s, final)

    def _release(self, s: Session) -> None:
        """Free what a dead process held: its routing id, pid and output pipes (the spawner frees its limits)."""
        self.output.detach(s)
        s.process = s.limits = s.sandbox = None
        if self.by_rid.get(s.routing_id) is s:
            del self.by_rid[s.routing_id]
        self.hub.disconnect(s.routing_id)
        if s.pid is not None and self.by_pid.get(s.pid) is s:
            del self.by_pid[s.pid]
        s.pid = None

    def _went_down(self, s: Session, final: str) -> None:
        """Fail what was waiting on the process, record the end, tell everyone."""
        s.cancel_timers("idle", "age", "term", "kill", "interrupt")
        code = _DEATH_CODES.get(final, "session_ended")
        why = s.exit_description if s.kill_reason is None else f"{s.kill_reason}: {s.exit_description}"
        err = errors.AgentDied(f"the agent {_verb(final)} ({why})", code=code)
        for turn in s.turns.values():
            if not turn.future.done():
                turn.future.set_exception(err)
                turn.future.add_done_callback(_consume)
        s.turns.clear()
        if s.ready is not None and not s.ready.done():
            s.ready.set_exception(err)
            s.ready.add_done_callback(_consume)
        s.end_reason = s.kill_reason or final
        self.counters[final] += 1
        self._transition(s, final, exit=s.exit_description)
        if s.exited is not None and not s.exited.done():
            s.exited.set_result(final)
        self.events.publish("end", s.id, tenant=s.tenant, reason=final, end_reason=s.end_reason, exit=s.exit_description)
        self._record_end(s, final)
        self._forget(s)

    def _record_end(self, s: Session, final: str) -> None:
        """Write the end to the store in the background; a respawn waits for it (see _prepare_spawn)."""
        if self._unclaimed(s):
            return  # fenced out, or its claim was refused: the session's row is another node's
        write = self._background_task(self._store_call(
            self.store.set_status(s.id, final, end_reason=s.end_reason or final, ended=True, epoch=s.epoch)))
        self._status_writes[s.id] = write
        write.add_done_callback(functools.partial(self._end_recorded, s.id))

    def _end_recorded(self, session_id: str, write: asyncio.Task) -> None:
        """Forget a finished end write (unless a newer one for the session replaced it)."""
        if self._status_writes.get(session_id) is write:
            del self._status_writes[session_id]

    async def settle_store(self) -> None:
        """Wait for the background store writes in flight (ends of sessions that went down)."""
        if self._status_writes:
            await asyncio.wait(list(self._status_writes.values()))

    def _on_zygote_lost(self) -> None:
        """The zygote died and took every agent with it: mark them crashed and start another."""
        self.spawner = None  # its processes' exits come on their futures, "the zygote died"
        if not self._closing:
            self._zygote_restart = self._background_task(self._restart_zygote())

    async def _restart_zygote(self) -> None:
        """Start a new zygote after the old one died."""
        try:
            await self._start_spawner()
        except Exception as exc:
            log.error("zygote_restart_failed", error=str(exc))

    # ---------------------------------------------------------------- stopping

    def _on_due(self, s: Session, reason: str) -> None:
        """A reaper timer fired: stop the session in the background."""
        self._background_task(self.stop(s, reason))

    async def stop(self, s: Session, reason: str, *, force: bool = False) -> str | None:
        """Stop a session's process: shutdown message, SIGTERM, SIGKILL on the stop_timeout ladder."""
        if s.state == states.STARTING:
            with contextlib.suppress(Exception):
                await asyncio.shield(s.starting)
        if s.state == states.STOPPING:
            if force:
                self._signal(s, signal.SIGKILL)
            return await asyncio.shield(s.exited)
        if s.state not in (states.IDLE, states.BUSY):
            return s.state
        s.stop_reason = reason
        self._transition(s, states.STOPPING, reason=reason)
        if force:
            self._signal(s, signal.SIGKILL)
        else:
            self.hub.send(s.routing_id, p.pack([p.SHUTDOWN, 0, None, s.interrupts]))
            loop = asyncio.get_running_loop()
            s.timers["term"] = loop.call_later(self.config.stop_timeout / 2, self._signal, s, signal.SIGTERM)
            s.timers["kill"] = loop.call_later(self.config.stop_timeout, self._signal, s, signal.SIGKILL)
        return await asyncio.shield(s.exited)

    async def kill(self, s: Session) -> str | None:
        """Kill a session now (admin)."""
        return await self.stop(s, states.KILLED, force=True)

    async def remove(self, s: Session, *, purge: bool = False) -> None:
        """End a session (its owner asked); with purge, delete its data too."""
        await self.stop(s, states.ENDED)
        if self.sessions.get(s.id) is s and not s.live and not s.inflight:
            self._unregister(s)
            s.cancel_timers()
        if purge:
            await self._store_call(self.store.delete_session(s.id))

    # ---------------------------------------------------------------- helpers

    def _transition(self, s: Session, new: str, **info) -> None:
        """Move a session to a new state (asserted), keep counts, log and publish it."""
        old = s.state
        states.check(old, new)
        s.state = new
        was_live, is_live = states.is_live(old), states.is_live(new)
        if is_live and not was_live:
            self.live_count += 1
            self.live_by_tenant[s.tenant] += 1
        elif was_live and not is_live:
            self.live_count -= 1
            self.live_by_tenant[s.tenant] -= 1
        if new == states.IDLE:
            self.reaper.arm_idle(s)
        if new in _TURN_STATES and old in _TURN_STATES:
            # The idle <-> busy flip happens twice per turn: log it only when debug is on, and
            # build the event only when someone listens (both measurable on a warm turn).
            if debug_enabled():
                log.debug("session_state", session_id=s.id, tenant=s.tenant, pid=s.pid, old=old, new=new, **info)
            if self.events.reaches_anyone(s.id, "state"):
                self.events.publish("state", s.id, tenant=s.tenant, state=new, previous=old, pid=s.pid, **info)
            return
        log.info("session_state", session_id=s.id, tenant=s.tenant, pid=s.pid, old=old, new=new, **info)
        self.events.publish("state", s.id, tenant=s.tenant, state=new, previous=old, pid=s.pid, **info)

    async def _store_call(self, coro):
        """Await a store operation; an unreachable store is a 503, not a traceback."""
        try:
            return await coro
        except StoreError as exc:
            # the cause names files, hosts and tables: it goes to the log, not to tenants
            log.error("store_error", error=str(exc))
            raise errors.Unavailable("the session store is unavailable; try again shortly", retry_after=5) from None
        except StaleEpoch as exc:
            raise errors.SessionMoved(f"session {exc.args[0]} was claimed by another node") from None
        except StoredSessionMissing as exc:
            # its data was purged (DELETE ?purge=true, retention) while a request was on its way
            raise errors.SessionNotFound(f"session {exc.args[0]} was deleted") from None

    def _background_task(self, coro) -> asyncio.Task:
        """Run a coroutine the supervisor owns, kept until done (awaited at close)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task) -> None:
        """Log what a background task raised."""
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, errors.CorralError):
                log.error("background_task_failed", error=repr(exc))

    def _schedule_retention(self) -> None:
        """Delete ended sessions past the retention period, on a timer."""
        interval = max(1.0, min(3600.0, self.config.retention / 4))
        loop = asyncio.get_running_loop()
        self._retention_timer = loop.call_later(interval, self._retention_due)

    def _retention_due(self) -> None:
        """Run one retention pass and schedule the next."""
        self._background_task(self.purge_ended())
        self._schedule_retention()

    async def purge_ended(self) -> int:
        """Delete sessions that ended more than ``retention`` seconds ago."""
        removed = await self._store_call(self.store.purge_ended(self.config.retention))
        if removed:
            log.info("retention_purged", sessions=removed)
            self.events.publish_global("purged", sessions=removed, retention=self.config.retention)
        return removed

    def health(self) -> dict:
        """What /health reports about the supervisor."""
        return {
            "live_sessions": self.live_count,
            "sessions_in_memory": len(self.sessions),
            "zygote_pid": self.spawner.pid if self.spawner else None,
            "limit": self.limiter.describe() if self.limiter else None,
            "sandbox": self.sandbox.describe() if self.sandbox else None,
            "store": getattr(self.store, "backend", None),
            "uptime_seconds": round(time.time() - self.started_at, 3),
        }


def recent_history(history: list, max_bytes: int) -> list[dict]:
    """The newest messages of ``history`` whose contents fit in ``max_bytes`` (the oldest are dropped)."""
    kept, total = [], 0
    for m in reversed(history):
        total += len(m.content.encode())
        if total > max_bytes:
            break
        kept.append({"role": m.role, "content": m.content})
    kept.reverse()
    return kept


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


def _close_all(fds) -> None:
    """Close descriptors we own."""
    for fd in fds:
        os.close(fd)


def _consume(fut: asyncio.Future) -> None:
    """Mark a future's exception as seen (its waiters may be gone)."""
    if not fut.cancelled():
        fut.exception()

