"""GET /metrics: Prometheus text that parses, with counters that move as sessions live and die."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral.supervisor import errors
from tests.conftest import wait_for_state
from corral.web.app import create_app
from corral.web.keys import SUPERVISOR

MiB = 1 << 20


async def scrape(client) -> dict:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_move_on_spawn_crash_restart_oom_and_reap(aiohttp_client, make_config):
    app = create_app(make_config(memory_limit=64 * MiB))
    client = await aiohttp_client(app)
    sup = app[SUPERVISOR]
    assert value(await scrape(client), "corral_spawns_total") == 0

    response = await client.post("/api/chat", json={"message": "hello", "session_id": "m1"})
    assert response.status == 200
    seen = await scrape(client)
    assert value(seen, "corral_spawns_total") == 1
    assert value(seen, "corral_spawn_seconds_count") == 1
    assert value(seen, "corral_sessions", state="idle") + value(seen, "corral_sessions", state="busy") == 1
    assert value(seen, "corral_tenant_sessions", tenant="default") == 1
    assert value(seen, "corral_http_request_seconds_count", route="/api/chat", method="POST") == 1
    assert value(seen, "corral_agent_memory_bytes", kind="rss") > MiB

    with pytest.raises(errors.AgentDied):
        await sup.command(sup.sessions["m1"], "crash", {"how": "exit"})
    seen = await scrape(client)
    assert value(seen, "corral_crashes_total") == 1
    assert value(seen, "corral_sessions", state="crashed") == 1
    response = await client.post("/api/chat", json={"message": "back?", "session_id": "m1"})
    assert response.status == 200  # the crashed session is respawned with its history
    seen = await scrape(client)
    assert value(seen, "corral_restarts_total") == 1

    hog = await sup.get_or_create("m2", "default")
    with pytest.raises(errors.AgentDied) as died:
        await sup.command(hog, "allocate", {"mib": 200})
    assert died.value.code == "agent_oom"
    seen = await scrape(client)
    assert value(seen, "corral_oom_kills_total") == 1
    assert value(seen, "corral_spawns_total") == 3

    sup.reaper.idle_timeout = 0.3  # only sessions going idle from now on get the short timeout
    idler = await sup.get_or_create("m3", "default")
    await sup.ensure_live(idler)
    assert await wait_for_state(sup, idler, {"reaped"}) == "reaped"
    seen = await scrape(client)
    assert value(seen, "corral_reaps_total") == 1
    assert value(seen, "corral_spawns_total") == 4
    assert value(seen, "corral_spawn_seconds_count") == 4


async def test_refusals_are_counted_by_status_and_code(aiohttp_client, make_config):
    client = await aiohttp_client(create_app(make_config()))
    response = await client.post("/api/chat", data=b"{not json")
    assert response.status == 400
    response = await client.get("/no/such/page")
    assert response.status == 404
    seen = await scrape(client)
    assert value(seen, "corral_http_refused_total", status="400", code="malformed_json") == 1
    assert value(seen, "corral_http_refused_total", status="404", code="not_found") == 1
    assert value(seen, "corral_http_request_seconds_count", route="unmatched", method="GET") == 1


async def test_every_request_of_a_route_is_counted(aiohttp_client, make_config):
    client = await aiohttp_client(create_app(make_config()))
    for _ in range(3):
        assert (await client.get("/health")).status == 200
    assert (await client.get("/api/state", params={"session_id": "nobody"})).status == 200
    seen = await scrape(client)
    assert value(seen, "corral_http_request_seconds_count", route="/health", method="GET") == 3
    assert value(seen, "corral_http_request_seconds_count", route="/api/state", method="GET") == 1


async def test_unknown_http_methods_share_one_label(aiohttp_client, make_config):
    """The method label comes from the client: anything outside HTTP's own methods is "other"."""
    app = create_app(make_config())
    client = await aiohttp_client(app)
    for method in ("PROPFIND", "MKCOL", "LOCK", "UNLOCK", "SEARCH", "PURGE"):  # the parser knows these
        await client.request(method, "/health")
    await client.get("/health")
    seen = await scrape(client)
    methods = {dict(labels)["method"] for name, labels in seen if name == "corral_http_request_seconds_count"}
    assert methods == {"GET", "other"}
