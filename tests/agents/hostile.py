"""Hostile agents: each misbehaves one way an untrusted agent could, to prove the supervisor contains it.

Every class is a demo agent (so ordinary chat still works) plus one weapon, fired by a command or
by its session id, so one supervisor can run a hostile session beside well-behaved ones.
"""

import os
import signal
import socket
import sys
import time

from agent_proc import protocol as p
from agent_proc import zmtp
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


def _current_req() -> int:
    """The request id of the turn being handled (a local of the agent loop's ``handle``)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "handle" and "req" in frame.f_locals:
            return frame.f_locals["req"]
        frame = frame.f_back
    raise RuntimeError("not inside a turn")


def _own_dealer():
    """The agent's own DEALER socket (what a hostile agent can always reach: it is its memory)."""
    return _caller("AgentLoop").sock


class Flooder(DemoAgent):
    """Abuses its own connection to the hub (the only one it has): frames for turns it was never
    given, floods of empty frames, PINGs it never reads the PONGs of, oversize PING context."""

    def cmd_flood(self, args):
        """Send ``frames`` CHUNK frames for turns that do not exist."""
        frames = int(args.get("frames", 100_000))
        sock = _own_dealer()
        payload = "x" * int(args.get("bytes", 64))
        for i in range(frames):
            sock.send(p.pack([p.CHUNK, 10**9 + i, payload]))
        return {"sent": frames}

    def cmd_raw_flood(self, args):
        """Write ``frames`` copies of one raw ZMTP frame, never reading: ``kind`` is empty, chunk (an
        empty CHUNK of this very turn: nothing stray about it), ping or big_ping."""
        kind = args.get("kind", "empty")
        one = {
            "empty": zmtp.frame(b""),
            "chunk": zmtp.frame(p.pack([p.CHUNK, _current_req(), ""])),
            "ping": zmtp.command(b"PING", b"\x00\x10" + b"c" * 16),  # the most context the spec allows
            "big_ping": zmtp.command(b"PING", b"\x00\x10" + b"c" * 65_536),
        }[kind]
        batch = one * max(1, (1 << 20) // len(one))
        sock = _own_dealer().sock
        sent = 0
        while sent < int(args["frames"]):
            sock.sendall(batch)
            sent += len(batch) // len(one)
        return {"sent": sent}

    def cmd_spoof(self, args):
        """Answer request ids ``low`` to ``high`` (another session's turns) on our own connection."""
        sock = _own_dealer()
        for req in range(int(args["low"]), int(args["high"])):
            sock.send(p.pack([p.DONE, req, {"reply": f"spoofed by {self.session_id}", "state": {}}]))
        return {"sent": int(args["high"]) - int(args["low"])}

    def cmd_find_doors(self, args):
        """Try every way in a local process has: the old socket path, and every listening Unix socket."""
        opened = []
        for path in [args["old_socket"], *_listening_unix_paths()]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(path)
                except OSError:
                    continue
                opened.append(path)
        return {"opened": opened}


def _listening_unix_paths() -> list[str]:
    """Paths (and @abstract names) of every listening Unix stream socket on the host."""
    paths = []
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            cols = line.split()
            if len(cols) >= 8 and int(cols[3], 16) & 0x10000:  # __SO_ACCEPTCON: it listens
                paths.append(cols[7].replace("@", "\0", 1) if cols[7].startswith("@") else cols[7])
    return paths


class Unresponsive(DemoAgent):
    """``hang``: ignores SIGINT and SIGTERM and never answers; only SIGKILL ends it."""

    def on_message(self, text):
        """Hang on ``hang``; else the demo reply."""
        if text == "hang":
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _sleep_forever()
        return super().on_message(text)


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
