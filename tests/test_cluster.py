"""A cluster of real `corral serve` nodes on one PostgreSQL, real nginx in front (issue 13).

Single activation (one process per session whichever node a request reaches), one ordered
history under concurrent chats through every node, failover after SIGKILL with no acknowledged
message lost, and fencing of a node that was paused past its lease.
"""

import asyncio
import re
import signal
import subprocess
import sys
import uuid

import aiohttp
import pytest

from corral.supervisor import errors
from corral.supervisor.store import create_store
from tests.cluster_kit import (
    LEASE, NGINX, POSTGRES_URL, Cluster, ProcessSampler, agent_processes, chat, create_database, drop_database,
    get_json, wait_gone,
)
from tests.conftest import drop_schema

pytestmark = pytest.mark.skipif(
    not POSTGRES_URL, reason="CORRAL_TEST_DATABASE_URL is not set (e.g. postgresql://postgres@127.0.0.1:5432/test)")
needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (.ci/run installs Debian's package: apt-get install -y nginx)")


@pytest.fixture
async def database():
    """A PostgreSQL database of the test's own."""
    name, url = await create_database()
    yield url
    await drop_database(name)


@pytest.fixture
async def cluster(tmp_path, database):
    """Nodes started by the test; all stopped afterwards."""
    c = Cluster(tmp_path, database)
    yield c
    await asyncio.to_thread(c.close)


@pytest.fixture
async def http():
    """A client with a generous timeout (a takeover waits out the lease)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


def new_prefix() -> str:
    """Session ids unique to this test run (other tests may run agents on this machine).

    Process titles show 12 characters of the id: prefix (8) and suffix (up to 4) fit.
    """
    return f"c{uuid.uuid4().hex[:6]}-"


async def admin_row(http, url: str, sid: str) -> dict:
    """GET /admin/sessions/{sid} through a node."""
    status, row = await get_json(http, url, f"/admin/sessions/{sid}")
    assert status == 200, row
    return row


async def chat_until_ok(http, url: str, sid: str, message: str, *, give_up: float) -> tuple[dict, float]:
    """Chat, retrying on the 502/503 of a takeover in progress; (answer, seconds it took)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        try:
            status, body, headers = await chat(http, url, sid, message)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            status, body, headers = 0, {}, {}
        if status == 200:
            return body, loop.time() - started
        assert status in (0, 502, 503), (status, body)
        assert loop.time() - started < give_up, f"{sid} did not answer again within {give_up}s: {status} {body}"
        await asyncio.sleep(float(headers.get("Retry-After", 0.2)) / 5)  # the server's advice, shortened


# ------------------------------------------------------------------ one process, one history


@needs_nginx
async def test_one_session_through_every_node_answers_from_one_process(cluster, http):
    nodes = [cluster.start_node() for _ in range(3)]
    balancer = cluster.start_nginx()
    sid = new_prefix() + "one"
    status, body, headers = await chat(http, nodes[0].url, sid, "my city is Rome")
    assert status == 200 and headers["X-Session-Id"] == sid and f"corral_session={sid}" in headers["Set-Cookie"]
    owner = await admin_row(http, nodes[0].url, sid)
    for url in [n.url for n in nodes] + [balancer]:
        status, body, headers = await chat(http, url, sid, "what is my city?")
        assert status == 200 and "Rome" in body["reply"], body
        assert headers["X-Session-Id"] == sid  # the owner's headers come back through the forward
        row = await admin_row(http, url, sid)  # the admin API answers the same from every node
        assert (row["node"], row["pid"]) == (owner["node"], owner["pid"])
    # a client that only has the cookie (the seed clients after their first answer) reaches it too
    async with http.get(f"{balancer}/api/state", cookies={"corral_session": sid}) as r:
        state = await r.json()
    assert state["message_count"] == 10 and state["agent_state"]["facts"]["city"] == "Rome"
    assert agent_processes(sid) == {sid: 1}
    status, live = await get_json(http, nodes[1].url, "/admin/sessions?state=live")  # every node's processes
    assert [(r["session_id"], r["node"], r["pid"]) for r in live["sessions"]] == [(sid, owner["node"], owner["pid"])]
    async with http.get(f"{nodes[2].url}/admin/events") as events:  # the dashboard's stream
        first = await next_event(sse_events(events), lambda e, d: e == "sessions")
    assert [(r["session_id"], r["node"], r["pid"]) for r in first["sessions"]] == [(sid, owner["node"], owner["pid"])]
    top = subprocess.run([sys.executable, "-c", "from corral.web.cli import main; raise SystemExit(main())", "top", "--once", "--url", nodes[2].url],
                         capture_output=True, text=True, timeout=30)
    assert top.returncode == 0 and owner["node"] in top.stdout and str(owner["pid"]) in top.stdout, top
    async with http.get(f"{nodes[1].url}/metrics") as r:
        forwards = re.search(r"(?m)^corral_forwards_total (\S+)$", await r.text())
    assert forwards and float(forwards.group(1)) >= 2  # its chat and its admin row went to the owner
    status, listing = await get_json(http, nodes[2].url, "/admin/nodes")
    assert status == 200 and len(listing["nodes"]) == 3 and all(n["alive"] for n in listing["nodes"])
    assert sum(n["sessions_owned"] for n in listing["nodes"]) == 1

    # usage: each node writes its own sessions' share; any node's /admin/usage sums every node's
    second = new_prefix() + "two"
    status, body, _ = await chat(http, nodes[1].url, second, "hello")  # claimed where it lands: nodes[1]
    assert status == 200 and (await admin_row(http, nodes[1].url, second))["node"] != owner["node"]
    deadline = asyncio.get_running_loop().time() + 10
    while True:  # the owners' batches are written within 50 ms of each turn, off every request
        status, used = await get_json(http, nodes[2].url, "/admin/usage")
        if used["tenants"].get("default", {}).get("turns") == 6:  # 5 turns of the first session, 1 of the second
            break
        assert asyncio.get_running_loop().time() < deadline, used
        await asyncio.sleep(0.05)
    assert used["tenants"]["default"]["starts"] == 2
    status, timeline = await get_json(http, nodes[2].url, "/admin/timeline")  # the dashboard's cluster plots
    assert status == 200 and len({n["node"] for n in timeline["cluster"]}) == 3
    assert timeline["cluster"][0]["node"] == timeline["node"]


async def test_30_concurrent_chats_through_every_node_keep_one_ordered_history(cluster, http):
    nodes = [cluster.start_node() for _ in range(3)]
    sid = new_prefix() + "busy"
    sent = [f"note {i}" for i in range(30)]
    answers = await asyncio.gather(*(chat(http, nodes[i % 3].url, sid, text) for i, text in enumerate(sent)))
    assert [status for status, _, _ in answers] == [200] * 30, answers
    status, state = await get_json(http, nodes[1].url, f"/api/state?session_id={sid}")
    messages = state["messages"]
    assert [m["seq"] for m in messages] == list(range(1, 61))  # one sequence, no gap, no duplicate
    assert sorted(m["content"] for m in messages if m["role"] == "user") == sorted(sent)
    assert sum(m["role"] == "assistant" for m in messages) == 30
    assert agent_processes(sid) == {sid: 1}


# ------------------------------------------------------------------ failover


@needs_nginx
async def test_sigkill_of_a_node_loses_no_acknowledged_message_and_never_doubles_a_process(cluster, http):
    victim, *others = [cluster.start_node() for _ in range(3)]
    cluster.start_nginx()
    prefix = new_prefix()
    sids = [f"{prefix}{i}" for i in range(6)]
    for sid in sids:  # owned by the victim: their first message went to it
        assert (await chat(http, victim.url, sid, f"my name is {sid}"))[0] == 200
    acknowledged = {sid: [] for sid in sids}
    recovery = {}
    killed = asyncio.Event()

    async def client(i: int, sid: str) -> None:
        """Chat the session through the other nodes before, during and after the kill."""
        n = 0
        while not killed.is_set() or sid not in recovery:
            n += 1
            text = f"{sid} note {n}"
            body, took = await chat_until_ok(http, others[(i + n) % 2].url, sid, text, give_up=LEASE + 10)
            acknowledged[sid].append(text)
            if killed.is_set() and sid not in recovery:
                recovery[sid] = took

    with ProcessSampler(prefix) as sampler:
        clients = [asyncio.ensure_future(client(i, sid)) for i, sid in enumerate(sids)]
        while min(len(a) for a in acknowledged.values()) < 3:  # traffic is flowing through the forwards
            await asyncio.sleep(0.05)
        cluster.kill(victim)
        killed.set()
        await asyncio.gather(*clients)
        for sid in sids:  # one more turn each on the new owners, while still sampling
            body, _ = await chat_until_ok(http, cluster.nginx_url, sid, "what is my name?", give_up=LEASE + 10)
            assert sid in body["reply"], body  # resumed from its history
    assert sampler.samples > 10 and max(sampler.most.values()) == 1, sampler.most
    assert max(recovery.values()) < LEASE + 10, recovery
    for sid in sids:
        status, state = await get_json(http, others[0].url, f"/api/state?session_id={sid}")
        stored = [m["content"] for m in state["messages"] if m["role"] == "user"]
        assert all(text in stored for text in acknowledged[sid]), (sid, acknowledged[sid], stored)
        assert [m["seq"] for m in state["messages"]] == list(range(1, len(state["messages"]) + 1))

    owners = {sid: await admin_row(http, others[0].url, sid) for sid in sids}
    restarted = cluster.start_node()  # a new run: a new node id, nothing of the old one's
    for sid in sids:
        assert (await chat(http, restarted.url, sid, "still there?"))[0] == 200
        row = await admin_row(http, restarted.url, sid)
        assert (row["node"], row["pid"]) == (owners[sid]["node"], owners[sid]["pid"])  # nothing stolen
    assert all(n == 1 for n in agent_processes(prefix).values())


async def test_a_node_paused_past_its_lease_is_fenced_out_when_it_wakes(cluster, http):
    paused, other, _third = [cluster.start_node() for _ in range(3)]
    prefix = new_prefix()
    sids = [f"{prefix}{i}" for i in range(3)]
    old_pids = []
    for sid in sids:
        assert (await chat(http, paused.url, sid, f"my name is {sid}"))[0] == 200
        old_pids.append((await admin_row(http, paused.url, sid))["pid"])
    cluster.kill(paused, signal.SIGSTOP)
    try:
        while any(n["alive"] for n in (await get_json(http, other.url, "/admin/nodes"))[1]["nodes"]
                  if n["url"] == paused.url):
            await asyncio.sleep(0.1)  # the database's clock decides when the lease has run out
        for sid in sids:  # taken over from the store's history while the old processes still run
            body, _ = await chat_until_ok(http, other.url, sid, "what is my name?", give_up=LEASE + 10)
            assert sid in body["reply"]
        # a request that reaches the paused node now is handled when it wakes, by its stale process
        late = asyncio.ensure_future(chat(http, paused.url, sids[0], "written while paused?"))
        await asyncio.sleep(0.2)
    finally:
        cluster.kill(paused, signal.SIGCONT)
    status, body, _ = await late
    # refused to the stale process, it went to the new owner (or the client is told to retry)
    assert status in (200, 503), body
    assert await asyncio.to_thread(wait_gone, old_pids, LEASE + 10) == []  # it ended its stale processes itself
    for sid in sids:
        row = await admin_row(http, paused.url, sid)  # the woken node now forwards to the owner
        assert row["pid"] not in old_pids and row["node"] == (await admin_row(http, other.url, sid))["node"]
        assert agent_processes(sid) == {sid: 1}
        status, state = await get_json(http, other.url, f"/api/state?session_id={sid}")
        assert [m["seq"] for m in state["messages"]] == list(range(1, len(state["messages"]) + 1))
        users = [m["content"] for m in state["messages"] if m["role"] == "user"]
        assert users.count("written while paused?") == (1 if sid == sids[0] and status == 200 else 0)
    status, stats = await get_json(http, paused.url, "/admin/stats")
    assert stats["counters"].get("fenced_out", 0) >= len(sids)


# ------------------------------------------------------------------ claims and fencing, in process


@pytest.fixture
async def pg_pair(make_supervisor):
    """Two supervisors (two nodes) on one PostgreSQL schema."""
    schema = f"corral_cluster_{uuid.uuid4().hex[:10]}"
    pair = [await make_supervisor(store=create_store(POSTGRES_URL, schema=schema), node_lease=LEASE,
                                  port=port, advertise_url=f"http://127.0.0.1:{port}")
            for port in (18801, 18802)]
    yield pair
    for sup in pair:
        await sup.close()
    await drop_schema(schema)


async def test_concurrent_claims_make_one_owner(pg_pair):
    a, b = pg_pair
    sid = new_prefix() + "race"
    sa, sb = await a.get_or_create(sid, "t"), await b.get_or_create(sid, "t")
    results = await asyncio.gather(a.chat(sa, "hello"), b.chat(sb, "hello"), return_exceptions=True)
    moved = [r for r in results if isinstance(r, errors.SessionMoved)]
    assert len(moved) == 1 and len([r for r in results if isinstance(r, dict)]) == 1, results
    winner = a if isinstance(results[1], errors.SessionMoved) else b
    assert moved[0].owner_url == winner.membership.url and agent_processes(sid) == {sid: 1}
    with pytest.raises(errors.SessionMoved):  # the loser now forwards, it does not claim
        await (b if winner is a else a).get_or_create(sid, "t")


async def test_a_stale_owners_writes_are_refused_and_its_process_ended(pg_pair):
    a, b = pg_pair
    sid = new_prefix() + "old"
    sa = await a.get_or_create(sid, "t")
    await a.chat(sa, "my name is Alice")
    old_pid, old_epoch = sa.pid, sa.epoch
    # a drops out of the membership table while still running (cut off, or paused): b may take over
    await a.membership.leave()
    sb = await b.get_or_create(sid, "t")
    assert "Alice" in (await b.chat(sb, "what is my name?"))["reply"] and sb.epoch == old_epoch + 1
    with pytest.raises(errors.SessionMoved) as refused:  # a still thinks it owns it: its write is refused
        await a.chat(sa, "my name is Mallory")
    assert refused.value.owner_url is None or refused.value.owner_url == b.membership.url
    assert await asyncio.to_thread(wait_gone, [old_pid], 10) == []  # the loop runs meanwhile
    assert a.counters["fenced_out"] == 1
    history = await b.store.history(sb.key)
    assert [m.content for m in history if m.role == "user"] == ["my name is Alice", "what is my name?"]
    await a.settle_store()
    assert (await b.store.get_session(sb.key)).node == b.node  # a's end of its process was not written over b's


async def test_a_passivated_session_is_claimed_where_its_next_request_lands(pg_pair):
    a, b = pg_pair
    sid = new_prefix() + "idle"
    sa = await a.get_or_create(sid, "t")
    await a.chat(sa, "my name is Alice")
    with pytest.raises(errors.SessionMoved):  # active on a: b forwards
        await b.get_or_create(sid, "t")
    await a.stop(sa, "reaped")  # what the idle timeout does
    await a.settle_store()
    sb = await b.get_or_create(sid, "t")  # ended on a, which is alive: b may claim it now
    assert "Alice" in (await b.chat(sb, "what is my name?"))["reply"]
    assert (await b.store.get_session(sb.key)).node == b.node and agent_processes(sid) == {sid: 1}


async def sse_events(response: aiohttp.ClientResponse):
    """(event, data) pairs of an event stream as they arrive."""
    import json

    event, data = None, []
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and event is not None:
            yield event, json.loads("\n".join(data))
            event, data = None, []


async def next_event(events, wanted) -> dict:
    """The data of the next event the predicate accepts."""
    async for event, data in events:
        if wanted(event, data):
            return data
    raise AssertionError("the stream ended")


async def test_stream_interrupt_and_admin_kill_work_from_nodes_that_do_not_own_the_session(cluster, http):
    owner, second, third = [cluster.start_node() for _ in range(3)]
    sid = new_prefix() + "ops"
    assert (await chat(http, owner.url, sid, "my name is Alice"))[0] == 200
    pid = (await admin_row(http, owner.url, sid))["pid"]
    async with http.get(f"{second.url}/api/chat/stream?session_id={sid}") as stream:  # relayed, chunk by chunk
        assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        assert stream.headers["X-Session-Id"] == sid
        events = sse_events(stream)
        snapshot = await next_event(events, lambda e, d: e == "state")
        assert snapshot["messages"][0]["content"] == "my name is Alice"
        sleeping = asyncio.ensure_future(http.post(f"{third.url}/api/mcp-command", json={
            "session_id": sid, "command": "sleep", "args": {"seconds": 600}}))
        await next_event(events, lambda e, d: e == "state" and d.get("state") == "busy")
        async with http.post(f"{second.url}/api/interrupt", json={"session_id": sid}) as r:
            assert r.status == 200 and (await r.json())["interrupted"] is True
        async with await sleeping as r:
            assert r.status == 200 and (await r.json())["status"] == "interrupted"
        async with http.delete(f"{third.url}/admin/sessions/{sid}") as r:  # the admin kill, relayed
            assert r.status == 202, await r.text()
        ended = await next_event(events, lambda e, d: e == "end")
        assert ended["reason"] == "killed"
    assert await asyncio.to_thread(wait_gone, [pid], 10) == []


@needs_nginx
async def test_a_stream_gets_the_events_of_whichever_node_activates_the_session_later(cluster, http):
    first, second, third = [cluster.start_node() for _ in range(3)]
    balancer = cluster.start_nginx()
    sid = new_prefix() + "sse"
    # opened where nothing owns the session: served from the first node's own events
    async with http.get(f"{first.url}/api/chat/stream?session_id={sid}") as stream:
        events = sse_events(stream)
        assert (await next_event(events, lambda e, d: e == "state"))["messages"] == []
        assert (await chat(http, second.url, sid, "my name is Alice"))[0] == 200  # activated on the second
        reply = await asyncio.wait_for(next_event(events, lambda e, d: e == "message" and d["role"] == "assistant"), 30)
        assert reply["content"] == "Got it: your name is Alice."  # before: nothing ever came
        async with http.delete(f"{balancer}/admin/sessions/{sid}") as r:  # ended on the second
            assert r.status == 202, await r.text()
        assert (await chat(http, third.url, sid, "what is my name?"))[0] == 200  # activated on the third
        reply = await asyncio.wait_for(next_event(events, lambda e, d: e == "message" and d["role"] == "assistant"
                                                  and d["content"] != "Got it: your name is Alice."), 30)
        assert reply["content"] == "Your name is Alice."


async def test_a_stopping_node_answers_its_relayed_requests_503_rather_than_dropping_them(cluster, http):
    # (the owner's sleep goes on after the test: its own stop then waits only half a second too)
    owner, relayer = [cluster.start_node("--drain-timeout", "0.5") for _ in range(2)]
    sid = new_prefix() + "rel"
    assert (await chat(http, owner.url, sid, "hello"))[0] == 200
    sleeping = asyncio.ensure_future(http.post(f"{relayer.url}/api/mcp-command", json={
        "session_id": sid, "command": "sleep", "args": {"seconds": 600}}))  # relayed to the owner
    deadline = asyncio.get_running_loop().time() + 30
    while (await admin_row(http, owner.url, sid))["state"] != "busy":  # the owner's state, over HTTP
        assert asyncio.get_running_loop().time() < deadline and not sleeping.done()
        await asyncio.sleep(0.02)
    relayer.proc.send_signal(signal.SIGTERM)
    # before: 503 owner_unreachable (its relay pool closed under it), blaming an owner that is fine
    async with await asyncio.wait_for(sleeping, 30) as r:
        assert r.status == 503 and (await r.json())["error"]["code"] == "shutting_down"
    assert await asyncio.to_thread(relayer.proc.wait, 30) == 0


async def test_a_clean_stop_hands_the_sessions_over_at_once(pg_pair):
    a, b = pg_pair
    sid = new_prefix() + "bye"
    sa = await a.get_or_create(sid, "t")
    await a.chat(sa, "my name is Alice")
    await a.close()  # SIGTERM's path: stop the sessions, then delete the node's row
    sb = await b.get_or_create(sid, "t")  # no wait for a lease: a is gone from the table
    assert "Alice" in (await b.chat(sb, "what is my name?"))["reply"]
    nodes = await b.queries.cluster_nodes()
    assert [n["node"] for n in nodes] == [b.node] and nodes[0]["sessions_owned"] == 1


async def test_a_node_cut_off_from_postgresql_ends_its_processes_after_its_lease(make_supervisor):
    from urllib.parse import urlsplit, urlunsplit

    from tests.cluster_kit import CuttableLink

    parts = urlsplit(POSTGRES_URL)
    link = CuttableLink(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = await link.start()
    via_link = urlunsplit(parts._replace(netloc=f"{parts.netloc.rpartition('@')[0]}@127.0.0.1:{port}"
                                         if "@" in parts.netloc else f"127.0.0.1:{port}"))
    schema = f"corral_cluster_{uuid.uuid4().hex[:10]}"
    a = await make_supervisor(store=create_store(via_link, schema=schema, connect_timeout=1.0),
                              node_lease=LEASE, port=18803)
    try:
        sid = new_prefix() + "cut"
        sa = await a.get_or_create(sid, "t")
        await a.chat(sa, "my name is Alice")
        pid = sa.pid
        link.cut()  # PostgreSQL is out of reach: a cannot renew, so it cannot prove it owns anything
        assert await asyncio.to_thread(wait_gone, [pid], LEASE + 10) == []  # it ended it itself (self-fencing)
        assert a.counters["fenced_out"] == 1
    finally:
        await a.close()
        await drop_schema(schema)
