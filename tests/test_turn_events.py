"""The per-turn idle <-> busy flip still reaches listeners after its fast path."""

from corral.supervisor.logs import configure, debug_enabled


async def test_session_and_global_listeners_see_busy_and_idle(sup):
    s = await sup.get_or_create("flip", "t")
    await sup.ensure_live(s)
    seen_session, seen_global = [], []
    unsub_session = sup.events.subscribe_session(s.key, lambda e: e["type"] == "state" and seen_session.append(e["state"]))
    unsub_global = sup.events.subscribe(lambda e: e["type"] == "state" and seen_global.append(e["state"]))
    try:
        await sup.chat(s, "hello")
    finally:
        unsub_session()
        unsub_global()
    assert seen_session == ["busy", "idle"]
    assert seen_global == ["busy", "idle"]


async def test_unwatched_turns_still_flip_state(sup):
    s = await sup.get_or_create("quiet", "t")
    reply = await sup.chat(s, "my name is Ann")
    assert reply["status"] == "done" and s.state == "idle" and not s.is_processing


def test_debug_enabled_follows_the_configured_level():
    try:
        configure("debug", json=True)
        assert debug_enabled()
        configure("info", json=True)
        assert not debug_enabled()
    finally:
        configure("warning", json=True)


async def test_a_reply_returned_whole_still_reaches_listeners_as_one_chunk(make_supervisor):
    sup = await make_supervisor(agent="tests.perf_agents:WholeReplyAgent")
    s = await sup.get_or_create("whole", "t")
    await sup.ensure_live(s)
    deltas, chunks = [], []
    unsubscribe = sup.events.subscribe_session(s.key, lambda e: e["type"] == "delta" and deltas.append(e["text"]))
    try:
        reply = await sup.chat(s, "echo me", on_chunk=chunks.append)
    finally:
        unsubscribe()
    assert reply["reply"] == "echo me"
    assert chunks == ["echo me"] and deltas == ["echo me"]


async def test_a_streamed_reply_is_not_doubled(make_supervisor):
    sup = await make_supervisor(agent="tests.perf_agents:ChunkyAgent")
    s = await sup.get_or_create("streamed", "t")
    chunks = []
    reply = await sup.chat(s, "ab", on_chunk=chunks.append)
    assert chunks == ["ab"] * 3 and reply["reply"] == "ab" * 3
