"""Dev mode against a local browser: a rebound Host and a foreign Origin on a write are 403.

A real app on a real socket; the requests are what a browser on this machine would send for a
page of another site (DNS rebinding: that site's name in Host; a cross-site form or fetch: its
Origin), and what curl and the built-in pages send (no Origin; the server's own origin).
"""

import pytest
from tests.apihelpers import ADMIN, ALICE, TENANTS, assert_error, json_of, start, supervisor_of

from corral.web.browser_guard import host_name


@pytest.fixture
async def dev(aiohttp_client, make_config, tmp_path):
    """A dev-mode app (no keys)."""
    return await start(aiohttp_client, make_config, tmp_path)


def own_origin(client) -> str:
    """The origin of the server's own pages."""
    return f"http://127.0.0.1:{client.server.port}"


@pytest.mark.parametrize("host", ["rebind.evil.example", "rebind.evil.example:8080", "127.0.0.1.evil.example",
                                  "localhost.evil.example", "[::2]:8080", "0.0.0.0", "10.0.0.1:8080"])
async def test_a_host_that_is_not_loopback_is_refused(dev, host):
    for method, path in (("GET", "/health"), ("GET", "/admin/sessions"), ("GET", "/api/state?session_id=s1"),
                         ("POST", "/api/chat"), ("GET", "/")):
        response = await dev.request(method, path, headers={"Host": host}, data=b'{"message": "hi"}')
        await assert_error(response, 403, "forbidden_host")
    assert supervisor_of(dev).sessions == {}


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "LOCALHOST.", "127.0.0.1", "127.0.0.1:9",
                                  "127.5.6.7:8080", "[::1]", "[::1]:8080"])
async def test_loopback_hosts_are_served(dev, host):
    assert (await dev.get("/health", headers={"Host": host})).status == 200


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://localhost:3000", "http://127.0.0.1:1"])
async def test_a_write_from_another_origin_is_refused(dev, origin):
    """A cross-site text/plain POST (no preflight in a browser) reaches nothing."""
    headers = {"Origin": origin, "Content-Type": "text/plain"}
    for method, path in (("POST", "/api/chat"), ("POST", "/api/sessions"), ("DELETE", "/api/sessions/s1"),
                         ("DELETE", "/admin/sessions/s1"), ("POST", "/api/interrupt")):
        response = await dev.request(method, path, data=b'{"message": "hi", "session_id": "s1"}', headers=headers)
        await assert_error(response, 403, "forbidden_origin")
    assert supervisor_of(dev).sessions == {}
    assert (await dev.get("/health", headers={"Origin": origin})).status == 200  # reads are CORS's to guard


async def test_curl_and_the_builtin_pages_still_work(dev):
    assert (await json_of(await dev.post("/api/chat", data=b'{"message": "hi", "session_id": "c1"}'), 200))["reply"]
    same_origin = {"Origin": own_origin(dev)}
    assert (await json_of(await dev.post("/api/chat", json={"message": "hi", "session_id": "p1"}, headers=same_origin), 200))["reply"]
    assert (await dev.delete("/admin/sessions/p1", headers=same_origin)).status == 202


async def test_cors_origins_are_allowed_to_write(aiohttp_client, make_config, tmp_path):
    client = await start(aiohttp_client, make_config, tmp_path, cors_origins=("https://app.example",))
    allowed = await client.post("/api/chat", json={"message": "hi"}, headers={"Origin": "https://app.example"})
    assert allowed.status == 200 and allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    await assert_error(await client.post("/api/chat", json={"message": "hi"}, headers={"Origin": "https://other.example"}),
                       403, "forbidden_origin")


async def test_with_api_keys_the_guard_is_off(aiohttp_client, make_config, tmp_path):
    """A page cannot get a key to send, and a server with keys may be named anything."""
    client = await start(aiohttp_client, make_config, tmp_path, tenants=TENANTS)
    headers = {**ALICE, "Host": "corral.example.com", "Origin": "https://elsewhere.example"}
    assert (await client.post("/api/chat", json={"message": "hi"}, headers=headers)).status == 200
    assert (await client.get("/admin/stats", headers={**ADMIN, "Host": "corral.example.com"})).status == 200


@pytest.mark.parametrize("header, name", [("LocalHost:8080", "localhost"), ("[::1]:80", "::1"), ("::1", "::1"),
                                          ("localhost.", "localhost"), ("127.0.0.1", "127.0.0.1")])
def test_host_names(header, name):
    assert host_name(header) == name
