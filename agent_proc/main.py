"""An agent process's main loop: one mailbox, one message at a time (actor semantics).

Blocks on receive with no timeout while idle, so an idle agent costs no CPU. SIGINT interrupts
the turn in progress only; one that lands between turns is ignored.
"""

import os
import signal
import socket
import sys
import traceback

from agent_proc import protocol as p
from agent_proc.dealer import Dealer
from agent_proc.agent import BadRequest, UnknownCommand, iter_reply
from agent_proc.limits import OOM_EXIT_CODE
from agent_proc.process import agent_title, set_title


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

    def send(self, kind: int, req: int, body) -> None:
        """Send one frame to the supervisor.

        The frame goes out whole even if the turn is interrupted meanwhile: a stream socket cut
        mid-frame would garble every frame after it. The interrupt is raised once it is sent.
        """
        self.sending = True
        try:
            self.sock.send(p.pack([kind, req, body]))
        finally:
            self.sending = False
        if self.interrupt_pending:
            self.interrupt_pending = False
            raise KeyboardInterrupt

    def serve(self) -> int:
        """Receive and handle messages until told to shut down; return the exit code."""
        signal.signal(signal.SIGINT, self._on_sigint)
        self.send(p.READY, 0, {"pid": os.getpid()})
        while True:
            try:
                frame = p.unpack(self.sock.recv())
                kind, req, body = frame[0], frame[1], frame[2]
            except EOFError:
                return 0  # the supervisor closed our connection: it is shutting down
            except KeyboardInterrupt:
                continue  # an interrupt that arrived after its turn ended
            except (ValueError, IndexError) as exc:  # zmtp.ProtocolError is a ValueError
                # Only the supervisor writes here, so this is a bug on its side; after a broken frame
                # the stream cannot be trusted, and waiting on it would hang the session: exit now.
                print(f"corral agent {self.session_id}: protocol error on its connection: {exc}", file=sys.stderr)
                return p.PROTOCOL_ERROR_EXIT_CODE
            if kind == p.SHUTDOWN:
                if self.agent is not None:
                    self.agent.on_stop()
                return 0
            self.handle(kind, req, body, frame[3] if len(frame) > 3 else 0)

    def _on_sigint(self, signum, frame):
        """Interrupt the turn in progress; between turns, remember it for the next one."""
        self.sigints += 1
        if self.busy and self.sigints > self.sigints_used:  # not a late one sent before this turn
            self.busy = False  # one interrupt per turn: a second SIGINT must not escape ``handle``
            self.sigints_used = self.sigints
            if self.sending:
                self.interrupt_pending = True
                return
            raise KeyboardInterrupt

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
            answer = p.DONE, {"reply": result, "state": state}
        except KeyboardInterrupt:
            answer = p.FAIL, {"code": p.INTERRUPTED, "message": "the turn was interrupted"}
        except UnknownCommand as exc:
            answer = p.FAIL, {"code": p.UNKNOWN_COMMAND, "message": f"unknown command: {exc}"}
        except BadRequest as exc:
            answer = p.FAIL, {"code": p.BAD_REQUEST, "message": str(exc)}
        except MemoryError:
            self._die(req, p.AGENT_OOM, "the agent ran out of memory", OOM_EXIT_CODE)
        except Exception:
            # Let it crash: state after an unexpected exception is suspect; the supervisor
            # restarts the session with its history (restart policy) instead.
            traceback.print_exc()
            self._die(req, p.AGENT_CRASHED, "the agent raised an exception", 1)
        set_title(agent_title(self.session_id, self.tenant, False))
        self.send(answer[0], req, answer[1])

    def dispatch(self, kind: int, req: int, body):
        """Call the hook for this kind of message; stream chunks as they come."""
        if kind == p.START:
            body = body or {}
            self.agent = self.agent_cls(self.session_id, self.tenant, body.get("metadata") or {})
            self.agent.on_start(body.get("history") or [])
            return None
        if self.agent is None:
            raise RuntimeError("message before START")
        if kind == p.MESSAGE:
            result = self.agent.on_message(body)
            if isinstance(result, str):
                return result  # not streamed: DONE carries it, and the supervisor shows it as one chunk
            chunks = []
            for chunk in iter_reply(result):
                chunks.append(chunk)
                self.send(p.CHUNK, req, chunk)
            return "".join(chunks)
        if kind == p.SYSTEM:
            return self.agent.on_system(body)
        if kind == p.COMMAND:
            body = body if isinstance(body, dict) else {}
            return self.agent.on_command(str(body.get("command", "")), body.get("args"))
        raise BadRequest(f"unknown message kind {kind}")

    def _die(self, req: int, code: str, message: str, exit_code: int):
        """Tell the supervisor why, then exit at once."""
        try:
            self.send(p.FAIL, req, {"code": code, "message": message})
            self.sock.close()  # the frame is already in the supervisor's receive queue
        finally:
            sys.stderr.flush()
            os._exit(exit_code)


def run_agent(agent_cls, *, session_id: str, tenant: str, conn: socket.socket, routing_id: bytes) -> int:
    """Speak ZMTP on the connection the supervisor gave us at spawn and serve; return the exit code."""
    sock = Dealer(conn, routing_id)
    try:
        return AgentLoop(agent_cls, sock, session_id=session_id, tenant=tenant).serve()
    finally:
        sock.close()
