"""The registry: every session of one corral server, and what they share.

``Supervisor`` is to a session's ``SessionLife`` (supervisor/session_life.py) what jupyter_client's
``MultiKernelManager`` is to a ``KernelManager``: it holds the indexes (by id, by pid, by routing
id), capacity and quotas, get-or-create (asking the cluster directory where a session
lives: supervisor/cluster/), counters and health, and ``transition``, the one place a state
changes. It holds four parts, each an object of its own: ``lifecycle`` (the shared parts' start
and close, supervisor/lifecycle.py), ``activation`` (this node in the cluster: the directory,
claims, fencing, supervisor/cluster/activation.py), ``retention`` (supervisor/retention.py) and
``queries`` (what the routes ask: find, history, end, stats, supervisor/queries.py). Each session's ``SessionLife`` sees the registry as a
``SessionHost`` (supervisor/session_host.py); everything that happens to one session's process is
its ``SessionLife``'s.

One asyncio loop, no threads of its own, no per-session polling: agent frames arrive through
the hub's reader, deaths through the spawner's exit reports, idle and age through timers.
"""

import asyncio
import contextlib
import functools
import itertools
import os
import signal
import time
from collections import Counter

from corral.agent_proc import protocol as p
from corral.supervisor import errors, states
from corral.supervisor.agent_output import AgentOutput
from corral.supervisor.cluster.activation import Activation
from corral.supervisor.lifecycle import STARTUP_REFUSALS, Lifecycle
from corral.supervisor.config import Config
from corral.supervisor.deadlines import Deadlines
from corral.supervisor.drain import Drain
from corral.supervisor.events import EventBus
from corral.supervisor.logs import debug_enabled, get_logger
from corral.supervisor.store_errors import store_call
from corral.supervisor.node import node_name
from corral.supervisor.queries import Queries
from corral.supervisor.reaper import Reaper
from corral.supervisor.restarts import RestartPolicy
from corral.supervisor.retention import Retention
from corral.supervisor.session import Session, TokenBucket, Turn, bad_session_id, new_session_id, valid_session_id
from corral.supervisor.session_keys import session_key
from corral.supervisor.session_life import SessionLife
from corral.supervisor.turns import Turns
from corral.supervisor.tasks import TaskSet
from corral.supervisor.usage import Usage

log = get_logger(component="supervisor")

_TURN_STATES = (states.IDLE, states.BUSY)


class Supervisor:
    """Owns every session of one corral server."""

    def __init__(self, config: Config, *, store=None, claim=None, events: EventBus | None = None,
                 tenant_limits=None, launcher=None, tenant_env=None, tenant_egress=None):
        """``claim``: this node's identity, already claimed in ``store`` (supervisor/node.py); else claimed at start.

        ``launcher``: the spawner class (supervisor/spawner.py's interface); the zygote's by default.
        """
        self.config = config
        self.events = events or EventBus()
        self.tenant_limits: dict[str, int] = dict(tenant_limits or {})
        self.tenant_env: dict[str, dict[str, str]] = dict(tenant_env or {})  # variables each tenant's agents get
        self.sessions: dict[str, Session] = {}
        self.by_pid: dict[int, Session] = {}
        self.by_rid: dict[bytes, Session] = {}
        self.live_count = 0
        self.live_by_tenant: Counter = Counter()
        self.counters: Counter = Counter()  # spawns, restarts, crashes, ooms, reaps ... since start
        self.policy = RestartPolicy(config.max_restarts, config.restart_window)
        self.reaper = Reaper(idle_timeout=config.idle_timeout, max_age=config.max_age, on_due=self._on_due)
        self.turn_deadlines = Deadlines(on_due=_time_out)  # turn -> its session's Turns, until request_timeout
        # A timed-out turn -> its session's Turns, for stop_timeout/2 more: then the agent is unresponsive.
        self.hung_turns = Deadlines(on_due=_turn_hung)
        self.usage = Usage(self, interval=config.usage_interval)  # usage per session and tenant (supervisor/usage.py)
        self.output = AgentOutput(config.agent_log_lines, self.events)  # every agent's stdout/stderr, and each session's tail
        self.started_at = time.time()
        self._request_ids = itertools.count(1)
        # coroutines the supervisor runs past their caller (end writes, stops, zygote restarts)
        self.background = TaskSet(log, expected=(errors.CorralError,))
        # session id -> the store write recording its last death, awaited before it respawns
        self._status_writes: dict[str, asyncio.Task] = {}
        self._close_task: asyncio.Task | None = None
        self.drain = Drain(self.sessions.values)  # the shutdown's: refuse new turns, wait, end what remains
        self.lifecycle = Lifecycle(config, background=self.background, store=store, claim=claim, launcher=launcher,
                                   tenant_egress=tenant_egress, on_egress_denied=self._egress_denied,
                                   on_egress_counted=self._egress_counted)
        # node: names this server in the store's sessions.node (supervisor/node.py says what it means)
        self.activation = Activation(config, node_name(config.port), sessions=self.sessions, counters=self.counters,
                                     events=self.events, node_info=self.node_info, end_now=self._end_now)
        self.queries = Queries(self, self.activation)
        self.retention = Retention(config.retention, store=lambda: self.store, events=self.events,
                                   background=self.background)

    # The shared parts, as the sessions, the web layer and the tests read them (the lifecycle owns them).
    store = property(lambda self: self.lifecycle.store, doc="The session store.")
    hub = property(lambda self: self.lifecycle.hub, doc="The ROUTER every agent's connection is on.")
    spawner = property(lambda self: self.lifecycle.spawner, doc="The running launcher (None while the zygote restarts).")
    limiter = property(lambda self: self.lifecycle.limiter, doc="The memory limiter and its controls.")
    sandbox = property(lambda self: self.lifecycle.sandbox, doc="The sandbox plan chosen at start.")
    run_dir = property(lambda self: self.lifecycle.run_dir, doc="This run's private directory.")
    claim = property(lambda self: self.lifecycle.claim, doc="This server's hold on its node identity.")
    closing = property(lambda self: self.lifecycle.closing, doc="Whether the server is shutting down (no more spawns).")
    node = property(lambda self: self.activation.node, doc="This node's name (its cluster node id once it joined).")
    membership = property(lambda self: self.activation.membership, doc="This node's cluster membership, if any.")
    gateway = property(lambda self: self.lifecycle.gateway, doc="The egress gateway (--agent-network proxy), if any.")

    async def start(self) -> None:
        """Open the store, join the cluster, bind the hub, start the zygote."""
        self.lifecycle.make_run_dir()
        try:
            await self.lifecycle.open(self.node)
            # start-up may cap max_sessions at what the host holds (Lifecycle.fit_max_sessions)
            self.config = self.activation.config = self.lifecycle.config
            await self.activation.join(self.store, self.claim)
            await self.lifecycle.end_orphans(self.node)
            await self.lifecycle.launch(on_frame=self.on_frame, on_drop=self.on_drop, on_abuse=self.on_abuse,
                                        on_pause=self.on_pause)
        except STARTUP_REFUSALS as exc:
            await self.close()
            raise errors.StartupError(str(exc)) from exc
        except BaseException:
            await self.close()
            raise
        self.retention.start()
        self.usage.start()
        self.events.publish_global("node", state="joined", node=self.node)
        log.info("supervisor_started", run_dir=self.run_dir, limit=self.limiter.describe(), agent=self.config.agent)

    async def close(self) -> None:
        """Stop every session, the zygote, the cluster membership and the shared parts.

        One close runs, to its end: a caller cancelled meanwhile (a stop signal during start-up)
        does not cut it short, and a later caller waits for it.
        """
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        """Close the parts in reverse order of their start."""
        self.lifecycle.begin_close()
        self.retention.stop()
        live = [s for s in self.sessions.values() if s.live]
        if live:
            stops = [s.life.stop(states.ENDED, force=self.drain.hurried) for s in live]
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*stops, return_exceptions=True), self.config.stop_timeout + 2)
        await self.lifecycle.close_spawner()
        with contextlib.suppress(Exception):
            await self.activation.leave()
        self.output.close()
        await self.background.wait(timeout=5)
        self.turn_deadlines.close()
        self.hung_turns.close()
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.usage.close()  # the ends of the sessions just stopped, before the store goes
            self.events.publish_global("node", state="left", node=self.node)
        await self.lifecycle.close()
        log.info("supervisor_stopped")

    def hurry(self) -> None:
        """Stop now (a further signal during the shutdown): SIGKILL every session's process, live or stopping.

        A live one is stopped (ended, not crashed: the stop comes first); one already stopping gets the SIGKILL.
        """
        self.drain.hurried = True
        for s in list(self.sessions.values()):
            if s.state == states.STOPPING:
                s.life.send_signal(signal.SIGKILL)
            elif s.live:
                self.background.spawn(s.life.stop(states.ENDED, force=True))

    def _egress_counted(self, session_id: str, tenant: str, field: str, amount: int) -> None:
        """Traffic through the egress gateway, for the session's and tenant's usage (billing)."""
        if field in ("bytes_in", "bytes_out"):
            self.usage.record_egress(session_id, bytes=amount, tenant=tenant)
        elif field == "requests":
            self.usage.record_egress(session_id, requests=amount, tenant=tenant)

    def _egress_denied(self, session_id: str, tenant: str, destination: str, reason: str) -> None:
        """A refusal at the egress gateway, for the admin event stream (it is logged and counted there)."""
        self.events.publish_global("egress_denied", session_id=session_id, tenant=tenant, destination=destination,
                                   reason=reason)

    def egress_counts(self, session_id: str, tenant: str) -> dict | None:
        """A session's traffic through the egress gateway (bytes_in, bytes_out, requests, refused); None without one."""
        return self.gateway.counters_for(session_id, tenant) if self.gateway else None

    def egress_by_tenant(self) -> dict[str, dict]:
        """Every tenant's traffic through the egress gateway since start."""
        return self.gateway.tenant_counters() if self.gateway else {}

    def health(self) -> dict:
        """What /health reports about the supervisor."""
        return {
            "live_sessions": self.live_count,
            "max_sessions": self.config.max_sessions,  # after start-up's cap (Lifecycle.fit_max_sessions)
            "sessions_in_memory": len(self.sessions),
            **self.lifecycle.describe(),
            "uptime_seconds": round(time.time() - self.started_at, 3),
        }

    def node_info(self) -> dict:
        """What this node reports in its heartbeat (shown by /admin/nodes)."""
        rss = None
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{os.getpid()}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {"live_sessions": self.live_count, "sessions_in_memory": len(self.sessions),
                "server_rss_bytes": rss, "pid": os.getpid()}

    async def get_or_create(self, session_id: str | None, tenant: str, metadata: dict | None = None) -> Session:
        """The tenant's session with this id (from memory or the store), or a new one.

        Ids are per tenant (supervisor/session_keys.py): another tenant's ``s1`` is another session.
        """
        if session_id is None:
            session_id = new_session_id()
        elif not valid_session_id(session_id):
            raise bad_session_id()
        key = session_key(tenant, session_id)
        s = self.sessions.get(key)
        if s is None or (not s.live and self.activation.fenced):
            record = await self.activation.placed(key)
            if record is not None and record.tenant != tenant:  # a row from before ids were per tenant
                raise errors.SessionNotFound(f"no session {session_id}")
            s = self.sessions.get(key)  # another request may have registered it meanwhile
            if s is None:
                s = self._register(session_id, tenant, metadata, record)
        return s

    def _register(self, session_id: str, tenant: str, metadata, record) -> Session:
        """Put a session object in the registry."""
        if record is not None:
            metadata = record.metadata
        s = Session(id=session_id, tenant=tenant, metadata=dict(metadata or {}))
        s.life = SessionLife(s, self)
        if record is not None:
            s.created_at, s.message_count = record.created_at, record.message_count
        if self.config.rate_limit > 0:
            s.bucket = TokenBucket(self.config.rate_limit, self.config.rate_burst)
        self.sessions[s.key] = s
        return s

    def agent_output(self, key: str) -> list[dict]:
        """The kept lines of a session's agent output (by its key), oldest first (empty if none are kept)."""
        return self.output.lines_of(key, self.sessions.get(key)) or []

    def list_sessions(self) -> list[Session]:
        """Every session the supervisor holds in memory (live, and recently crashed or failed)."""
        return list(self.sessions.values())

    def count(self) -> int:
        """Number of live sessions."""
        return self.live_count

    async def moved(self, session_id: str) -> errors.SessionMoved:
        """The error for a session another node has claimed, naming its owner when that one is alive."""
        return await self.activation.moved(session_id)

    def agent_env(self, tenant: str) -> dict[str, str]:
        """The variables a tenant's agents get over the base environment (the tenants file's ``env``)."""
        return self.tenant_env.get(tenant, {})

    def forget(self, s: Session) -> None:
        """Drop a down session from memory once nobody waits on it (the store keeps its data)."""
        if s.live or s.inflight:
            return
        if s.state in states.STOP_REASONS or s.state is None:
            self._unregister(s)
            s.life.cancel_timers()
        elif "forget" not in s.timers:
            # Keep crash history for the restart window, then let it go.
            loop = asyncio.get_running_loop()
            s.timers["forget"] = loop.call_later(self.config.restart_window, self._forget_after_window, s)

    def next_request_id(self) -> int:
        """A request id no other turn of this server has."""
        return next(self._request_ids)

    def index(self, s: Session, *, routing_id: bytes | None = None, pid: int | None = None) -> None:
        """Route frames from ``routing_id`` and exits of ``pid`` to this session."""
        if routing_id is not None:
            self.by_rid[routing_id] = s
        if pid is not None:
            self.by_pid[pid] = s

    def unindex(self, s: Session, *, routing_id: bytes, pid: int | None) -> None:
        """Stop routing them (only where they still name this session)."""
        if self.by_rid.get(routing_id) is s:
            del self.by_rid[routing_id]
        if pid is not None and self.by_pid.get(pid) is s:
            del self.by_pid[pid]

    async def ready_spawner(self):
        """The spawner to launch with (waiting for a zygote restart in progress); 503 if there is none."""
        return await self.lifecycle.ready_spawner()

    async def record_message(self, s: Session, role: str, text: str):
        """Commit one message to the store; SessionMoved, the session fenced out, on a stale epoch."""
        try:
            return await store_call(self.store.append_message(s.key, role, text, epoch=s.epoch))
        except errors.SessionMoved:
            self.activation.fence_out(s, f"its {role} message was refused for a stale epoch")
            raise

    def _forget_after_window(self, s: Session) -> None:
        """The restart window of a crashed session has passed."""
        s.timers.pop("forget", None)
        if not s.live and not s.inflight:
            self._unregister(s)

    def _unregister(self, s: Session) -> None:
        """Take a session out of memory; its output's tail stays readable a while (AgentOutput.retire)."""
        if self.sessions.get(s.key) is s:
            del self.sessions[s.key]
            self.output.retire(s)

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
        turn = await self.submit(s, p.COMMAND, p.command_body(command, args))
        return await self.complete(s, turn)

    async def submit(self, s: Session, kind: int, body, *, on_chunk=None, record_as: str | None = None) -> Turn:
        """Admit, persist and send one message (Turns.submit); return the turn to wait on."""
        return await s.life.turns.submit(kind, body, on_chunk=on_chunk, record_as=record_as)

    async def complete(self, s: Session, turn: Turn) -> dict:
        """Wait for a submitted turn's answer (Turns.complete)."""
        return await s.life.turns.complete(turn)

    def interrupt(self, s: Session) -> bool:
        """Interrupt the turn in progress (SessionLife.interrupt)."""
        return s.life.interrupt()

    async def ensure_live(self, s: Session) -> None:
        """Make sure the session has a ready process (SessionLife.ensure_live)."""
        await s.life.ensure_live()

    async def stop(self, s: Session, reason: str, *, force: bool = False) -> str | None:
        """Stop a session's process (SessionLife.stop); the state it ended in."""
        return await s.life.stop(reason, force=force)

    async def kill(self, s: Session) -> str | None:
        """Kill a session now (admin)."""
        return await s.life.kill()

    def check_capacity(self, s: Session) -> None:
        """Refuse a spawn past max_sessions (503) or the tenant's quota (429)."""
        cap = self.tenant_limits.get(s.tenant) or self.config.max_sessions_per_tenant
        if self.live_count >= self.config.max_sessions:
            self.drop_if_new(s)
            self.counters["refused_capacity"] += 1
            raise errors.AtCapacity(f"the server is at max_sessions ({self.config.max_sessions})", retry_after=5)
        if cap and self.live_by_tenant[s.tenant] >= cap:
            self.drop_if_new(s)
            self.counters["refused_quota"] += 1
            raise errors.QuotaExceeded(f"tenant {s.tenant} is at its session quota ({cap})", retry_after=5)

    def drop_if_new(self, s: Session) -> None:
        """Forget a session that was never started."""
        if s.state is None and self.sessions.get(s.key) is s:
            del self.sessions[s.key]

    async def prepare_spawn(self, s: Session) -> list[dict]:
        """Record the session in the store and fetch its history."""
        ended = self._status_writes.get(s.key)
        if ended is not None:
            # Otherwise, with a pool of connections, the old end could land after the new start
            # and leave a live session marked ended (and purgeable by retention).
            await asyncio.wait([ended])
        record = await self.activation.claim(s)
        s.created_at, s.message_count = record.created_at, record.message_count
        history = await store_call(self.store.history(s.key, limit=self.config.history_limit))
        return recent_history(history, self.config.history_limit_bytes)

    def on_frame(self, rid: bytes, kind: int, req: int, body, size: int) -> None:
        """Route one frame from an agent to its session (the connection says which: rid is bound at spawn)."""
        s = self.by_rid.get(rid)
        if s is not None:  # else the last words of a process that is already gone
            s.life.turns.on_frame(kind, req, body, size)

    def on_abuse(self, rid: bytes, reason: str, detail: str) -> None:
        """The hub cut an agent's connection (flood, protocol error): kill that agent, and only it."""
        s = self.by_rid.get(rid)
        if s is not None:
            self.counters["agents_killed_for_abuse"] += 1
            s.life.kill_for(reason, detail=f"{reason}: {detail}")

    def on_pause(self, rid: bytes) -> None:
        """Count a connection the hub stopped reading: its agent sends PINGs and reads no PONGs."""
        self.counters["agent_reads_paused"] += 1

    def on_drop(self, rid: bytes, why: str) -> None:
        """Count a frame the hub refused and tell global listeners (metrics, tests)."""
        self.counters["frames_dropped"] += 1
        self.events.publish_global("frame_dropped", routing_id=rid[:128].decode("utf-8", "replace"), reason=why)
        s = self.by_rid.get(rid)
        if s is not None:
            # The hub routes by connection, so a live session's own process sent it.
            s.life.turns.stray_frame()

    def record_end(self, s: Session, final: str) -> None:
        """Write the end to the store in the background; a respawn waits for it (see prepare_spawn)."""
        if self.activation.unclaimed(s):
            return  # fenced out, or its claim was refused: the session's row is another node's
        write = self.background.spawn(store_call(
            self.store.set_status(s.key, final, end_reason=s.end_reason or final, ended=True, epoch=s.epoch)))
        self._status_writes[s.key] = write
        write.add_done_callback(functools.partial(self._end_recorded, s.key))

    def _end_recorded(self, key: str, write: asyncio.Task) -> None:
        """Forget a finished end write (unless a newer one for the session replaced it)."""
        if self._status_writes.get(key) is write:
            del self._status_writes[key]

    async def settle_store(self) -> None:
        """Wait for the background store writes in flight (ends of sessions that went down)."""
        if self._status_writes:
            await asyncio.wait(list(self._status_writes.values()))

    def _end_now(self, s: Session) -> None:
        """SIGKILL a session's process and stop it in the background (fenced out: it must not answer more)."""
        s.life.send_signal(signal.SIGKILL)
        self.background.spawn(s.life.stop(states.ENDED, force=True))

    def _on_due(self, s: Session, reason: str) -> None:
        """A reaper timer fired: stop the session in the background."""
        self.background.spawn(s.life.stop(reason))

    async def remove(self, s: Session, *, purge: bool = False) -> None:
        """End a session (its owner asked); with purge, delete its data too."""
        await s.life.stop(states.ENDED)
        if self.sessions.get(s.key) is s and not s.live and not s.inflight:
            self._unregister(s)
            s.life.cancel_timers()
        if purge:
            await store_call(self.store.delete_session(s.key))

    def transition(self, s: Session, new: str, **info) -> None:
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
            if self.events.reaches_anyone(s.key, "state"):
                self.events.publish("state", s.key, tenant=s.tenant, state=new, previous=old, pid=s.pid, **info)
            return
        log.info("session_state", session_id=s.id, tenant=s.tenant, pid=s.pid, old=old, new=new, **info)
        self.events.publish("state", s.key, tenant=s.tenant, state=new, previous=old, pid=s.pid, **info)


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


def _time_out(turn: Turn, turns: Turns) -> None:
    """request_timeout passed without an answer (one deadline timer for every turn)."""
    turns.time_out(turn)


def _turn_hung(turn: Turn, turns: Turns) -> None:
    """A timed-out turn is still running stop_timeout/2 after its interrupt."""
    turns.turn_hung(turn)
