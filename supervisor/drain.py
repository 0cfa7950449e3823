"""A stopping server's drain: refuse new turns, wait for those in flight, then end what remains.

The shutdown ladder (web/serving.py, docs/operations.md) drives it: ``begin`` on the first signal
(``/health`` reports ``draining`` from then on), ``wait_idle`` for the turns in flight (up to
``--drain-timeout``, or until the next signal), then ``end_turns``: every turn still waiting is
answered 503 ``shutting_down`` at once and its agent interrupted; the caller then stops the sessions.
Nothing here polls: each answered request tells the drain (``turn_over``), which looks only while
someone waits.
"""

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from corral.supervisor import errors


class Drain:
    """Whether the server still takes turns, and the wait for the ones in flight."""

    def __init__(self, sessions: Callable[[], Iterable]):
        """``sessions``: the held sessions (each with ``inflight`` and ``life``)."""
        self._sessions = sessions
        self.draining = False  # no new turn is admitted
        self.ended = False  # the turns left were ended: what still waits on an agent is answered 503
        self.hurried = False  # stop now: sessions are killed, not asked to stop
        self.relays = 0  # requests relayed to their session's owner node and not yet answered
        self._idle: asyncio.Future | None = None
        self._ended: asyncio.Future | None = None

    def begin(self) -> int:
        """Stop admitting turns; return how many are in flight."""
        self.draining = True
        return self.in_flight()

    def in_flight(self) -> int:
        """Requests admitted and not yet answered, over every held session, and those relayed to other nodes."""
        return self.relays + sum(s.inflight for s in self._sessions())

    async def relay(self, answer: Awaitable):
        """Await a relayed request's answer, counted in flight; 503 ``shutting_down`` if the turns are ended first."""
        if self.ended:
            answer.close()
            raise self.error()
        if self._ended is None:
            self._ended = asyncio.get_running_loop().create_future()
        relayed = asyncio.ensure_future(answer)
        self.relays += 1
        try:
            await asyncio.wait({relayed, self._ended}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the request itself was cancelled
            relayed.cancel()
            raise
        finally:
            self.relays -= 1
            self.turn_over()
        if not relayed.done():
            relayed.cancel()
            raise self.error()
        return relayed.result()

    def admit(self) -> None:
        """Refuse a new turn once the server is stopping."""
        if self.draining:
            raise errors.ShuttingDown("the server is shutting down; try again shortly (another node may serve it)")

    def turn_over(self) -> None:
        """A request was answered: wake the drain's waiter when that was the last one."""
        if self._idle is not None and not self._idle.done() and self.in_flight() == 0:
            self._idle.set_result(None)

    async def wait_idle(self) -> None:
        """Return once no turn is in flight (cancel it to stop waiting)."""
        if self.in_flight() == 0:
            return
        self._idle = asyncio.get_running_loop().create_future()
        try:
            await self._idle
        finally:
            self._idle = None

    def end_turns(self) -> int:
        """Answer every turn still waiting with 503 ``shutting_down`` and interrupt its agent; return how many."""
        self.draining = self.ended = True
        ended = self.relays
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)  # the relays still waiting answer 503
        for s in list(self._sessions()):
            waiting = s.life.turns.waiting()
            if waiting:
                s.life.interrupt()
            for turn in waiting:
                turn.future.set_exception(self.error())
                ended += 1
        return ended

    @staticmethod
    def error() -> errors.ShuttingDown:
        """What a turn cut short by the shutdown answers."""
        return errors.ShuttingDown("the server shut down during this turn; the message is stored, send it again "
                                   "to continue")
