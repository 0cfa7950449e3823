"""An agent whose results JSON cannot carry: bytes, a set, an object, NaN, a huge integer, a lone surrogate.

It is the demo agent plus the command ``odd {"kind": ...}``; ``odd {"kind": "state"}`` makes its
snapshot hold bytes until ``odd {"kind": "fix"}``. A raw agent (``RawOdd``) sends such a result past
the agent-side check, as any ZeroMQ peer could.
"""

import sys

from corral.agent_proc import protocol as p
from corral.agent_proc.demo import DemoAgent


class Opaque:
    """An object of the agent's own class."""


ODD = {
    "bytes": lambda: b"\x00\xffraw",
    "set": lambda: {1, 2, 3},
    "object": Opaque,
    "nan": lambda: float("nan"),
    "nested": lambda: {"fine": [1, "two", {"deep": b"bytes"}]},
    "tuple-key": lambda: {(1, 2): "pair"},
    "huge": lambda: 2**80,
    "surrogate": lambda: "half \ud800 a pair",
}


class OddAgent(DemoAgent):
    """The demo agent, answering ``odd`` with a result JSON cannot carry."""

    bad_state = False

    def on_command(self, command, args):
        """``odd {"kind"}``: the odd value; ``state`` / ``fix`` break and mend the snapshot."""
        if command != "odd":
            return super().on_command(command, args)
        kind = args["kind"]
        if kind in ("state", "fix"):
            self.bad_state = kind == "state"
            return "done"
        return ODD[kind]()

    def snapshot(self) -> dict:
        """The demo's state, plus bytes while the snapshot is broken."""
        state = super().snapshot()
        return {**state, "blob": b"\x01"} if self.bad_state else state


class RawOdd(OddAgent):
    """Sends bytes straight past the agent-side check, as a hand-written agent could."""

    def on_command(self, command, args):
        """``raw``: a DONE frame with bytes in it, sent by hand; then answer normally."""
        if command != "raw":
            return super().on_command(command, args)
        loop, req = _turn_in_progress()
        loop.sock.send(p.pack_done(req, b"sneaked", {}))
        return "sent twice"  # this second answer to the turn is a stray frame the supervisor drops


def _turn_in_progress():
    """The AgentLoop running this agent and the request id it is handling (up the stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "handle" and type(frame.f_locals.get("self")).__name__ == "AgentLoop":
            return frame.f_locals["self"], frame.f_locals["req"]
        frame = frame.f_back
    raise RuntimeError("no AgentLoop.handle up the stack")
