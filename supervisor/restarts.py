"""The restart policy (OTP "transient"): respawn after a crash, within a budget per time window."""

import time

from corral.supervisor.session import Session


class RestartPolicy:
    """At most ``max_restarts`` respawns after crashes within ``window`` seconds."""

    def __init__(self, max_restarts: int, window: float):
        self.max_restarts = max_restarts
        self.window = window

    def _prune(self, s: Session, now: float) -> None:
        """Forget restarts older than the window."""
        while s.restarts and s.restarts[0] <= now - self.window:
            s.restarts.popleft()

    def retry_after(self, s: Session) -> float:
        """0 if the session may restart now, else seconds until the window lets it."""
        now = time.monotonic()
        self._prune(s, now)
        if len(s.restarts) < self.max_restarts:
            return 0.0
        if not s.restarts:  # max_restarts = 0: no respawns; the session is forgotten a window after its crash
            return self.window
        return max(0.001, s.restarts[0] + self.window - now)

    def record(self, s: Session) -> None:
        """Count one respawn after a crash."""
        s.restarts.append(time.monotonic())
