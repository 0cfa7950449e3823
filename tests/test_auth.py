"""Tenants, API keys, the admin token and dev mode, over real HTTP and a real ``corral serve``."""

import asyncio
import os
import sys

import pytest
from tests.apihelpers import (
    ADMIN, ALICE, BOB, SMALL, TENANTS, assert_error, bearer, interrupted, json_of, start, started_sleep,
)

from corral.web.app import create_app
from corral.web.auth import AuthConfigError, auth_from_config, is_loopback
from corral.web.cli import build_parser, config_from
from corral.web.version import VERSION
from tests.procs import free_port


@pytest.fixture
async def client(aiohttp_client, make_config, tmp_path):
    """An app with tenants alice, bob and small (quota 1) and an admin token."""
    return await start(aiohttp_client, make_config, tmp_path, tenants=TENANTS)


def tenants_file(tmp_path, text: str):
    """Write a tenants file and return its path."""
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- the tenants file


def test_tenants_file_is_read(make_config, tmp_path):
    """Keys map to tenants, quotas go to the supervisor, the admin token is taken from the file."""
    auth = auth_from_config(make_config(tenants=tenants_file(tmp_path, TENANTS)))
    assert auth.tenant_for("alice-key-2") == "alice" and auth.tenant_for("bob-key") == "bob"
    assert auth.tenant_for("alice-key-") is None and auth.tenant_for(None) is None
    assert auth.tenant_limits == {"small": 1}
    assert auth.is_admin_token("admin-secret-token") and not auth.is_admin_token("alice-key-1")
    assert not auth.dev_mode and "alice-key" not in repr(auth) and "admin-secret" not in repr(auth)
    flag = auth_from_config(make_config(tenants=tenants_file(tmp_path, TENANTS), admin_token="from-flag"))
    assert flag.is_admin_token("from-flag") and not flag.is_admin_token("admin-secret-token")


@pytest.mark.parametrize("text, says", [
    ("[tenants.a\nkeys = [", "not valid TOML"),
    ("[tenants.a]\nmax_sessions = 2\n", "keys must be a non-empty list"),
    ("[tenants.a]\nkeys = []\n", "keys must be a non-empty list"),
    ("[tenants.a]\nkeys = ['']\n", "keys must be a non-empty list"),
    ("[tenants.a]\nkeys = ['k-secret']\nmax_sessions = 0\n", "max_sessions must be a positive integer"),
    ("[tenants.a]\nkeys = ['k-secret']\nquota = 3\n", "unknown settings ['quota']"),
    ("[tenants.'a b']\nkeys = ['k-secret']\n", "tenant names are"),
    ("[tenants.a]\nkeys = ['k-secret']\n[tenants.b]\nkeys = ['k-secret']\n", "the same API key is given to tenants"),
    ("admin_token = 'k-secret'\n[tenants.a]\nkeys = ['k-secret']\n", "must differ from every tenant key"),
    ("admin_token = 3\n", "admin_token must be a non-empty string"),
    ("tenant = 1\n", "unknown top-level keys"),
])
def test_bad_tenants_files_are_refused_without_echoing_keys(make_config, tmp_path, text, says):
    """Each mistake stops the start with a message naming it, and never the key itself."""
    path = tenants_file(tmp_path, text)
    with pytest.raises(AuthConfigError) as caught:
        create_app(make_config(tenants=path))
    assert says in str(caught.value) and "k-secret" not in str(caught.value)
    assert str(caught.value).startswith(f"tenants file {path}: ")  # which file, whatever the mistake


def test_missing_tenants_file_and_env_variable(make_config, tmp_path):
    """A missing file is a clear error; CORRAL_TENANTS and CORRAL_ADMIN_TOKEN name the file and token."""
    with pytest.raises(AuthConfigError, match="No such file"):
        auth_from_config(make_config(tenants=tmp_path / "absent.toml"))
    path = tenants_file(tmp_path, TENANTS)
    args = build_parser().parse_args(["serve"])
    config = config_from(args, environ={"CORRAL_TENANTS": str(path), "CORRAL_ADMIN_TOKEN": "env-admin"})
    assert config.tenants == path and auth_from_config(config).is_admin_token("env-admin")


def test_loopback_addresses():
    """Only loopback binds and peers count as loopback."""
    assert all(map(is_loopback, ["127.0.0.1", "127.8.0.1", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.com", "", None]))


def test_dev_mode_refused_off_loopback(make_config):
    """No keys and a public bind address: the app refuses to build."""
    with pytest.raises(AuthConfigError, match="allowed only on loopback"):
        create_app(make_config(host="0.0.0.0"))


# ---------------------------------------------------------------- corral serve, for real


async def run_corral(tmp_path, *args, until: bytes | None = None):
    """Run ``corral serve``; return its exit code and stderr (stopped once ``until`` is logged)."""
    env = {**os.environ, "CORRAL_DATA_DIR": str(tmp_path / "data"), "CORRAL_RUN_DIR": str(tmp_path / "run")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from corral.web.cli import main; raise SystemExit(main())", "serve", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
    )
    seen = b""
    try:
        while until is not None and until not in seen:
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            if not line:
                break
            seen += line
        if until is not None and until in seen:
            proc.terminate()
        seen += await asyncio.wait_for(proc.stderr.read(), 30)
        return await asyncio.wait_for(proc.wait(), 30), seen.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_corral_serve_refuses_dev_mode_on_a_public_address(tmp_path):
    """``corral serve --host 0.0.0.0`` without keys exits at once with the reason."""
    code, err = await run_corral(tmp_path, "--host", "0.0.0.0", "--port", str(free_port()))
    assert code != 0 and "dev mode (no keys) is allowed only on loopback" in err and "--tenants" in err


async def test_corral_serve_warns_in_dev_mode(tmp_path):
    """On loopback without keys it serves, and says so (admin open to loopback) in the log."""
    code, err = await run_corral(tmp_path, "--port", str(free_port()), until=b'"serving"')
    assert '"dev_mode"' in err and "admin API is open to loopback clients" in err and '"warning"' in err


async def test_corral_serve_never_logs_keys(tmp_path):
    """With a tenants file the log names tenants and counts keys, never a key or the token."""
    path = tenants_file(tmp_path, TENANTS)
    code, err = await run_corral(tmp_path, "--port", str(free_port()), "--tenants", str(path), until=b'"serving"')
    assert '"tenants_loaded"' in err and '"alice"' in err and '"dev_mode"' not in err
    assert "alice-key" not in err and "admin-secret" not in err


# ---------------------------------------------------------------- requests


async def test_missing_or_wrong_key_is_401(client):
    """No key, a wrong key, or another scheme: 401 with a Bearer challenge; /health needs none."""
    for headers in ({}, bearer("not-a-key"), {"Authorization": "Basic YWxpY2U6eA=="}, bearer("admin-secret-token")):
        response = await client.post("/api/chat", json={"message": "hi"}, headers=headers)
        await assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await client.get("/health")).status == 200
    assert (await json_of(await client.post("/api/chat", json={"message": "hi"}, headers=bearer("alice-key-2")), 200))


async def test_admin_needs_the_admin_token(client):
    """A tenant key is not the admin token; the admin token opens /admin/."""
    await assert_error(await client.get("/admin/sessions"), 401, "unauthorized")
    await assert_error(await client.get("/admin/sessions", headers=ALICE), 401, "unauthorized")
    assert (await client.get("/admin/sessions", headers=ADMIN)).status == 200


async def test_admin_disabled_without_token_and_open_in_dev_mode(aiohttp_client, make_config, tmp_path):
    """Keys but no admin token: the admin API is closed. Dev mode: open to loopback clients."""
    no_token = "[tenants.alice]\nkeys = ['alice-key-1']\n"
    closed = await start(aiohttp_client, make_config, tmp_path, tenants=no_token)
    body = await assert_error(await closed.get("/admin/stats", headers=ALICE), 401, "unauthorized")
    assert "disabled" in body["error"]["message"]
    dev = await start(aiohttp_client, make_config, tmp_path / "dev", data_dir=tmp_path / "dev-data")  # one server per SQLite file
    assert (await json_of(await dev.get("/admin/stats"), 200))["live_sessions"] == 0


async def bob_on_every_route(client, sid: str) -> list:
    """(status, reply or result) of Bob naming ``sid`` on every route, in one order."""
    calls = [
        lambda: client.get(f"/api/sessions/{sid}", headers=BOB),
        lambda: client.get("/api/state", params={"session_id": sid}, headers=BOB),
        lambda: client.post("/api/interrupt", json={"session_id": sid}, headers=BOB),
        lambda: client.delete(f"/api/sessions/{sid}", headers=BOB),
        lambda: client.post("/api/chat", json={"message": "what is my name?", "session_id": sid}, headers=BOB),
        lambda: client.post("/api/chat", json={"message": "x", "wait": False}, headers={**BOB, "X-Session-Id": sid}),
        lambda: client.post("/api/system", json={"message": "x", "session_id": sid}, headers=BOB),
        lambda: client.post("/api/mcp-command", json={"command": "facts", "session_id": sid}, headers=BOB),
        lambda: client.post("/api/sessions", json={"session_id": sid}, headers=BOB),
        lambda: client.get(f"/api/sessions/{sid}", headers=BOB),
        lambda: client.delete(f"/api/sessions/{sid}", params={"purge": "true"}, headers=BOB),
    ]
    seen = []
    for call in calls:
        response = await call()
        body = await response.json()
        assert "Alice" not in str(body)
        seen.append((response.status, body.get("reply"), body.get("result")))
    return seen


async def test_tenant_b_learns_nothing_of_tenant_a_ids_and_uses_them_as_its_own(client):
    """Bob naming Alice's id on any route gets exactly what a fresh id gets: his own session; hers is unharmed."""
    sid = "alice-private"
    await json_of(await client.post("/api/chat", json={"message": "my name is Alice", "session_id": sid}, headers=ALICE), 200)
    assert await bob_on_every_route(client, sid) == await bob_on_every_route(client, "never-used")
    client.session.cookie_jar.update_cookies({"corral_session": sid}, response_url=client.make_url("/"))
    bobs = await json_of(await client.post("/api/chat", json={"message": "what is my name?"}, headers=BOB), 200)
    assert bobs["session_id"] == sid and bobs["reply"] == "I don't know your name yet."
    mine = await json_of(await client.post("/api/chat", json={"message": "what is my name?", "session_id": sid},
                                           headers=ALICE), 200)
    assert mine["reply"] == "Your name is Alice." and mine["message_count"] == 4


async def test_bob_cannot_interrupt_alices_turn(client):
    """Bob's interrupt of Alice's busy session's id reaches his own (none in progress); her turn runs on."""
    call = await started_sleep(client, "alice-sleeps", headers=ALICE)
    response = await client.post("/api/interrupt", json={"session_id": "alice-sleeps"}, headers=BOB)
    assert (await json_of(response, 200))["interrupted"] is False
    assert not call.done()
    response = await interrupted(client, call, "/api/interrupt", json={"session_id": "alice-sleeps"}, headers=ALICE)
    assert (await json_of(response, 200))["status"] == "interrupted"


async def test_tenant_quota_is_429_and_other_tenants_unaffected(client):
    """Tenant small (max_sessions = 1): a second live session is 429 quota_exceeded with Retry-After."""
    await json_of(await client.post("/api/sessions", json={"session_id": "small-1"}, headers=SMALL), 201)
    response = await client.post("/api/chat", json={"message": "hi", "session_id": "small-2"}, headers=SMALL)
    await assert_error(response, 429, "quota_exceeded")
    assert int(response.headers["Retry-After"]) >= 1
    await json_of(await client.post("/api/chat", json={"message": "hi", "session_id": "alice-2"}, headers=ALICE), 200)
    await json_of(await client.delete("/api/sessions/small-1", headers=SMALL), 200)
    await json_of(await client.post("/api/chat", json={"message": "hi", "session_id": "small-2"}, headers=SMALL), 200)


# ---------------------------------------------------------------- /health and /metrics


async def test_health_shows_pids_and_paths_only_to_the_admin(client):
    """With tenants, /health without the admin token is status and version; with it, the whole document."""
    for headers in ({}, ALICE, bearer("not-a-key")):
        assert await json_of(await client.get("/health", headers=headers), 200) == {"status": "ok", "version": VERSION}
    full = await json_of(await client.get("/health", headers=ADMIN), 200)
    assert full["zygote_pid"] > 0 and "limit" in full and "live_sessions" in full


async def test_health_in_dev_mode_is_whole_for_loopback(aiohttp_client, make_config, tmp_path):
    """Dev mode without an admin token: loopback clients may use the admin API, so they see it all."""
    client = await start(aiohttp_client, make_config, tmp_path)
    assert (await json_of(await client.get("/health"), 200))["zygote_pid"] > 0


async def test_metrics_token_is_required_when_set(aiohttp_client, make_config, tmp_path):
    """--metrics-token: /metrics answers 401 JSON without it, the text format with it (or the admin token)."""
    client = await start(aiohttp_client, make_config, tmp_path, tenants=TENANTS, metrics_token="scrape-secret")
    for headers in ({}, ALICE, bearer("wrong")):
        response = await client.get("/metrics", headers=headers)
        await assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    for headers in (bearer("scrape-secret"), ADMIN):
        response = await client.get("/metrics", headers=headers)
        assert response.status == 200 and "corral_sessions" in await response.text()


async def test_metrics_stay_open_without_a_token(client):
    response = await client.get("/metrics")
    assert response.status == 200 and "corral_sessions" in await response.text()


async def test_open_metrics_show_no_tenant_names_but_the_admin_sees_them(client):
    """Without a metrics token, /metrics is anyone's (agents' too): tenant names only with the admin token."""
    assert (await client.post("/api/chat", json={"message": "hi", "session_id": "named"}, headers=ALICE)).status == 200
    for headers in ({}, ALICE, BOB):
        text = await (await client.get("/metrics", headers=headers)).text()
        assert "corral_tenant_sessions" in text and "alice" not in text and "tenant=" not in text
    text = await (await client.get("/metrics", headers=ADMIN)).text()
    assert 'corral_tenant_sessions{tenant="alice"} 1.0' in text


def test_metrics_token_comes_from_the_environment():
    args = build_parser().parse_args(["serve"])
    assert config_from(args, environ={"CORRAL_METRICS_TOKEN": "scrape-secret"}).metrics_token == "scrape-secret"
