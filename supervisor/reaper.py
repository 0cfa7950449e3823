"""Reaping: what a dead process's wait status means, and the timers that end idle or old sessions.

No sweep touches every session: each live session holds at most one idle timer and one age
timer, and an idle timer that fires early (the session was used since) re-arms itself once.
"""

import asyncio
import os
import signal
import time
from collections.abc import Callable

from corral.agent_proc.limits import OOM_EXIT_CODE
from corral.supervisor import states
from corral.supervisor.session import Session


def describe_status(status: int) -> str:
    """Render a raw wait status as words."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by signal {name}"
    if os.WIFEXITED(status):
        return f"exit code {os.WEXITSTATUS(status)}"
    return f"wait status {status}"


def classify_exit(status: int, *, stop_reason: str | None, oom_killed: bool) -> str:
    """The state a session ends in, given how its process died and why (if we asked)."""
    if stop_reason is not None:
        return stop_reason
    if oom_killed or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == OOM_EXIT_CODE):
        return states.OOM
    return states.CRASHED


class Reaper:
    """Idle and max-age timers for live sessions."""

    def __init__(self, *, idle_timeout: float, max_age: float, on_due: Callable[[Session, str], None]):
        self.idle_timeout = idle_timeout
        self.max_age = max_age
        self.on_due = on_due  # called with (session, states.REAPED | states.EXPIRED)

    def arm_idle(self, s: Session) -> None:
        """Make sure an idle timer is pending for a session that just went idle."""
        if "idle" not in s.timers:
            self._schedule_idle(s, s.last_activity + self.idle_timeout)

    def _schedule_idle(self, s: Session, due_monotonic: float) -> None:
        """Schedule the idle check at a monotonic time."""
        loop = asyncio.get_running_loop()
        delay = max(0.0, due_monotonic - time.monotonic())
        s.timers["idle"] = loop.call_later(delay, self._idle_check, s)

    def _idle_check(self, s: Session) -> None:
        """Reap the session if it has really been idle for the whole timeout."""
        s.timers.pop("idle", None)
        if s.state != states.IDLE or s.inflight:
            # Busy, going down, or a request is between admission and its frame (e.g. committing
            # the message): not idle. The next busy -> idle transition re-arms.
            return
        due = s.last_activity + self.idle_timeout
        if due > time.monotonic():
            self._schedule_idle(s, due)
        else:
            self.on_due(s, states.REAPED)

    def arm_age(self, s: Session) -> None:
        """Start the max-age timer of a freshly spawned process (if max_age is set)."""
        if self.max_age > 0:
            loop = asyncio.get_running_loop()
            s.timers["age"] = loop.call_later(self.max_age, self._age_due, s)

    def _age_due(self, s: Session) -> None:
        """The process reached max_age."""
        s.timers.pop("age", None)
        if s.state in (states.IDLE, states.BUSY, states.STARTING):
            self.on_due(s, states.EXPIRED)
