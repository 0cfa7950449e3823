"""A session's turns: admission, the mailbox, the agent's frames, a turn's deadline.

``Turns`` is a part each ``SessionLife`` (supervisor/session_life.py) holds as ``turns``: it owns
the turns sent to the current process (``pending``, by request id) and the count of frames the
process had no business sending. It asks its session's process for what it needs through
``TurnsProcess`` (below: be live, send a request, interrupt, kill) and the registry through
``SessionHost`` (supervisor/session_host.py) for what is shared (the events, the store, the
counters, the deadlines, ``transition``).
"""

import asyncio
import signal
import time
from typing import Protocol

from corral.agent_proc import protocol as p
from corral.supervisor import errors, states
from corral.supervisor.logs import get_logger
from corral.supervisor.session import Turn
from corral.supervisor.session_host import SessionHost

log = get_logger(component="supervisor")

_FAIL_ERRORS = {
    p.UNKNOWN_COMMAND: errors.CommandNotFound,
    p.BAD_REQUEST: errors.InvalidRequest,
    p.UPSTREAM_ERROR: errors.UpstreamFailed,
    p.AGENT_CRASHED: errors.AgentDied,
    p.AGENT_OOM: errors.AgentDied,
    p.AGENT_BAD_REPLY: errors.AgentBadReply,
}
# Frames an agent may send for turns it was never given before it is killed as hostile.
# A well-behaved agent sends none.
STRAY_FRAME_LIMIT = 10_000
# Why an agent was killed for what it did (a session's end_reason; docs/limits.md).
UNRESPONSIVE, STRAY_FRAMES, TURN_TOO_LARGE = "unresponsive", "stray_frames", "turn_too_large"
DEATH_CODES = {states.OOM: p.AGENT_OOM, states.CRASHED: p.AGENT_CRASHED}


class TurnsProcess(Protocol):
    """What a session's turns ask of its process's life (``SessionLife`` implements it)."""

    dying: bool  # the agent announced its death and is exiting: new turns wait for the respawn

    async def ensure_live(self) -> None:
        """Make sure the session has a ready process."""

    def send_request(self, kind: int, req: int, body) -> None:
        """Write one request frame on the current process's connection."""

    def on_ready(self, body) -> None:
        """The agent said READY."""

    def interrupt(self) -> bool:
        """SIGINT the turn in progress."""

    def kill_for(self, reason: str, sig: int = signal.SIGKILL, detail: str | None = None) -> None:
        """End the process because of what it did."""

    def kill_after(self, delay: float) -> None:
        """SIGKILL the process after ``delay`` seconds unless it is gone by then."""

    def dying_now(self) -> None:
        """The agent said it is exiting: take no more messages until its exit report."""


class Turns:
    """The turns of one session's current process."""

    def __init__(self, session, host: SessionHost, process: TurnsProcess):
        self.session = session
        self.host = host
        self.process = process
        self.pending: dict[int, Turn] = {}  # req id -> Turn, sent to the agent
        self.stray_frames = 0  # frames for turns it was never given, or forged, from the current process

    def new_process(self) -> None:
        """A new process starts: nothing of the old one's counts toward its bounds."""
        self.stray_frames = 0

    def current(self) -> int | None:
        """The request id of the turn in progress (the oldest one sent), or None."""
        return next(iter(self.pending), None)

    def waiting(self) -> list[Turn]:
        """The turns sent to the process whose answer has not come."""
        return [turn for turn in self.pending.values() if not turn.future.done()]

    def fail_all(self, err: Exception) -> None:
        """The process is gone: every turn sent to it fails with ``err``."""
        for turn in self.pending.values():
            if not turn.future.done():
                turn.future.set_exception(err)
                turn.future.add_done_callback(consume)
        self.pending.clear()

    async def submit(self, kind: int, body, *, on_chunk=None, record_as: str | None = None) -> Turn:
        """Admit, persist and send one message; return the turn to wait on.

        When this returns, the message is committed to the store and in the agent's mailbox.
        """
        s = self.session
        try:
            self._admit(body)
        except errors.CorralError:
            if not s.inflight:
                self.host.drop_if_new(s)  # a refused first message must not leave an unstarted session behind
            raise
        s.inflight += 1
        s.last_activity = time.monotonic()
        try:
            await self.process.ensure_live()
            if record_as is not None:
                try:
                    await self._record(record_as, body)
                except errors.SessionMoved:
                    raise await self.host.moved(s.key) from None  # not committed: the new owner may take it
                # The process may have died (and a respawn begun) while the message was committed:
                # sending now would put the turn in a mailbox nobody reads.
                await self.process.ensure_live()
            turn = self.send(kind, body, on_chunk)
            if record_as is not None:
                turn.in_bytes = utf8_len(body)
            return turn
        except BaseException:
            self.turn_over()
            raise

    async def complete(self, turn: Turn) -> dict:
        """Wait for a submitted turn's answer (within request_timeout); persist and return it."""
        s = self.session
        # A deadline that fails the turn's future, rather than asyncio.timeout/wait_for around a
        # shield or a timer per turn: those cost a task, futures, callbacks or a timer per turn,
        # a measurable share of a warm turn (docs/benchmarks.md).
        self.host.turn_deadlines.add(turn, self.host.config.request_timeout, self)
        status, out_bytes = "failed", None
        try:
            done = await turn.future
            status = done.get("status")
            if status == "done":
                s.agent_state = done.get("state") or s.agent_state
                if turn.kind == p.MESSAGE:
                    reply = done.get("reply") or ""
                    done["message"] = await self._record("assistant", reply)
                    out_bytes = utf8_len(reply)
            return done
        except errors.CorralError as exc:
            # The session's listeners learn why no reply is coming (a wait=false caller has no other way).
            self.host.events.publish("error", s.key, to_all=False, code=exc.code, message=exc.message)
            raise
        finally:
            self.host.turn_deadlines.discard(turn)
            self.turn_over()
            if self.host.events.wants("turn"):  # usage accounting (supervisor/usage.py)
                self.host.events.publish_global("turn", session_id=s.id, tenant=s.tenant, status=status,
                                               in_bytes=turn.in_bytes, out_bytes=out_bytes)

    def time_out(self, turn: Turn) -> None:
        """request_timeout passed without an answer: interrupt the turn and fail its waiter (504)."""
        if turn.future.done():
            return
        turn.abandoned = True
        self.process.interrupt()
        # If the interrupt is ignored, the agent is unresponsive (turn_hung): one timer for all.
        self.host.hung_turns.add(turn, self.host.config.stop_timeout / 2, self)
        turn.future.set_exception(errors.TurnTimeout(
            f"no reply within request_timeout ({self.host.config.request_timeout:g}s); the turn was interrupted"
        ))

    def turn_hung(self, turn: Turn) -> None:
        """A timed-out turn is still running stop_timeout/2 after its interrupt: SIGTERM, then SIGKILL.

        The session ends ``killed`` with end_reason ``unresponsive`` and comes back, history
        restored, on its next message.
        """
        s = self.session
        if s.state != states.BUSY or turn not in self.pending.values():
            return  # answered (or the process is already gone)
        self.host.counters["agents_unresponsive"] += 1
        log.warning("agent_unresponsive", session_id=s.id, tenant=s.tenant, pid=s.pid)
        self.process.kill_for(UNRESPONSIVE, signal.SIGTERM)
        self.process.kill_after(self.host.config.stop_timeout / 2)

    def _admit(self, body) -> None:
        """Refuse a message that cannot be sent or is over the size, mailbox or rate bounds (before any work)."""
        s = self.session
        self.host.drain.admit()
        # JSON admits what msgpack refuses: lone surrogates ("\ud800"), ints over 64 bits.
        try:
            if isinstance(body, str):  # the common case: the size check's encode catches surrogates
                if len(body.encode()) > self.host.config.max_message_bytes:
                    raise errors.TooLarge(f"message is over max_message_bytes ({self.host.config.max_message_bytes})")
            else:
                p.check_encodable(body)
        except (TypeError, ValueError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
            raise errors.InvalidRequest(f"the message cannot be encoded for the agent: {exc}") from None
        if s.inflight >= self.host.config.mailbox_size:
            raise errors.MailboxFull(f"session {s.id} has {s.inflight} messages in flight", retry_after=1)
        if s.bucket is not None:
            wait = s.bucket.take()
            if wait:
                raise errors.RateLimited(f"session {s.id} is over its rate limit", retry_after=wait)

    def send(self, kind: int, body, on_chunk) -> Turn:
        """Put one frame in the agent's mailbox."""
        s = self.session
        if self.host.drain.ended:  # admitted before the shutdown ended the turns: nobody will run it
            raise self.host.drain.error()
        req = self.host.next_request_id()
        turn = Turn(kind, asyncio.get_running_loop().create_future(), on_chunk)
        self.pending[req] = turn
        # If the agent is already gone, the frame is refused; its exit report fails the turn.
        self.process.send_request(kind, req, body)
        if s.state == states.IDLE:
            self.host.transition(s, states.BUSY)
        return turn

    def turn_over(self) -> None:
        """A request has been answered (or refused): settle busy/idle and bookkeeping."""
        s = self.session
        s.inflight -= 1
        s.last_activity = time.monotonic()
        if s.state == states.BUSY and not self.pending:
            self.host.transition(s, states.IDLE)
        elif s.state == states.IDLE:
            self.host.reaper.arm_idle(s)  # a request refused before its frame left skips the idle timer's re-arm
        elif not s.live:
            self.host.forget(s)
        self.host.drain.turn_over()

    async def _record(self, role: str, content) -> dict:
        """Commit one message to the store and tell listeners."""
        s = self.session
        text = content if isinstance(content, str) else str(content)
        msg = await self.host.record_message(s, role, text)
        s.message_count = msg.seq
        data = msg.to_dict()
        self.host.events.publish("message", s.key, to_all=False, message=data)
        return data

    def on_frame(self, kind: int, req: int, body, size: int) -> None:
        """Handle one frame from this session's agent (the registry routes it by connection)."""
        s = self.session
        if kind in (p.CHUNK, p.DONE, p.FAIL):
            turn = self.pending.get(req)
            if turn is None:
                self.stray_frame()
                return
            turn.bytes += size
            if turn.bytes > self.host.config.max_turn_bytes:
                self.process.kill_for(TURN_TOO_LARGE, detail=f"sent over {self.host.config.max_turn_bytes} bytes for one turn")
                return
        if kind == p.CHUNK:
            if not turn.abandoned:
                turn.chunks += 1
                if turn.on_chunk is not None:
                    turn.on_chunk(body)
                if self.host.events.watched(s.key):
                    self.host.events.publish("delta", s.key, to_all=False, req=req, seq=turn.chunks, text=body)
        elif kind == p.DONE:
            # any ZeroMQ peer may be an agent: it is checked, not trusted; a state past the bound is not
            # kept (it would stay in the supervisor's memory, outside every session's limit)
            problem = p.reply_problem(body) or p.snapshot_problem(body, size, self.host.config.max_snapshot_bytes)
            if problem is not None:
                self._fail_turn(req, p.fail_body(p.AGENT_BAD_REPLY, problem))
                return
            turn = self.pending.get(req)
            if turn is not None and turn.kind == p.MESSAGE and not turn.chunks and body.get("reply"):
                # A reply the agent returned whole comes without a CHUNK frame (one frame less per
                # turn); listeners still see it as the turn's one chunk, as if it had been streamed.
                self.on_frame(p.CHUNK, req, body["reply"], 0)  # its bytes are counted with the DONE
            self._finish_turn(req, {"status": "done", **(body or {})})
        elif kind == p.FAIL:
            self._fail_turn(req, body or {})
        elif kind == p.READY:
            self.process.on_ready(body)

    def stray_frame(self) -> None:
        """Count a frame an agent had no business sending; kill the agent past STRAY_FRAME_LIMIT."""
        s = self.session
        self.stray_frames += 1
        if self.stray_frames == STRAY_FRAME_LIMIT:
            self.host.counters["agents_killed_for_abuse"] += 1
            log.warning("agent_flooding_killed", session_id=s.id, tenant=s.tenant, pid=s.pid, frames=self.stray_frames)
            self.process.kill_for(STRAY_FRAMES, detail=f"killed after {STRAY_FRAME_LIMIT} frames for turns it was not given")

    def _finish_turn(self, req: int, result: dict) -> None:
        """Resolve a turn."""
        s = self.session
        turn = self.pending.pop(req, None)
        if turn is not None and turn.abandoned:
            self.host.hung_turns.discard(turn)
        if turn is not None and not turn.future.done():
            turn.future.set_result(result)
        if s.state == states.BUSY and not self.pending and not s.inflight:
            self.host.transition(s, states.IDLE)

    def _fail_turn(self, req: int, body: dict) -> None:
        """Resolve a turn the agent reported as failed."""
        code = str(body.get("code", p.AGENT_CRASHED))
        message = str(body.get("message", "the agent failed"))
        state = body.get("state")
        if isinstance(state, dict) and p.json_problem(state) is None:  # checked, not trusted, as a DONE's
            self.session.agent_state = state
        if code == p.INTERRUPTED:
            self._finish_turn(req, {"status": "interrupted", "reply": None, "message_text": message})
            return
        if code in (p.AGENT_CRASHED, p.AGENT_OOM):
            self.process.dying = True  # it exits right after this frame: new turns must wait for the respawn
        turn = self.pending.pop(req, None)
        if turn is not None and turn.abandoned:
            self.host.hung_turns.discard(turn)
        if turn is not None and not turn.future.done():
            err_cls = _FAIL_ERRORS.get(code, errors.AgentDied)
            turn.future.set_exception(err_cls(message, code=code if err_cls is errors.AgentDied else None))
            turn.future.add_done_callback(consume)
        if code in DEATH_CODES.values():
            self.process.dying_now()


def utf8_len(content) -> int:
    """The UTF-8 size of a message as the store keeps it."""
    return len((content if isinstance(content, str) else str(content)).encode("utf-8", "surrogatepass"))


def consume(fut: asyncio.Future) -> None:
    """Mark a future's exception as seen (its waiters may be gone)."""
    if not fut.cancelled():
        fut.exception()
