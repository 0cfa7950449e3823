"""The zygote: imports the agent code once, then forks one warm child per session.

It runs in its own process (started by the supervisor with ``multiprocess``), talks to the
supervisor over a pipe, and reports every child's pid and exit status. Forking from here costs
milliseconds where a fresh interpreter costs tens of them, and children share its pages.
"""

import gc
import os
import pickle
import resource
import selectors
import signal
import socket
import sys
import traceback

from agent_proc.limits import apply_limits
from agent_proc.process import agent_title, die_with_parent, load_agent_class, set_title
from agent_proc.stdio import attach_stdio


def send_msg(conn, msg) -> None:
    """Send one message on the supervisor <-> zygote pipe.

    Plain pickle over ``send_bytes``: ``Connection.send`` pickles with dill under ``multiprocess``,
    about 100 µs a message against 3 µs, paid on each side of every spawn and every exit.
    """
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def recv_msg(conn):
    """Receive one message sent with ``send_msg``."""
    return pickle.loads(conn.recv_bytes())


def zygote_main(conn, agent_spec: str, endpoint: str, supervisor_pid: int) -> None:
    """Entry point of the zygote process."""
    set_title(f"corral: zygote agent={agent_spec}")
    die_with_parent(supervisor_pid)
    # Ctrl-C and a group-wide SIGTERM reach us too; the supervisor decides when we go (and if it
    # dies, the death signal takes us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        agent_cls = load_agent_class(agent_spec)
        import agent_proc.main  # noqa: F401  pre-import what every child needs
    except Exception as exc:
        send_msg(conn, ("failed", f"cannot load agent {agent_spec}: {exc!r}"))
        return
    gc.freeze()  # keep the imported objects out of GC passes so children don't copy their pages
    Zygote(conn, agent_cls, endpoint).serve()


class Zygote:
    """Forks children on request and reports their deaths."""

    def __init__(self, conn, agent_cls, endpoint: str):
        self.conn = conn
        self.agent_cls = agent_cls
        self.endpoint = endpoint
        self.children: set[int] = set()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector = selectors.DefaultSelector()

    def serve(self) -> None:
        """Wait for spawn requests and SIGCHLD; return when the supervisor says quit or goes away."""
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd does the work
        self.selector.register(self.conn.fileno(), selectors.EVENT_READ, "conn")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "signal")
        send_msg(self.conn, ("ready", os.getpid()))
        while True:
            for key, _ in self.selector.select():
                if key.data == "signal":
                    self._drain_wakeups()
                    self.reap()
                elif not self.handle_request():
                    return

    def _drain_wakeups(self) -> None:
        """Empty the signal wakeup pipe."""
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def handle_request(self) -> bool:
        """Serve one request from the supervisor; False means stop."""
        try:
            msg = recv_msg(self.conn)
        except (EOFError, OSError):
            return False  # the supervisor is gone; our children's death signal takes them too
        if msg[0] == "spawn":
            self.spawn(msg[1])
            return True
        return msg[0] != "quit"

    def spawn(self, req: dict) -> None:
        """Fork one agent process and report its pid."""
        stdio = self._recv_stdio() if req.get("stdio") else ()
        try:
            pid = os.fork()
        except OSError as exc:
            send_msg(self.conn, ("spawn_failed", req["spawn_id"], f"fork failed: {exc}"))
            pid = None
        if pid == 0:
            self._become_agent(req, stdio)  # never returns
        for fd in stdio:
            os.close(fd)  # the child's now: the supervisor sees EOF when the child's side closes
        if pid is None:
            return
        self.children.add(pid)
        send_msg(self.conn, ("spawned", req["spawn_id"], pid))

    def reap(self) -> None:
        """Collect every exited child, kill what it left in its process group, report its status."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            # The zombie still holds its pid, so the group id cannot have been reused yet:
            # whatever the agent forked dies with it, and nobody else is hit.
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _, status = os.waitpid(pid, 0)
            self.children.discard(pid)
            send_msg(self.conn, ("exited", pid, status))

    def _recv_stdio(self) -> tuple[int, ...]:
        """The write ends of the child's stdout and stderr pipes, sent right after its spawn request."""
        with socket.socket(fileno=os.dup(self.conn.fileno())) as sock:
            _, fds, _, _ = socket.recv_fds(sock, 1, 2)
        return tuple(fds)

    def _become_agent(self, req: dict, stdio: tuple[int, ...]) -> None:
        """In the forked child: isolate, limit, and run the agent; always exits."""
        code = 1
        try:
            if stdio:
                attach_stdio(*stdio)  # first, so everything after it is captured
            zygote_pid = os.getppid()
            os.setpgid(0, 0)  # own process group, so a stop or interrupt reaches the agent's children too
            die_with_parent(zygote_pid)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self.selector.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            self.conn.close()
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash test must not litter cores
            apply_limits(req["limits"])
            set_title(agent_title(req["session_id"], req["tenant"], False))
            from agent_proc.main import run_agent

            code = run_agent(
                self.agent_cls,
                session_id=req["session_id"],
                routing_id=req.get("routing_id") or req["session_id"].encode(),
                tenant=req["tenant"],
                token=req["token"],
                endpoint=self.endpoint,
            )
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
