"""The zygote: imports the agent code once, then forks one warm child per session.

It runs in its own process (started by the supervisor with ``multiprocess``), talks to the
supervisor over a pipe, and reports every child's pid and exit status. Each spawn request comes
with the child's connection to the hub: one end of a socket pair, passed over a second socket
with SCM_RIGHTS, so the child is connected from birth and the hub needs no listening socket.
Forking from here costs milliseconds where a fresh interpreter costs tens of them, and children
share its pages.
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


def send_msg(conn, msg) -> None:
    """Send one message on the supervisor <-> zygote pipe.

    Plain pickle over ``send_bytes``: ``Connection.send`` pickles with dill under ``multiprocess``,
    about 100 µs a message against 3 µs, paid on each side of every spawn and every exit.
    """
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def recv_msg(conn):
    """Receive one message sent with ``send_msg``."""
    return pickle.loads(conn.recv_bytes())


def zygote_main(conn, fd_channel: socket.socket, agent_spec: str, supervisor_pid: int) -> None:
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
    Zygote(conn, fd_channel, agent_cls).serve()


class Zygote:
    """Forks children on request and reports their deaths."""

    def __init__(self, conn, fd_channel: socket.socket, agent_cls):
        self.conn = conn
        self.fd_channel = fd_channel  # the supervisor sends each child's hub connection here, before its request
        self.agent_cls = agent_cls
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
        """Fork one agent process with its hub connection and report its pid."""
        try:
            # Sent before the request, so this never waits. Close-on-exec: a program the agent runs
            # does not inherit its connection.
            _, fds, _, _ = socket.recv_fds(self.fd_channel, 1, 1, socket.MSG_CMSG_CLOEXEC)
            if len(fds) != 1:
                raise OSError(f"expected one connection, got {len(fds)} descriptors")
        except OSError as exc:
            send_msg(self.conn, ("spawn_failed", req["spawn_id"], f"no hub connection: {exc}"))
            return
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(fds[0])
            send_msg(self.conn, ("spawn_failed", req["spawn_id"], f"fork failed: {exc}"))
            return
        if pid == 0:
            self._become_agent(req, fds[0])  # never returns
        os.close(fds[0])  # the child's now: the hub sees EOF when the child's side closes
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

    def _become_agent(self, req: dict, conn_fd: int) -> None:
        """In the forked child: isolate, limit, and run the agent; always exits."""
        code = 1
        try:
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
            self.fd_channel.close()
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash test must not litter cores
            apply_limits(req["limits"])
            set_title(agent_title(req["session_id"], req["tenant"], False))
            from agent_proc.main import run_agent

            code = run_agent(
                self.agent_cls,
                session_id=req["session_id"],
                routing_id=req.get("routing_id") or req["session_id"].encode(),
                tenant=req["tenant"],
                conn=socket.socket(fileno=conn_fd),
            )
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
