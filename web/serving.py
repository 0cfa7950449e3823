"""Serving the app until signalled, and the shutdown ladder (docs/operations.md).

As in gunicorn's arbiter, the signal handlers only enqueue; ``Ladder.run`` is the one place that acts
on them, whatever arrives in whatever order:

- the first SIGINT/SIGTERM drains: no new turn is admitted (503 ``shutting_down``), ``/health``
  answers ``draining``, the turns in flight have ``--drain-timeout`` to finish; then the turns left
  are interrupted and their callers answered 503 ``shutting_down``, the sessions stopped (each on
  its stop ladder), the store closed, every process gone;
- a further signal cuts that short: the drain ends at once, and every agent is SIGKILLed rather
  than asked to stop (done within 2 s; past ``GIVE_UP_AFTER`` what still hangs is abandoned);
- a signal during start-up abandons the start: what was started is stopped the hurried way.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from typing import TYPE_CHECKING

from corral.supervisor.logs import get_logger

if TYPE_CHECKING:  # aiohttp is imported when serving starts: the ladder is installed before it loads
    from aiohttp import web

log = get_logger(component="shutdown")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How long the server's HTTP connections get to finish once the turns were answered (an open
# stream is ended at shutdown anyway).
CONNECTIONS_GRACE = 1.0
# A hurried stop still waiting after this long gives up on what hangs (leftover children are killed).
GIVE_UP_AFTER = 5.0


class Ladder:
    """Queued stop signals and the one coroutine that answers them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        """Install the handlers now (before start-up): a signal during it is queued like any other."""
        self.loop = loop
        self.signals: asyncio.Queue = asyncio.Queue()
        self.received = 0
        self._next: asyncio.Future | None = None
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.signals.put_nowait, sig)

    def next_signal(self) -> asyncio.Future:
        """The wait for the next signal: the same one until ``take`` consumed what it got (none is lost)."""
        if self._next is None:
            self._next = asyncio.ensure_future(self.signals.get())
        return self._next

    def take(self) -> str:
        """Consume the signal that arrived; its name."""
        self.received += 1
        got, self._next = self._next, None
        return signal.Signals(got.result()).name

    def uninstall(self) -> None:
        """Remove the handlers; a signal from now to the exit is ignored (nothing is left to stop)."""
        if self._next is not None:
            self._next.cancel()
        for sig in STOP_SIGNALS:
            self.loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)

    async def run(self, runner: web.AppRunner, sockets: list[socket.socket], supervisor=None) -> None:
        """Start the app, serve until a signal, then walk the ladder down to nothing."""
        started = asyncio.ensure_future(_start(runner, sockets))
        try:
            await asyncio.wait({started, self.next_signal()}, return_when=asyncio.FIRST_COMPLETED)
            if not started.done():
                log.warning("stopping during start-up", signal=self.take())
                started.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await started
                return
            started.result()  # a start-up error goes to the caller (after the cleanup below)
            await self.next_signal()
            sig = self.take()
            if supervisor is not None:
                await self._drain(supervisor, sig)
        except BaseException:
            if not started.done():
                started.cancel()
            raise
        finally:
            await self._stop(runner, supervisor, hurried=self.received > 1 or not started.done() or started.cancelled())

    async def _drain(self, supervisor, sig: str) -> None:
        """Stop admitting turns and wait for those in flight (up to the drain timeout, or the next signal)."""
        drain = supervisor.drain
        timeout = supervisor.config.drain_timeout
        in_flight = drain.begin()
        log.warning(f"draining: {in_flight} turns in flight (up to --drain-timeout {timeout:g} s; "
                    "signal again to stop now)", signal=sig, turns=in_flight, drain_timeout=timeout)
        idle = asyncio.ensure_future(drain.wait_idle())
        nxt = self.next_signal()
        began = time.monotonic()
        done, _ = await asyncio.wait({idle, nxt}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        if nxt in done:
            log.warning("stopping now", signal=self.take())
        elif idle in done:
            log.info("drained", seconds=round(time.monotonic() - began, 3))
        else:
            log.warning("drain_timeout", turns=drain.in_flight(), drain_timeout=timeout)

    async def _stop(self, runner: web.AppRunner, supervisor, *, hurried: bool) -> None:
        """End the turns left, then stop the server (connections, sessions, store, processes).

        ``hurried`` (a further signal, or one during start-up): agents are SIGKILLed, not asked to stop.
        """
        if supervisor is not None:
            if hurried:
                supervisor.hurry()
            ended = supervisor.drain.end_turns()
            if ended:
                log.warning("turns_ended", turns=ended, code="shutting_down")
        loop = asyncio.get_running_loop()
        overdue = loop.time() + GIVE_UP_AFTER if hurried else None
        stopping = asyncio.ensure_future(runner.cleanup())
        while True:
            nxt = self.next_signal()
            timeout = None if overdue is None else max(0.0, overdue - loop.time())
            done, _ = await asyncio.wait({stopping, nxt}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if stopping in done:
                break
            if not done:  # a part that hangs (a store that does not answer its close): exit all the same
                log.error("stop_overdue", seconds=GIVE_UP_AFTER)
                stopping.cancel()
                return
            log.warning("stopping now", signal=self.take())
            overdue = overdue or loop.time() + GIVE_UP_AFTER
            if supervisor is not None:
                supervisor.hurry()
        stopping.result()


async def _start(runner: web.AppRunner, sockets: list[socket.socket]) -> None:
    """Start the app (the supervisor with it), then accept on the listening sockets."""
    from aiohttp import web

    await runner.setup()
    for sock in sockets:
        await web.SockSite(runner, sock).start()


def serve(app: web.Application, sockets: list[socket.socket], loop: asyncio.AbstractEventLoop, *,
          ladder: Ladder | None = None, supervisor=None) -> None:
    """Serve ``app`` on ``sockets`` until the ladder has stopped it (``supervisor``: the one to drain, if any)."""
    from aiohttp import web

    ladder = ladder or Ladder(loop)
    # keep-alive as web.run_app set it before (the handler's own default is an hour)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=CONNECTIONS_GRACE,
                           keepalive_timeout=75.0)
    try:
        loop.run_until_complete(ladder.run(runner, sockets, supervisor))
    finally:
        ladder.uninstall()
        _close_loop(loop)


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left on the loop, finish async generators, close it."""
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()
