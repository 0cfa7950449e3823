"""The event bus: listeners that name their event types get those and no others."""

from corral.supervisor.events import EventBus


def test_a_typed_listener_gets_only_its_types():
    bus, typed, everything = EventBus(), [], []
    bus.subscribe(lambda e: typed.append(e["type"]), types={"spawned", "end"})
    bus.subscribe(lambda e: everything.append(e["type"]))
    for kind in ("state", "spawned", "end", "message"):
        bus.publish(kind, "s1")
    bus.publish_global("purged")
    assert typed == ["spawned", "end"]
    assert everything == ["state", "spawned", "end", "message", "purged"]


def test_an_event_nobody_wants_reaches_nobody():
    bus = EventBus()
    bus.subscribe(lambda e: None, types={"spawned"})
    assert not bus.reaches_anyone("s1", "state") and bus.reaches_anyone("s1", "spawned")
    unsubscribe = bus.subscribe_session("s1", lambda e: None)
    assert bus.reaches_anyone("s1", "state") and not bus.reaches_anyone("s2", "state")
    unsubscribe()
    assert not bus.reaches_anyone("s1", "state")


def test_unsubscribing_stops_typed_and_untyped_listeners():
    bus, seen = EventBus(), []
    off_typed = bus.subscribe(lambda e: seen.append(("typed", e["type"])), types={"state"})
    off_all = bus.subscribe(lambda e: seen.append(("all", e["type"])))
    bus.publish("state", "s1")
    off_typed()
    bus.publish("state", "s1")
    off_all()
    off_all()  # twice is harmless
    bus.publish("state", "s1")
    assert seen == [("typed", "state"), ("all", "state"), ("all", "state")]
    assert not bus.reaches_anyone("s1", "state")


def test_a_listener_may_unsubscribe_while_it_is_called():
    bus, seen = EventBus(), []
    offs = []

    def once(event):
        seen.append(event["type"])
        offs[0]()

    offs.append(bus.subscribe(once, types={"end"}))
    bus.subscribe(lambda e: seen.append("other"), types={"end"})
    bus.publish("end", "s1")
    bus.publish("end", "s1")
    assert seen == ["end", "other", "other"]
