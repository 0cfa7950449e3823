"""Retention: ended sessions are deleted from the store once ``retention`` seconds have passed.

One timer for the whole server (every quarter of the retention period, between 1 s and an hour);
each pass is one statement in the store, run in the registry's background tasks.
"""

import asyncio

from corral.supervisor.logs import get_logger
from corral.supervisor.store_errors import store_call

log = get_logger(component="supervisor")


class Retention:
    """Deletes ended sessions past the retention period, on one timer."""

    def __init__(self, retention: float, *, store, events, background):
        """``store()``: the store once it is open; ``events``: where a pass that deleted something is told."""
        self.retention = retention
        self.store = store
        self.events = events
        self.background = background
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Arm the timer of the next pass."""
        interval = max(1.0, min(3600.0, self.retention / 4))
        self._timer = asyncio.get_running_loop().call_later(interval, self._due)

    def stop(self) -> None:
        """No more passes."""
        if self._timer is not None:
            self._timer.cancel()

    def _due(self) -> None:
        """Run one pass in the background and arm the next."""
        self.background.spawn(self.purge_ended())
        self.start()

    async def purge_ended(self) -> int:
        """Delete sessions that ended more than ``retention`` seconds ago; how many."""
        removed = await store_call(self.store().purge_ended(self.retention))
        if removed:
            log.info("retention_purged", sessions=removed)
            self.events.publish_global("purged", sessions=removed, retention=self.retention)
        return removed
