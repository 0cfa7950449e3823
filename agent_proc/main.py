"""An agent process's main loop: one mailbox, one message at a time (actor semantics).

Blocks on receive with no timeout while idle, so an idle agent costs no CPU. SIGINT interrupts
the turn in progress only; one that lands between turns is ignored.

Async hooks run on an event loop made in this process the first time one is called (never in the
zygote, and never for an agent whose hooks are all sync). An interrupt cancels the turn's task; if
the loop is blocked and cannot deliver the cancellation, the next SIGINT raises KeyboardInterrupt.
"""

import asyncio
import inspect
import os
import signal
import socket
import sys
import traceback

from corral.agent_proc import protocol as p
from corral.agent_proc.dealer import Dealer
from corral.agent_proc.agent import BadRequest, UnknownCommand, UpstreamError, iter_reply
from corral.agent_proc.limits import OOM_EXIT_CODE
from corral.agent_proc.process import agent_title, set_title


class AgentLoop:
    """Serves one session's mailbox over its DEALER connection to the hub."""

    def __init__(self, agent_cls, sock, *, session_id: str, tenant: str):
        self.agent_cls = agent_cls
        self.sock = sock
        self.session_id = session_id
        self.tenant = tenant
        self.agent = None
        self.busy = False
        self.sigints = 0  # SIGINTs received
        self.sigints_used = 0  # ... of which already ended a turn (or predate the current one)
        self.sending = False
        self.interrupt_pending = False  # an interrupt that landed mid-send, raised once the frame is out
        self.loop: asyncio.AbstractEventLoop | None = None  # made on the first async hook
        self.wakeup: socket.socket | None = None  # the signal wake-up fd while the loop runs
        self.turn_task: asyncio.Task | None = None  # the async turn in progress
        self.cancel_pending = False  # its cancellation was asked for and the loop has not taken it up

    def send(self, pack, *fields) -> None:
        """Send one frame to the supervisor, made by ``pack(*fields)`` (one of protocol's reply packers).

        The frame goes out whole even if the turn is interrupted meanwhile: a stream socket cut
        mid-frame would garble every frame after it. The interrupt is raised once it is sent.
        """
        self.sending = True
        try:
            self.sock.send(pack(*fields))
        finally:
            self.sending = False
        if self.interrupt_pending:
            self.interrupt_pending = False
            raise KeyboardInterrupt

    def serve(self) -> int:
        """Receive and handle messages until told to shut down; return the exit code."""
        signal.signal(signal.SIGINT, self._on_sigint)
        self.send(p.pack_ready, os.getpid())
        while True:
            try:
                kind, req, body, sent_before = p.unpack_request(self.sock.recv())
            except EOFError:
                return 0  # the supervisor closed our connection: it is shutting down
            except KeyboardInterrupt:
                continue  # an interrupt that arrived after its turn ended
            except ValueError as exc:  # zmtp.ProtocolError is a ValueError
                # Only the supervisor writes here, so this is a bug on its side; after a broken frame
                # the stream cannot be trusted, and waiting on it would hang the session: exit now.
                print(f"corral agent {self.session_id}: protocol error on its connection: {exc}", file=sys.stderr)
                return p.PROTOCOL_ERROR_EXIT_CODE
            if kind == p.SHUTDOWN:
                self.stop()
                return 0
            self.handle(kind, req, body, sent_before)

    def stop(self) -> None:
        """Run the agent's ``on_stop`` (sync or async) and close the event loop, if one was made."""
        try:
            if self.agent is not None:
                result = self.agent.on_stop()
                if inspect.isawaitable(result):
                    self.run_async(result)
        finally:
            if self.loop is not None:
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.close()

    def _on_sigint(self, signum, frame):
        """Interrupt the turn in progress; between turns, remember it for the next one."""
        self.sigints += 1
        if self.cancel_pending:  # the loop is blocked (a sync call in an async hook): interrupt the call
            self.cancel_pending = False
            self.sigints_used = self.sigints
            self._raise_interrupt()
        elif self.busy and self.sigints > self.sigints_used:  # not a late one sent before this turn
            self.busy = False  # one interrupt per turn: a second SIGINT must not escape ``handle``
            self.sigints_used = self.sigints
            if self.turn_task is not None:
                self._cancel_soon(self.turn_task)
            else:
                self._raise_interrupt()

    def _raise_interrupt(self) -> None:
        """Raise KeyboardInterrupt now, or once the frame being sent is out."""
        if self.sending:
            self.interrupt_pending = True
            return
        raise KeyboardInterrupt

    def _cancel_soon(self, task: asyncio.Task) -> None:
        """Ask the loop to cancel the turn's task (safe in a signal handler: it only wakes the loop)."""
        self.cancel_pending = True
        self.loop.call_soon_threadsafe(self._cancel_turn, task)

    def _cancel_turn(self, task: asyncio.Task) -> None:
        """On the loop: cancel the task, unless its turn is over (a late callback)."""
        if task is self.turn_task and self.cancel_pending:
            self.cancel_pending = False
            task.cancel()

    def handle(self, kind: int, req: int, body, sent_before: int = 0) -> None:
        """Run one message through the agent's hooks and answer it.

        ``busy`` is only true inside the inner ``try``, so a SIGINT can only raise where it is caught:
        one that lands as the turn ends interrupts it or is merely counted, never kills the process.
        ``sent_before`` is how many SIGINTs the supervisor had sent when it sent this frame; those are
        for earlier turns, however late they land.
        """
        try:
            try:
                self.sigints_used = max(self.sigints_used, sent_before)
                self.busy = True  # from here a SIGINT for this turn raises ...
                if self.sigints > self.sigints_used:  # ... and one that landed before we took it up counts
                    self.busy = False
                    self.sigints_used = self.sigints
                    raise KeyboardInterrupt
                set_title(agent_title(self.session_id, self.tenant, True))
                result = self.dispatch(kind, req, body)
                state = self.agent.snapshot() if self.agent is not None else {}
            finally:
                self.busy = False
            answer = p.pack_done, result, state
            problem = p.done_problem(result, state)
            if problem is not None:
                answer = p.pack_fail, p.AGENT_BAD_REPLY, problem
        except (KeyboardInterrupt, asyncio.CancelledError):
            answer = p.pack_fail, p.INTERRUPTED, "the turn was interrupted"
        except UnknownCommand as exc:
            answer = p.pack_fail, p.UNKNOWN_COMMAND, f"unknown command: {exc}"
        except BadRequest as exc:
            answer = p.pack_fail, p.BAD_REQUEST, str(exc)
        except UpstreamError as exc:
            answer = p.pack_fail, p.UPSTREAM_ERROR, str(exc)
        except MemoryError:
            self._die(req, p.AGENT_OOM, "the agent ran out of memory", OOM_EXIT_CODE)
        except Exception:
            # Let it crash: state after an unexpected exception is suspect; the supervisor
            # restarts the session with its history (restart policy) instead.
            traceback.print_exc()
            self._die(req, p.AGENT_CRASHED, "the agent raised an exception", 1)
        set_title(agent_title(self.session_id, self.tenant, False))
        if answer[0] is p.pack_fail and answer[1] in p.LIVING_FAILURES:
            answer = (*answer, self.state_after_failure())  # what the failed turn changed, at once
        try:
            self.send(answer[0], req, *answer[1:])
        except (TypeError, ValueError, OverflowError) as exc:  # what msgpack cannot pack (e.g. a lone surrogate)
            self.send(p.pack_fail, req, p.AGENT_BAD_REPLY, f"the agent's answer cannot be sent: {exc}")

    def state_after_failure(self) -> dict | None:
        """The agent's snapshot after a turn it lives through failed; None if it cannot give one."""
        try:
            state = self.agent.snapshot() if self.agent is not None else None
        except Exception:  # noqa: BLE001  the turn's own failure is what gets reported
            return None
        return state if p.json_problem(state) is None else None

    def dispatch(self, kind: int, req: int, body):
        """Call the hook for this kind of message; stream chunks as they come."""
        if kind == p.MESSAGE and self.agent is not None:
            result = self.agent.on_message(body)
            if isinstance(result, str):
                return result  # not streamed: DONE carries it, and the supervisor shows it as one chunk
            if inspect.isawaitable(result) or hasattr(result, "__aiter__"):
                return self.run_async(self._reply_async(req, result))
            return self.stream(req, result)
        result = self.call_hook(kind, body)
        return self.run_async(result) if inspect.isawaitable(result) else result

    def call_hook(self, kind: int, body):
        """Call the hook for a message other than a chat message; return what it returned."""
        if kind == p.START:
            history, metadata = p.start_fields(body)
            self.agent = self.agent_cls(self.session_id, self.tenant, metadata)
            return self.agent.on_start(history)
        if self.agent is None:
            raise RuntimeError("message before START")
        if kind == p.SYSTEM:
            return self.agent.on_system(body)
        if kind == p.COMMAND:
            return self.agent.on_command(*p.command_fields(body))
        raise BadRequest(f"unknown message kind {kind}")

    def stream(self, req: int, result) -> str:
        """Send a sync reply's chunks as they come; return the whole reply."""
        chunks = []
        for chunk in iter_reply(result):
            chunks.append(chunk)
            self.send(p.pack_chunk, req, chunk)
        return "".join(chunks)

    async def _reply_async(self, req: int, result) -> str:
        """Await an async ``on_message`` and stream what it gives: a string, or chunks (async or not)."""
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, str):
            return result
        if not hasattr(result, "__aiter__"):
            return self.stream(req, result)
        chunks = []
        try:
            async for chunk in result:
                chunk = str(chunk)
                chunks.append(chunk)
                self.send(p.pack_chunk, req, chunk)
        finally:
            if hasattr(result, "aclose"):
                await result.aclose()  # the agent's clean-up runs now, in this turn, not at some GC
        return "".join(chunks)

    def _make_loop(self) -> None:
        """Make this process's event loop, with a socket the C signal handler writes to to wake it."""
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        reader, self.wakeup = socket.socketpair()
        reader.setblocking(False)
        self.wakeup.setblocking(False)
        self.loop.add_reader(reader.fileno(), _drain, reader)

    def run_async(self, coro):
        """Run a coroutine as this turn's task on the agent's event loop; return its result.

        An interrupt cancels the task (the agent sees CancelledError). While it runs, ``wakeup`` is the
        signal wake-up fd, so a SIGINT landing just before the loop blocks in select still wakes it.
        """
        if self.loop is None:
            self._make_loop()
        task = self.turn_task = self.loop.create_task(coro)
        previous_fd = signal.set_wakeup_fd(self.wakeup.fileno(), warn_on_full_buffer=False)
        try:
            return self.loop.run_until_complete(task)
        finally:
            self.turn_task = None
            self.cancel_pending = False
            signal.set_wakeup_fd(previous_fd)
            if not task.done():
                task.cancel()  # a KeyboardInterrupt escaped the loop between steps: stop the task for good
            elif not task.cancelled():
                task.exception()  # retrieved here (it is re-raised above), so asyncio does not log it

    def _die(self, req: int, code: str, message: str, exit_code: int):
        """Tell the supervisor why, then exit at once."""
        try:
            self.send(p.pack_fail, req, code, message)
            self.sock.close()  # the frame is already in the supervisor's receive queue
        finally:
            sys.stderr.flush()
            os._exit(exit_code)


def _drain(sock: socket.socket) -> None:
    """Empty the signal wake-up socket (waking the loop was its whole job)."""
    try:
        while sock.recv(512):
            pass
    except BlockingIOError:
        pass


def run_agent(agent_cls, *, session_id: str, tenant: str, conn: socket.socket, routing_id: bytes,
              confine=None) -> int:
    """Speak ZMTP on the connection the supervisor gave us at spawn, confine ourselves (the sandbox), and serve."""
    sock = Dealer(conn, routing_id)
    try:
        if confine is not None:
            confine()
        return AgentLoop(agent_cls, sock, session_id=session_id, tenant=tenant).serve()
    finally:
        sock.close()
