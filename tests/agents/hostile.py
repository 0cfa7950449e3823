"""Hostile agents: each misbehaves one way an untrusted agent could, to prove the supervisor contains it.

Every class is a demo agent (so ordinary chat still works) plus one weapon, fired by a command or
by its session id, so one supervisor can run a hostile session beside well-behaved ones.
"""

import os
import signal
import socket
import sys
import time

import zmq

from agent_proc import protocol as p
from agent_proc.demo import DemoAgent


def _caller(type_name: str):
    """The ``self`` of the nearest calling frame whose object is a ``type_name`` (the agent's own loop)."""
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if type(obj).__name__ == type_name:
            return obj
        frame = frame.f_back
    raise RuntimeError(f"no {type_name} up the stack")


def _own_dealer():
    """The agent's own DEALER socket (what a hostile agent can always reach: it is its memory)."""
    return _caller("AgentLoop").sock


def _token() -> bytes:
    """The agent's own spawn token."""
    return _caller("AgentLoop").token


def _endpoint() -> str:
    """The supervisor's ROUTER endpoint, as the zygote gave it to this process."""
    return _caller("Zygote").endpoint


class Flooder(DemoAgent):
    """``flood``: sends frames as fast as it can, signed and unsigned, for the bytes and time asked."""

    def cmd_flood(self, args):
        """Send ``frames`` CHUNK frames for a turn that does not exist, half with a forged token."""
        frames = int(args.get("frames", 100_000))
        sock = _own_dealer()
        forged = b"\0" * 16
        payload = "x" * int(args.get("bytes", 64))
        sent = 0
        for i in range(frames):
            token = forged if i % 2 else _token()
            sock.send(p.pack([p.CHUNK, token, 10**9 + i, payload]))
            sent += 1
        return {"sent": sent}


class Squatter(DemoAgent):
    """``squat``: connects a DEALER under a session id nobody uses yet, and keeps it connected."""

    def cmd_squat(self, args):
        """Hold the victim's routing id before the victim exists."""
        ctx = zmq.Context.instance()
        squat = ctx.socket(zmq.DEALER)
        squat.setsockopt(zmq.ROUTING_ID, str(args["victim"]).encode())
        squat.connect(_endpoint())
        squat.send(p.pack([p.READY, _token(), 0, {"pid": os.getpid()}]))  # and claim to be it
        self._squats = getattr(self, "_squats", []) + [squat]
        return {"squatting": args["victim"]}


class Spoofer(Squatter):
    """``spoof``: speaks in another session's name, with that session's routing id and a wrong token."""

    def cmd_spoof(self, args):
        """Connect a second DEALER as the victim and answer every plausible request id of it."""
        victim = str(args["victim"])
        low, high = int(args.get("low", 0)), int(args.get("high", 2000))
        ctx = zmq.Context.instance()
        fake = ctx.socket(zmq.DEALER)
        fake.setsockopt(zmq.ROUTING_ID, victim.encode())
        fake.setsockopt(zmq.LINGER, 2000)
        fake.connect(_endpoint())
        guesses = [_token(), b"\0" * 16, os.urandom(16)]  # ours, zeros, random: none is the victim's
        sent = 0
        for req in range(low, high):
            for token in guesses:
                fake.send(p.pack([p.DONE, token, req, {"reply": f"spoofed by {self.session_id}", "state": {}}]))
                sent += 1
        # Also under our own routing id with a forged token.
        own = _own_dealer()
        for req in range(low, high):
            own.send(p.pack([p.DONE, b"\1" * 16, req, {"reply": "forged", "state": {}}]))
            sent += 1
        fake.close(linger=2000)
        return {"sent": sent}


class Forker(DemoAgent):
    """``fork``: leaves children behind: one in its process group, one that escapes it with setsid."""

    def cmd_fork(self, args):
        """Fork ``n`` sleepers (the last one calls setsid) and a grandchild; return every pid."""
        n = int(args.get("n", 2))
        pids = []
        for i in range(n):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                if i == n - 1 and args.get("escape", True):
                    os.setsid()  # out of the agent's process group: only a cgroup can still find it
                grandchild = os.fork()
                if grandchild == 0:
                    os.close(w)
                    _sleep_forever()
                os.write(w, f"{grandchild}\n".encode())
                os.close(w)
                _sleep_forever()
            os.close(w)
            with os.fdopen(r) as f:
                pids += [pid, int(f.readline())]
        return {"pids": pids}


class StubbornAgent(DemoAgent):
    """Ignores SIGTERM and hangs on shutdown: only SIGKILL at stop_timeout ends it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def on_stop(self):
        """Never return."""
        _sleep_forever()


class StormAgent(DemoAgent):
    """Dies on every start when its session id starts with ``storm``; the others are demo agents."""

    def on_start(self, history):
        """Exit at once for storm sessions."""
        if self.session_id.startswith("storm"):
            os._exit(7)
        super().on_start(history)


class SlowAgent(DemoAgent):
    """``slow <seconds> <socket path>``: signals the test that the turn began, then takes its time."""

    def on_message(self, text):
        """Sleep for slow messages (after a datagram to the test's socket); else the demo reply."""
        if text.startswith("slow "):
            _, seconds, path = text.split(" ", 2)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(self.session_id.encode(), path)
            time.sleep(float(seconds))
            return f"slept {seconds} in {self.session_id}"
        return super().on_message(text)


def _sleep_forever():
    """Block until killed."""
    while True:
        time.sleep(3600)


class Escaper(DemoAgent):
    """``attack``: tries one way out of its sandbox; answers {"escaped": bool, "detail": ...}.

    Every attack is what an agent taken over by a prompt injection would try. The test asserts
    each fails (``escaped`` False) and that ``tmp`` (its own temp dir) works, so the denials are real.
    """

    def cmd_attack(self, args):
        """Run the attack named ``args["what"]``."""
        what = args["what"]
        try:
            detail = getattr(self, "_" + what)(args)
        except (OSError, ValueError) as exc:  # setrlimit says EPERM as ValueError
            return {"escaped": False, "detail": f"{type(exc).__name__}: {exc}"}
        return {"escaped": True, "detail": detail}

    def _read(self, args):
        """Read a file (a data dir, the tenants file, /proc/1/environ ...)."""
        with open(args["path"], "rb") as f:
            return f.read(64).decode("latin-1")

    def _list(self, args):
        """List a directory."""
        return os.listdir(args["path"])

    def _write(self, args):
        """Create a file."""
        with open(args["path"], "w") as f:
            f.write("owned")
        return args["path"]

    def _tmp(self, args):
        """Write and read back a file in TMPDIR (must work: the control)."""
        import tempfile

        with tempfile.NamedTemporaryFile(dir=os.environ["TMPDIR"]) as f:
            f.write(b"mine")
            f.flush()
            return {"tmpdir": os.environ["TMPDIR"], "name": f.name}

    def _proc_fds(self, args):
        """Open the supervisor's database through /proc/<pid>/fd."""
        fd_dir = f"/proc/{args['pid']}/fd"
        for name in os.listdir(fd_dir):
            target = os.readlink(os.path.join(fd_dir, name))
            if target.endswith(".sqlite3"):
                with open(os.path.join(fd_dir, name), "rb") as f:
                    return f.read(16).decode("latin-1")
        return "listed the fds, found no database"

    def _rlimit(self, args):
        """Raise the open-files hard limit back up."""
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard * 4, hard * 4))
        return resource.getrlimit(resource.RLIMIT_NOFILE)

    def _kill(self, args):
        """SIGKILL a process outside the session."""
        os.kill(int(args["pid"]), signal.SIGKILL)
        return f"killed {args['pid']}"

    def _ptrace(self, args):
        """PTRACE_ATTACH a process outside the session (the zygote)."""
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(16, int(args["pid"]), None, None) != 0:  # PTRACE_ATTACH
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return f"attached to {args['pid']}"

    def _syscall(self, args):
        """Call a raw syscall the agent never needs (mount, keyctl, bpf, unshare ...)."""
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(int(args["nr"]), *[ctypes.c_long(a) for a in args.get("args", [])]) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return f"syscall {args['nr']} succeeded"

    def _connect_unix(self, args):
        """Connect to a corral socket (the hub's)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(args["path"])
        return f"connected to {args['path']}"

    def _tcp(self, args):
        """Connect out over TCP."""
        with socket.create_connection(("127.0.0.1", int(args["port"])), timeout=5):
            return "connected"

    def _udp(self, args):
        """Open a UDP socket."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"x", ("127.0.0.1", int(args["port"])))
        return "sent"

    def _fork_bomb(self, args):
        """Fork sleepers until fork fails; return how many were made (they live until the session ends)."""
        made = 0
        for _ in range(int(args.get("most", 1000))):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(3600)
                os._exit(0)
            made += 1
        return {"forked": made}

    def _escape_tree(self, args):
        """setsid + double fork: a grandchild that no longer belongs to the agent's process group."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.setsid()
            if os.fork() == 0:
                os.write(write_end, b"x")
                time.sleep(3600)
            os._exit(0)
        os.waitpid(pid, 0)
        os.read(read_end, 1)  # the grandchild is running
        return {"escaped_to_new_session": True}
