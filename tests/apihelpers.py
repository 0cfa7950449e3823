"""Helpers for the HTTP API tests: a running app with tenants, and waiting on turns."""

import asyncio

from tests.conftest import wait_for_state
from corral.web.app import create_app
from corral.supervisor.session_keys import session_key
from corral.web.auth import DEV_TENANT
from corral.web.keys import AUTH, PROCSTATS, SUPERVISOR

TENANTS = """
admin_token = "admin-secret-token"

[tenants.alice]
keys = ["alice-key-1", "alice-key-2"]

[tenants.bob]
keys = ["bob-key"]

[tenants.small]
keys = ["small-key"]
max_sessions = 1
"""


def bearer(token: str) -> dict:
    """The Authorization header for a key or token."""
    return {"Authorization": f"Bearer {token}"}


ALICE, BOB, SMALL, ADMIN = bearer("alice-key-1"), bearer("bob-key"), bearer("small-key"), bearer("admin-secret-token")


async def start(aiohttp_client, make_config, tmp_path, *, tenants: str | None = None, procstats=None, **overrides):
    """A test client on a running app; ``tenants`` is the text of a tenants file (None: dev mode)."""
    if tenants is not None:
        path = tmp_path / "tenants.toml"
        path.write_text(tenants)
        overrides["tenants"] = path
    app = create_app(make_config(**overrides))
    if procstats is not None:
        app[PROCSTATS] = procstats
    return await aiohttp_client(app)


def supervisor_of(client):
    """The Supervisor behind a test client."""
    return client.server.app[SUPERVISOR]


async def json_of(response, status: int) -> dict:
    """Assert the status and return the JSON body (the body shows in the failure message)."""
    body = await response.json()
    assert response.status == status, body
    return body


async def assert_error(response, status: int, code: str) -> dict:
    """Assert a JSON error with this status and code."""
    body = await json_of(response, status)
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body


def session_of(client, session_id: str, headers=None):
    """The supervisor's session ``session_id`` of the tenant ``headers`` authenticate as (ids are per tenant)."""
    auth = client.app[AUTH]
    token = (headers or {}).get("Authorization", "").partition(" ")[2] or None
    tenant = DEV_TENANT if auth.dev_mode else auth.tenant_for(token)
    return supervisor_of(client).sessions[session_key(tenant, session_id)]


async def started_sleep(client, session_id: str, *, headers=None, seconds: int = 600) -> asyncio.Task:
    """Start a ``sleep`` mcp-command and return its call once the session is busy with it."""
    created = await client.post("/api/sessions", json={"session_id": session_id}, headers=headers)
    assert created.status in (200, 201), await created.text()
    sup = supervisor_of(client)
    session = session_of(client, session_id, headers)
    call = asyncio.ensure_future(client.post(
        "/api/mcp-command", json={"command": "sleep", "args": {"seconds": seconds}, "session_id": session_id},
        headers=headers,
    ))
    await wait_for_state(sup, session, "busy", timeout=30)
    return call


async def interrupted(client, call: asyncio.Task, path: str, **kwargs):
    """Interrupt a started turn through ``path``; return the waiting call's response."""
    response = await client.post(path, **kwargs)
    body = await json_of(response, 200)
    assert body["interrupted"] is True, body
    return await asyncio.wait_for(call, 30)
