"""Usage per session and per tenant: counted from real agents, kept in the store, shown to the admin and the tenant."""

import asyncio
import signal
import time

import psutil

from corral.supervisor.timeline import SESSION_POINTS, SessionSeries, Timeline
from corral.web.app import create_app
from tests.apihelpers import ADMIN, ALICE, BOB, TENANTS, assert_error, json_of, start, supervisor_of
from tests.test_crash_consistency import servers  # noqa: F401 (a fixture: real `corral serve` processes)


async def until(check, timeout=10.0):
    """Poll a condition with a deadline (what it waits on is a store write off the loop's events)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_usage_is_counted_kept_and_shown_per_tenant(aiohttp_client, make_config, tmp_path):
    """Turns, messages, bytes, CPU, memory and ends of real agents; the admin sees all, a tenant its own, after a restart too."""
    client = await start(aiohttp_client, make_config, tmp_path, tenants=TENANTS, usage_interval=0.2)
    sup = supervisor_of(client)
    for text in ("hello", "my name is Zoë"):
        await json_of(await client.post("/api/chat", json={"message": text, "session_id": "u1"}, headers=ALICE), 200)
    await json_of(await client.post("/api/mcp-command", headers=ALICE, json={
        "session_id": "u1", "command": "spin", "args": {"seconds": 0.4}}), 200)
    await json_of(await client.post("/api/chat", json={"message": "hi", "session_id": "b1"}, headers=BOB), 200)
    await until(lambda: _has_memory(client, "alice/u1"))  # a sample has seen the live process (usage goes by key)
    times = psutil.Process(sup.sessions["alice/u1"].pid).cpu_times()
    cpu_before_end = times.user + times.system  # what the kernel says the agent has used so far
    await json_of(await client.delete("/api/sessions/u1", headers=ALICE), 200)

    row = await json_of(await client.get("/admin/sessions/u1", headers=ADMIN), 200)
    used = row["usage"]
    assert (used["starts"], used["turns"], used["messages_in"], used["messages_out"]) == (1, 3, 2, 2)
    assert used["bytes_in"] == len("hello".encode()) + len("my name is Zoë".encode())
    assert used["bytes_out"] > 0 and used["ends"] == 1 and used["last_end_reason"] == row["end_reason"]
    assert used["cpu_seconds"] >= cpu_before_end > 0.05  # the spin's CPU at least: wait4's total at exit
    assert used["memory_peak_bytes"] > 0 and used["memory_mib_seconds"] > 0
    assert used["egress_bytes"] == 0 and used["egress_requests"] == 0

    every = await json_of(await client.get("/admin/usage", headers=ADMIN), 200)
    assert set(every["tenants"]) == {"alice", "bob"}
    assert every["tenants"]["alice"]["turns"] == 3 and every["tenants"]["bob"]["turns"] == 1
    assert every["tenants"]["alice"]["end_reasons"] == {row["end_reason"]: 1}
    own = await json_of(await client.get("/api/usage?since=1h", headers=BOB), 200)
    assert list(own["tenants"]) == ["bob"] and own["tenants"]["bob"]["messages_in"] == 1
    future = await json_of(await client.get("/admin/usage?tenant=alice&since=2100-01-01", headers=ADMIN), 200)
    assert future["tenants"] == {}
    await assert_error(await client.get("/admin/usage?since=yesterday", headers=ADMIN), 400, "wrong_type")
    await assert_error(await client.get("/api/usage", headers=ADMIN), 401, "unauthorized")

    sup.usage.record_egress("b1", bytes=1500, requests=2, tenant="bob")  # what the egress gateway calls
    await client.close()  # the server stops: bob's session ends, pending usage is written before the store closes

    again = await aiohttp_client(create_app(make_config(tenants=tmp_path / "tenants.toml")))
    kept = await json_of(await again.get("/admin/usage", headers=ADMIN), 200)
    assert kept["tenants"]["alice"]["turns"] == 3
    assert (kept["tenants"]["bob"]["egress_bytes"], kept["tenants"]["bob"]["ends"]) == (1500, 1)


async def _has_memory(client, sid) -> bool:
    """Whether the usage sampler has counted memory for a session."""
    return supervisor_of(client).usage.pending.get(sid, None) is not None and \
        (await supervisor_of(client).usage.of_session(sid))["memory_peak_bytes"] > 0


async def test_prometheus_has_per_tenant_counters_and_no_series_per_session(aiohttp_client, make_config, tmp_path):
    """corral_tenant_* counters and corral_session_ends_total{tenant,reason}; no label names a session."""
    client = await start(aiohttp_client, make_config, tmp_path, tenants=TENANTS)
    await json_of(await client.post("/api/chat", json={"message": "hello", "session_id": "p1"}, headers=ALICE), 200)
    await json_of(await client.delete("/api/sessions/p1", headers=ALICE), 200)
    text = await (await client.get("/metrics", headers=ADMIN)).text()  # tenant series are the operator's
    assert 'corral_tenant_turns_total{tenant="alice"} 1.0' in text
    assert 'corral_tenant_cpu_seconds_total{tenant="alice"}' in text
    assert 'corral_tenant_memory_mib_seconds_total{tenant="alice"}' in text
    assert 'corral_session_ends_total{reason="ended",tenant="alice"} 1.0' in text
    assert not [line for line in text.splitlines() if "p1" in line]


def test_timeline_rings_are_bounded():
    """A session's ring merges pairs when full (whole life, fixed size); the node's keeps one hour."""
    series = SessionSeries()
    for i in range(1000):
        series.add(float(i), 1.0, 0.5)
    assert len(series.times) <= SESSION_POINTS and series.stride == 16
    assert series.times[0] == 7.5 and list(series.memory) == [1.0] * len(series.times)  # equal buckets, from the start
    timeline = Timeline(10.0)
    for i in range(1000):
        timeline.sample(float(i * 10), 1, {"s": (1 << 20, 0.1)})
    assert len(timeline.points) == 360 and timeline.node()["memory_mib"][-1] == 1.0


async def test_usage_of_answered_turns_survives_a_sigkill(tmp_path, servers):
    """A real `corral serve`: answered turns reach the store in their batch (no request asks for it) and outlive a SIGKILL."""
    import sqlite3

    import aiohttp

    from tests.test_crash_consistency import chat
    server = servers()
    await server.ready()
    async with aiohttp.ClientSession() as http:
        for i in range(3):
            await chat(http, server.url, "k1", f"turn {i}")
    database = tmp_path / "data" / "corral.sqlite3"

    async def written() -> bool:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
            row = db.execute("SELECT turns, messages_out FROM session_usage WHERE session_id = 'k1'").fetchone()
        return row == (3, 3)

    await until(written)  # within FLUSH_AFTER of the last answer, by the batch timer alone
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    again = servers(server.port)
    await again.ready()
    async with aiohttp.ClientSession() as http:
        async with http.get(again.url + "/admin/usage") as resp:
            kept = (await resp.json())["tenants"]["default"]
    assert (kept["turns"], kept["messages_in"], kept["starts"]) == (3, 3, 1)


async def test_usage_with_the_store_down_is_a_503(aiohttp_client, make_config, tmp_path):
    """The store unreachable: the usage routes answer 503 unavailable with Retry-After, never a 500."""
    client = await start(aiohttp_client, make_config, tmp_path, tenants=TENANTS)
    await supervisor_of(client).store.close()
    for path, headers in (("/admin/usage", ADMIN), ("/api/usage", ALICE)):
        response = await client.get(path, headers=headers)
        body = await assert_error(response, 503, "unavailable")
        assert response.headers["Retry-After"] == "5" and "sqlite" not in body["error"]["message"].lower()


async def test_idle_sessions_cost_the_sampling_pass_no_reading(make_supervisor):
    """A pass reads the processes active since the last one; idle ones keep their last reading on the timeline."""
    sup = await make_supervisor(usage_interval=0.05)
    sessions = [await sup.get_or_create(f"idle{i}", "acme") for i in range(3)]
    for s in sessions:
        await sup.chat(s, "hello")

    async def passes(n: int) -> None:
        """Wait for n more sampling passes (each adds one point to the node's timeline)."""
        target = len(sup.usage.timeline.points) + n
        await until(lambda: asyncio.sleep(0, len(sup.usage.timeline.points) >= target))

    await passes(2)  # the turns' sessions are read once
    reads = sup.usage.reads
    await passes(4)
    assert sup.usage.reads == reads  # nobody spoke: nothing read
    assert sup.usage.timeline.points[-1]["live"] == 3 and sup.usage.timeline.points[-1]["memory_mib"] > 0
    await sup.chat(sessions[0], "again")
    await passes(2)
    assert reads < sup.usage.reads <= reads + 2  # the one that spoke (its turn's batch may read it too)


async def test_cpu_is_counted_as_of_each_turns_end(aiohttp_client, make_config, tmp_path):
    """With no sample due for an hour, a live session's CPU reaches the store with its turn's batch."""
    client = await start(aiohttp_client, make_config, tmp_path, tenants=TENANTS, usage_interval=3600)
    sup = supervisor_of(client)
    await json_of(await client.post("/api/mcp-command", headers=ALICE, json={
        "session_id": "c1", "command": "spin", "args": {"seconds": 0.3}}), 200)
    times = psutil.Process(sup.sessions["alice/c1"].pid).cpu_times()
    spent = times.user + times.system  # the kernel's figure after the turn

    async def stored() -> bool:
        row = await sup.store.session_usage("alice/c1")
        return row is not None and row["cpu_seconds"] >= spent - 0.02  # clock ticks of the turn's bookkeeping

    await until(stored)
    assert sup.sessions["alice/c1"].live and not sup.usage.timeline.points  # no sample has run: the turn's batch read it


async def test_a_batch_the_store_refused_is_written_when_it_is_back(sup):
    """The store is down for a write: the counts stay pending, merged with new ones, and go out on the next try."""
    s = await sup.get_or_create("e1", "acme")
    await sup.ensure_live(s)
    await sup.store.close()
    sup.usage.record_egress("e1", bytes=100, requests=1, tenant="acme")
    await sup.usage.flush()  # refused: "not open"
    assert sup.usage.pending["acme/e1"].counts["egress_bytes"] == 100
    sup.usage.record_egress("e1", bytes=50, requests=1, tenant="acme")
    await sup.store.open()
    await sup.usage.flush()
    row = await sup.store.session_usage("acme/e1")
    assert (row["egress_bytes"], row["egress_requests"], row["starts"]) == (150, 2, 1) and not sup.usage.pending


async def test_a_session_timeline_is_named_by_tenant_when_two_tenants_share_its_id(aiohttp_client, make_config, tmp_path):
    """GET /admin/sessions/{id}/timeline: 409 when two tenants use the id, each one's own series with ?tenant=."""
    client = await start(aiohttp_client, make_config, tmp_path, tenants=TENANTS, usage_interval=0.05)
    sup = supervisor_of(client)
    for who in (ALICE, BOB):
        await json_of(await client.post("/api/chat", json={"message": "hi", "session_id": "twin"}, headers=who), 200)
    await until(lambda: asyncio.sleep(0, all(sup.usage.timeline.session(f"{t}/twin") for t in ("alice", "bob"))))
    await assert_error(await client.get("/admin/sessions/twin/timeline", headers=ADMIN), 409, "ambiguous_session")
    for tenant in ("alice", "bob"):
        life = await json_of(await client.get("/admin/sessions/twin/timeline", params={"tenant": tenant},
                                              headers=ADMIN), 200)
        own = sup.usage.timeline.session(f"{tenant}/twin")  # its first point: the ring only grows in this test
        assert life["session_id"] == "twin" and (life["t"][0], life["memory_mib"][0]) == (own["t"][0], own["memory_mib"][0])
    await assert_error(await client.get("/admin/sessions/twin/timeline", params={"tenant": "nobody"}, headers=ADMIN),
                       404, "session_not_found")
