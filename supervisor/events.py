"""The publish stream of session events: transitions, deltas, messages, errors, ends.

Subscribers are plain callables run synchronously on the loop; they must not block (put the
event on a queue). Deltas go only to listeners of their session, so a session nobody watches
pays one dict lookup per chunk. A global listener may name the event types it wants: an event
of a type no listener wants is never built (the idle <-> busy flip of every turn, for one).
"""

import time
from collections.abc import Callable, Iterable

from corral.supervisor.session_keys import id_of

Listener = Callable[[dict], None]


class EventBus:
    """Fan-out of events to global and per-session listeners."""

    def __init__(self):
        # (listener, the types it wants or None for all), in subscription order
        self._subscriptions: list[tuple[Listener, frozenset | None]] = []
        self._global: list[Listener] = []  # listeners of every type
        self._by_type: dict[str, list[Listener]] = {}  # type -> its listeners, in subscription order
        self._by_session: dict[str, list[Listener]] = {}

    def subscribe(self, fn: Listener, *, types: Iterable[str] | None = None) -> Callable[[], None]:
        """Receive session-level events (not deltas), of the given types or all; returns the unsubscribe function."""
        entry = (fn, None if types is None else frozenset(types))
        self._subscriptions.append(entry)
        self._route()

        def unsubscribe():
            if entry in self._subscriptions:
                self._subscriptions.remove(entry)
                self._route()

        return unsubscribe

    def _route(self) -> None:
        """Rebuild the per-type listener lists after a subscription changed."""
        self._global = [fn for fn, types in self._subscriptions if types is None]
        named = {t for _, types in self._subscriptions if types is not None for t in types}
        self._by_type = {
            t: [fn for fn, types in self._subscriptions if types is None or t in types] for t in named
        }

    def _global_for(self, type_: str) -> list[Listener]:
        """The global listeners of one event type."""
        return self._by_type.get(type_, self._global)

    def subscribe_session(self, key: str, fn: Listener) -> Callable[[], None]:
        """Receive every event of one session (by its key), deltas included; returns the unsubscribe function."""
        self._by_session.setdefault(key, []).append(fn)

        def unsubscribe():
            listeners = self._by_session.get(key)
            if listeners and fn in listeners:
                listeners.remove(fn)
                if not listeners:
                    del self._by_session[key]

        return unsubscribe

    def watched(self, key: str) -> bool:
        """Whether anyone listens to this session."""
        return key in self._by_session

    def reaches_anyone(self, key: str, type_: str) -> bool:
        """Whether a session-level event of this type for this session would reach any listener."""
        return key in self._by_session or bool(self._global_for(type_))

    def wants(self, type_: str) -> bool:
        """Whether any global listener takes events of this type (so the caller may skip building one)."""
        return bool(self._global_for(type_))

    def publish(self, type_: str, key: str, *, to_all: bool = True, **data) -> None:
        """Send one event to the session's listeners (and to global ones when ``to_all``); it names the session by id."""
        listeners = self._by_session.get(key)
        global_listeners = self._global_for(type_) if to_all else ()
        if not listeners and not global_listeners:
            return
        event = {"type": type_, "session_id": id_of(key), "time": time.time(), **data}
        for fn in list(listeners or ()):  # a listener may unsubscribe while being called
            fn(event)
        for fn in global_listeners:  # _route replaces these lists, never changes them in place
            fn(event)

    def publish_global(self, type_: str, **data) -> None:
        """Send an event that concerns the server, not a session's listeners, to global listeners."""
        global_listeners = self._global_for(type_)
        if global_listeners:
            event = {"type": type_, "time": time.time(), **data}
            for fn in global_listeners:
                fn(event)
