"""Deadlines of equal length on one loop timer: each costs two dict operations, not a timer.

Turns all wait at most ``request_timeout``; a loop timer per turn (created, then cancelled when
the reply comes) was a measurable share of a warm turn. Here the timer is armed for the earliest
pending deadline only; a deadline whose turn finished is just forgotten, and when the timer
fires it expires what is due and re-arms for the earliest deadline left. Every deadline fires
on time even if the length changes (a shorter one re-arms the timer).
"""

import asyncio
from collections.abc import Callable, Hashable


class Deadlines:
    """Call ``on_due(key, value)`` for each key still pending ``seconds`` after it was added."""

    def __init__(self, on_due: Callable[[Hashable, object], None]):
        self.on_due = on_due
        self._pending: dict[Hashable, tuple[float, object]] = {}  # key -> (loop-time deadline, value)
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the first add (one loop per owner)

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, key: Hashable, seconds: float, value=None) -> None:
        """Start the deadline of ``key``: ``on_due`` runs in ``seconds`` unless it is discarded first."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()  # once: on Python 3.11 each call is a getpid()
        deadline = self._loop.time() + seconds
        self._pending[key] = (deadline, value)
        if self._timer is None or deadline < self._armed_for:
            self._arm(deadline)

    def discard(self, key: Hashable) -> None:
        """Forget the deadline of ``key`` (if pending); the timer stays for the others."""
        self._pending.pop(key, None)

    def close(self) -> None:
        """Forget every deadline and stop the timer."""
        self._pending.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, deadline: float) -> None:
        """Set the one timer for ``deadline``."""
        if self._timer is not None:
            self._timer.cancel()
        self._armed_for = deadline
        self._timer = self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        """Expire every deadline that is due; re-arm for the earliest one left."""
        self._timer = None
        now = self._loop.time()
        due = [key for key, (deadline, _) in self._pending.items() if deadline <= now]
        try:
            for key in due:
                entry = self._pending.pop(key, None)
                if entry is not None:  # an earlier on_due may have discarded it
                    self.on_due(key, entry[1])
        finally:  # also when an on_due raised: what is left still fires
            if self._pending and self._timer is None:
                self._arm(min(deadline for deadline, _ in self._pending.values()))
