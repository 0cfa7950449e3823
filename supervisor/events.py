"""The publish stream of session events: transitions, deltas, messages, errors, ends.

Subscribers are plain callables run synchronously on the loop; they must not block (put the
event on a queue). Deltas go only to listeners of their session, so a session nobody watches
pays one dict lookup per chunk.
"""

import time
from collections.abc import Callable

Listener = Callable[[dict], None]


class EventBus:
    """Fan-out of events to global and per-session listeners."""

    def __init__(self):
        self._global: list[Listener] = []
        self._by_session: dict[str, list[Listener]] = {}

    def subscribe(self, fn: Listener) -> Callable[[], None]:
        """Receive every session-level event (not deltas); returns the unsubscribe function."""
        self._global.append(fn)
        return lambda: self._global.remove(fn) if fn in self._global else None

    def subscribe_session(self, session_id: str, fn: Listener) -> Callable[[], None]:
        """Receive every event of one session, deltas included; returns the unsubscribe function."""
        self._by_session.setdefault(session_id, []).append(fn)

        def unsubscribe():
            listeners = self._by_session.get(session_id)
            if listeners and fn in listeners:
                listeners.remove(fn)
                if not listeners:
                    del self._by_session[session_id]

        return unsubscribe

    def watched(self, session_id: str) -> bool:
        """Whether anyone listens to this session."""
        return session_id in self._by_session

    def reaches_anyone(self, session_id: str) -> bool:
        """Whether a session-level event for this session would reach any listener."""
        return bool(self._global) or session_id in self._by_session

    def publish(self, type_: str, session_id: str, *, to_all: bool = True, **data) -> None:
        """Send one event to the session's listeners (and to global ones when ``to_all``)."""
        listeners = self._by_session.get(session_id)
        if not listeners and not (to_all and self._global):
            return
        event = {"type": type_, "session_id": session_id, "time": time.time(), **data}
        for fn in list(listeners or ()):
            fn(event)
        if to_all:
            for fn in list(self._global):
                fn(event)

    def publish_global(self, type_: str, **data) -> None:
        """Send an event that concerns the server, not a session's listeners, to global listeners."""
        if self._global:
            event = {"type": type_, "time": time.time(), **data}
            for fn in list(self._global):
                fn(event)
