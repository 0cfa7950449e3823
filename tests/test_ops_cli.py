"""``corral top --once`` and ``corral sessions`` against a live server, as separate processes."""

import asyncio
import json
import os
import sys
import uuid

import psutil
from rich.console import Console

from tests.conftest import wait_for_state
from corral.web.app import create_app
from corral.web.keys import SUPERVISOR
from corral.web.ops_cli import AdminClient, rich_table

TOKEN = "ops-test-admin-token"
LIMITS = dict(cpu_limit=0.5, max_pids=32, max_open_files=256)


async def corral(*args: str, env_token: str | None = None) -> tuple[int, str, str]:
    """Run the ``corral`` command in a child process; (exit code, stdout, stderr)."""
    env = {**os.environ, "CORRAL_ADMIN_TOKEN": env_token or ""}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from corral.web.cli import main; sys.exit(main())", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def start_server(aiohttp_server, make_config):
    """A live server with an admin token and two sessions of two tenants."""
    app = create_app(make_config(admin_token=TOKEN, **LIMITS))
    server = await aiohttp_server(app)
    sup = app[SUPERVISOR]
    sessions = []
    for sid, tenant in (("top-one", "acme"), ("top-two", "globex")):
        s = await sup.get_or_create(sid, tenant)
        await sup.ensure_live(s)
        sessions.append(s)
    return server, sup, sessions


def shown_limits(sup, s, dash: str = "-") -> list[str]:
    """CORES, PROCS and FILES of an idle session as top shows them: what this host enforces of LIMITS."""
    controls = sup.limiter.controls
    cores = "0.5" if controls["cpu"].mechanism.startswith("cgroup") else dash  # else nothing holds it
    procs = "1/32" if controls["pids"].mechanism.startswith("cgroup") else f"{dash}/32"  # counted in a pids cgroup only
    return [cores, procs, f"{psutil.Process(s.pid).num_fds()}/256"]


async def test_top_once_shows_the_live_sessions_and_their_limits(aiohttp_server, make_config):
    server, sup, sessions = await start_server(aiohttp_server, make_config)
    url = str(server.make_url("/"))
    code, out, err = await corral("top", "--once", "--url", url, env_token=TOKEN)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["SESSION", "PID", "TENANT", "STATE", "IDLE", "RSS", "USS", "CPU%",
                                "CORES", "PROCS", "FILES", "MSGS", "NODE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"top-one", "top-two"}
    for s in sessions:
        assert rows[s.id][1:4] == [str(s.pid), s.tenant, "idle"]
        assert rows[s.id][5].endswith("M")  # RSS of a real process, in MiB
        assert rows[s.id][8:11] == shown_limits(sup, s)
        assert rows[s.id][12] == sup.node


async def test_the_live_table_fits_80_columns_and_never_cuts_a_number(aiohttp_server, make_config):
    server, sup, sessions = await start_server(aiohttp_server, make_config)
    long_id = await sup.get_or_create(str(uuid.uuid4()), "a-tenant-with-a-long-name")
    await sup.ensure_live(long_id)
    client = AdminClient(str(server.make_url("/")), TOKEN)
    rows = await asyncio.to_thread(client.sessions, state="live")
    console = Console(width=80, record=True, color_system=None, file=open(os.devnull, "w"))
    console.print(rich_table(rows, client.url, "mem"))
    text = console.export_text()
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    assert f"({sup.node}) — 3 live," in lines[0]
    header = next(line.split() for line in lines if line.startswith("SESSION"))
    assert header[-4:] == ["CORES", "PROCS", "FILES", "MSGS"]  # no NODE: the title names the one node
    for s in [*sessions, long_id]:
        (line,) = [line for line in lines if f" {s.pid} " in line]
        assert line.split()[-4:-1] == shown_limits(sup, s), line
    assert any(line.startswith(long_id.id[:8]) and "…" in line for line in lines)  # the id gave way, not a number


async def test_sessions_list_and_kill(aiohttp_server, make_config):
    server, sup, (one, two) = await start_server(aiohttp_server, make_config)
    url = str(server.make_url("/"))
    code, out, err = await corral("sessions", "list", "--json", "--url", url, "--admin-token", TOKEN)
    assert code == 0, err
    listed = {row["session_id"]: row for row in json.loads(out)}
    assert listed["top-one"]["pid"] == one.pid and listed["top-two"]["tenant"] == "globex"

    code, out, err = await corral("sessions", "kill", "top-one", "--url", url, "--admin-token", TOKEN)
    assert code == 0, err
    assert out.startswith("top-one ")
    assert await wait_for_state(sup, one, {"killed"}) == "killed"
    assert two.state == "idle"


async def test_refused_token_is_one_line(aiohttp_server, make_config):
    server, _, _ = await start_server(aiohttp_server, make_config)
    code, out, err = await corral("top", "--once", "--url", str(server.make_url("/")), "--admin-token", "wrong")
    assert code == 1 and out == ""
    assert err.startswith("corral: GET /admin/sessions: 401") and len(err.strip().splitlines()) == 1


async def test_usage_prints_a_row_per_tenant(aiohttp_server, make_config):
    """``corral usage`` prints each tenant's starts, turns and ends from GET /admin/usage; --tenant narrows it."""
    server, sup, (one, two) = await start_server(aiohttp_server, make_config)
    await sup.chat(one, "hello")
    await sup.stop(two, "ended")
    url = str(server.make_url("/"))
    code, out, err = await corral("usage", "--since", "1h", "--url", url, "--admin-token", TOKEN)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["TENANT", "STARTS", "TURNS", "IN"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if "ends:" not in line}
    assert rows["acme"][1:3] == ["1", "1"] and rows["globex"][1:3] == ["1", "0"]
    assert "globex ends: ended 1" in lines
    code, out, err = await corral("usage", "--tenant", "acme", "--json", "--url", url, "--admin-token", TOKEN)
    assert code == 0, err
    assert list(json.loads(out)["tenants"]) == ["acme"]
    code, out, err = await corral("usage", "--since", "soon", "--url", url, "--admin-token", TOKEN)
    assert code == 1 and "since" in err and "Traceback" not in err
