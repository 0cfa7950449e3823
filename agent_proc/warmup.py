"""A rehearsal of an agent's life, run once in the zygote before it forks any agent.

CPython 3.11 rewrites a function's bytecode the first times it runs (quickening, inline caches),
and the objects a first run makes and frees land wherever the allocator has room. Run first in
each forked agent, corral's own path (the ZMTP handshake, the mailbox loop, the protocol) would
copy those pages into every agent; rehearsed here, they are written once and shared. It is the
same path an agent takes, over a socketpair, with a stand-in agent: the user's agent class is not
instantiated (its hooks may have side effects) and nothing reaches the supervisor.
"""

import signal
import socket

from setproctitle import getproctitle

from corral.agent_proc import environment
from corral.agent_proc import protocol as p
from corral.agent_proc import zmtp
from corral.agent_proc.agent import Agent
from corral.agent_proc.dealer import Dealer
from corral.agent_proc.main import AgentLoop
from corral.agent_proc.process import set_title
from corral.agent_proc.sandbox import use_private_tmpdir

REHEARSALS = 10  # CPython 3.11 quickens a function on its 8th call; its inline caches settle after


class StandIn(Agent):
    """An agent that answers everything at once, without side effects."""

    def on_message(self, text: str):
        """Two chunks, so the streaming path runs too."""
        return iter((text, "."))

    def on_command(self, command: str, args):
        """Echo the arguments."""
        return args


def rehearse(times: int = REHEARSALS, *, tmpdir: str | None = None) -> None:
    """Run the agent path ``times`` over a socketpair, then put back what it changed in this process.

    ``tmpdir``: the zygote's TMPDIR, set again each time as every sandboxed agent sets its own.
    """
    sigint, title = signal.getsignal(signal.SIGINT), getproctitle()
    try:
        for _ in range(times):
            if tmpdir:
                environment.enter({}, tmpdir)  # TMPDIR and HOME, as each agent sets its own
                use_private_tmpdir(tmpdir)
            _one_life()
    finally:
        signal.signal(signal.SIGINT, sigint)  # AgentLoop.serve installs its own
        set_title(title)  # and sets the agent's


def _one_life() -> None:
    """Greet, start, chat, command, shut down: every frame kind an idle agent has seen."""
    agent_end, hub_end = socket.socketpair()
    with agent_end, hub_end:
        hub_end.sendall(zmtp.GREETING + zmtp.ready(b"ROUTER") + b"".join(zmtp.frame(frame) for frame in (
            p.pack_request(p.START, 1, p.start_body([{"role": "user", "content": "hi"}], {})),
            p.pack_request(p.MESSAGE, 2, "hello"),
            p.pack_request(p.COMMAND, 3, p.command_body("echo", {"a": 1})),
            p.pack_shutdown(),
        )))
        dealer = Dealer(agent_end, b"rehearsal")
        AgentLoop(StandIn, dealer, session_id="rehearsal", tenant="-").serve()
