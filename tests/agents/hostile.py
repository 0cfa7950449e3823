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
