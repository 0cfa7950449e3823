"""The agents' own network namespace and the egress gateway (docs/security.md#network).

Hostile agents (tests/agents/network.py) in real sessions try the host's services directly and
listen where the host's clients connect; through the gateway they reach an allowed origin (a real
server on loopback) with urllib, httpx and aiohttp, are refused what the policy refuses (logged,
counted), tunnel with CONNECT, and reach declared upstreams whose credential only the gateway
holds (one over TLS with a CA the test makes). The gateway's policy corners are tried on the
gateway itself, served on a loopback listener, with raw sockets.
"""

import asyncio
import base64
import json
import os
import socket

import pytest
from corral.supervisor.egress import Gateway, build_gateway, tenant_egress
from corral.supervisor.egress.policy import Policy, parse_rule
from corral.supervisor.egress.upstreams import build_upstreams, client_tls
from tests.egress_kit import echo_app, echoed, make_ca, server_tls
from tests.test_sandbox import shared_dir, unprivileged_uid  # noqa: F401  fixtures
from tests.test_userns import python_for_user, user_namespaces  # noqa: F401  fixtures

AGENT = "tests.agents.network:NetworkProbe"
SECRET = "sk-only-the-gateway-knows"


async def command(sup, s, name, **args):
    """An agent command's reply."""
    return (await sup.command(s, name, args))["reply"]


def needs_namespace(sup):
    """Skip where this host gives agents no network namespace (the layer's reason says why)."""
    row = sup.sandbox.layers.get("network", {})
    if not row.get("in_force"):
        pytest.skip(f"no network namespace for agents here: {row.get('reason')}")


@pytest.fixture
async def origin(aiohttp_server):
    """A plain-HTTP server on the host's loopback that echoes what it receives."""
    return await aiohttp_server(echo_app())


@pytest.fixture
def ca(tmp_path):
    """A CA of the test's own, and a certificate for localhost / 127.0.0.1 it signed."""
    return make_ca(tmp_path)


@pytest.fixture
async def tls_origin(aiohttp_server, ca):
    """The echo server over TLS with the test CA's certificate."""
    return await aiohttp_server(echo_app(), ssl=server_tls(ca))


@pytest.fixture
async def sup(make_supervisor, origin):
    """NetworkProbe agents, the origin's port allowed through the gateway."""
    sup = await make_supervisor(agent=AGENT, agent_allow=(f"127.0.0.1:{origin.port}",))
    needs_namespace(sup)
    return sup


# ---------------------------------------------------------------- the namespace


async def test_an_agent_reaches_none_of_the_hosts_services_directly(sup, origin):
    s = await sup.get_or_create("prowler", "t")
    with socket.create_connection(("127.0.0.1", origin.port), timeout=3):
        pass  # the host reaches it: the agent's refusal below is the namespace's doing
    for host, port in (("127.0.0.1", origin.port), ("127.0.0.1", 5432), ("169.254.169.254", 80), ("::1", origin.port)):
        tried = await command(sup, s, "attack", what="tcp", host=host, port=port)
        assert not tried["escaped"], (host, port, tried)
    env = await command(sup, s, "env")
    assert env["HTTP_PROXY"].startswith("http://corral:") and env["HTTP_PROXY"] == env["https_proxy"]
    assert sup.health()["sandbox"]["layers"]["network"] == {
        "in_force": True, "detail": sup.sandbox.layers["network"]["detail"], "mode": "proxy",
        "gateway": sup.gateway.address()}
    assert sup.health()["egress"] == {"address": sup.gateway.address(), "upstreams": [], "allow_rules": 1,
                                      "deny_rules": 0, "tenants_with_rules": []}


async def test_an_agent_cannot_listen_where_the_hosts_clients_connect(sup, unused_tcp_port):
    s = await sup.get_or_create("listener", "t")
    for host in ("127.0.0.2", "::1"):
        listening = asyncio.ensure_future(command(sup, s, "attack", what="listen", host=host, port=unused_tcp_port,
                                                  wait=0.5))
        refused = 0
        while not listening.done():  # the host's client tries for as long as the agent listens
            try:
                with socket.create_connection((host, unused_tcp_port), timeout=1) as client:
                    client.sendall(b"GET / HTTP/1.1\r\nAuthorization: Bearer client-secret\r\n\r\n")
            except ConnectionRefusedError:
                refused += 1
            await asyncio.sleep(0.05)
        tried = await listening
        assert not tried["escaped"] and "no client" in tried["detail"], tried
        assert refused > 0


# ---------------------------------------------------------------- through the gateway


async def test_the_gateway_takes_urllib_httpx_and_aiohttp_to_an_allowed_destination(sup, origin):
    s = await sup.get_or_create("client", "t")
    for client in ("urllib", "httpx", "aiohttp"):
        seen = echoed(await command(sup, s, "fetch", client=client, url=f"http://127.0.0.1:{origin.port}/hi?c={client}"))
        assert seen["path"] == f"/hi?c={client}"
        assert "Proxy-Authorization" not in seen["headers"]  # the token stays at the gateway
    counts = sup.gateway.counters_for("client", "t")
    assert counts["requests"] == 3 and counts["refused"] == 0 and counts["bytes_in"] > 0 and counts["bytes_out"] > 0
    assert sup.gateway.tenant_counters()["t"] == counts


async def test_the_gateway_refuses_loopback_link_local_and_names_that_resolve_there(sup, origin, unused_tcp_port):
    s = await sup.get_or_create("refused", "t")
    denied = []  # what the admin event stream sees (each is logged as egress_denied too)
    sup.events.subscribe(denied.append, types={"egress_denied"})
    for url in (f"http://127.0.0.1:{unused_tcp_port}/", "http://169.254.169.254/latest/meta-data/",
                f"http://localhost:{unused_tcp_port}/"):
        answer = await command(sup, s, "fetch", url=url)
        assert answer["status"] == 403 and json.loads(answer["body"])["error"]["code"] == "egress_denied", answer
    tunnel = await command(sup, s, "raw", request="CONNECT 169.254.169.254:443 HTTP/1.1\r\n"
                                                  "Proxy-Authorization: Basic {auth}\r\n\r\n")
    assert tunnel["status_line"].startswith("HTTP/1.1 403"), tunnel
    assert [e["destination"] for e in denied] == [f"127.0.0.1:{unused_tcp_port}", "169.254.169.254:80",
                                                  f"localhost:{unused_tcp_port}", "169.254.169.254:443"]
    assert all(e["session_id"] == "refused" and e["tenant"] == "t" for e in denied)
    assert sup.gateway.counters_for("refused", "t")["refused"] == 4


async def test_connect_tunnels_to_an_allowed_destination_and_a_token_is_needed(sup, origin):
    s = await sup.get_or_create("tunnel", "t")
    request = (f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nProxy-Authorization: Basic {{auth}}\r\n\r\n"
               f"GET /inside HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    tunnel = await command(sup, s, "raw", request=request)
    assert tunnel["status_line"] == "HTTP/1.1 200 Connection established"
    assert '"path": "/inside"' in tunnel["body"]
    for auth in ("", "Proxy-Authorization: Basic " + base64.b64encode(b"corral:not-a-token").decode() + "\r\n"):
        refused = await command(sup, s, "raw", request=f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\n{auth}\r\n")
        assert refused["status_line"].startswith("HTTP/1.1 407") and "Proxy-Authenticate" in refused["head"]


async def test_an_upstream_gets_its_credential_from_the_gateway_over_verified_tls(
        make_supervisor, origin, tls_origin, ca, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    key_file.chmod(0o600)
    sup = await make_supervisor(  # no allow rule: a declared upstream on loopback is reachable anyway
        agent=AGENT, upstream_ca_file=ca["ca"],
        upstream=(f"plain=http://127.0.0.1:{origin.port}/base", f"secure=https://localhost:{tls_origin.port}/v1"),
        upstream_header=(f"plain=Authorization: Bearer file:{key_file}", f"secure=Authorization: Bearer file:{key_file}"))
    needs_namespace(sup)
    s = await sup.get_or_create("llm", "t")
    env = await command(sup, s, "env")
    assert SECRET not in json.dumps(env)
    for name, path in (("PLAIN", "/base/chat?x=1"), ("SECURE", "/v1/chat?x=1")):
        seen = echoed(await command(sup, s, "fetch", url=env[f"CORRAL_UPSTREAM_{name}"] + "/chat?x=1",
                                    headers={"Authorization": "Bearer agent-guess"}, data="hello"))
        assert (seen["path"], seen["method"], seen["body"]) == (path, "POST", "hello")
        assert seen["headers"]["Authorization"] == f"Bearer {SECRET}"  # the agent's own was replaced
    assert seen["secure"] and seen["headers"]["Host"] == f"localhost:{tls_origin.port}"
    # the same through the proxy variables (a client that proxies every URL): the gateway knows its own
    seen = echoed(await command(sup, s, "fetch", client="aiohttp", url=env["CORRAL_UPSTREAM_PLAIN"] + "/again"))
    assert seen["path"] == "/base/again" and seen["headers"]["Authorization"] == f"Bearer {SECRET}"
    unknown = await command(sup, s, "fetch", url=env["CORRAL_UPSTREAM_PLAIN"].rsplit("/", 1)[0] + "/nope/x")
    assert unknown["status"] == 404
    escaping = await command(sup, s, "raw", request=f"GET {env['CORRAL_UPSTREAM_PLAIN']}/../admin HTTP/1.1\r\n\r\n")
    assert escaping["status_line"] == "HTTP/1.1 400 Bad Request"  # the key goes under the declared URL only


async def test_the_mcp_agent_reaches_a_streamable_http_server_through_the_gateway(make_supervisor, monkeypatch):
    from tests.test_mcp_agent import AGENT as MCP_AGENT
    from tests.test_mcp_agent import SERVER

    import subprocess
    import sys

    port = _free_port()
    proc = subprocess.Popen([sys.executable, SERVER, "http", str(port)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:  # uvicorn says when it listens
            if "running on" in line.lower():
                break
        monkeypatch.setenv("CORRAL_MCP_SERVERS", json.dumps({"mcpServers": {"remote": {"url": f"http://127.0.0.1:{port}/mcp"}}}))
        sup = await make_supervisor(agent=MCP_AGENT, request_timeout=60, agent_allow=(f"127.0.0.1:{port}",))
        needs_namespace(sup)
        s = await sup.get_or_create("mcp", "t")
        result = await sup.command(s, "call_tool", {"name": "whoami", "arguments": {}, "server": "remote"})
        assert json.loads(result["reply"]["content"][0]["text"])["pid"] == proc.pid
        assert sup.gateway.counters_for("mcp", "t")["requests"] >= 1
    finally:
        proc.kill()
        proc.wait()


def _free_port() -> int:
    """A port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- the gateway alone


@pytest.fixture
async def gateway():
    """Gateways served on a loopback listener of the test's (the policy is the same wherever it listens)."""
    made = []

    async def make(**kwargs) -> Gateway:
        gw = Gateway(kwargs.pop("policy", Policy()), **kwargs)
        listener = socket.create_server(("127.0.0.1", 0))
        await gw.serve(listener)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        await gw.close()


async def ask(gw: Gateway, request: str) -> tuple[str, str]:
    """Send a raw request to the gateway; its answer's first line and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(request.encode())
    answer = await reader.read()
    writer.close()
    head, _, body = answer.decode("latin-1").partition("\r\n\r\n")
    return head.split("\r\n")[0], body


def proxy_auth(token: str) -> str:
    """The Proxy-Authorization header a client makes of its proxy URL."""
    return "Proxy-Authorization: Basic " + base64.b64encode(f"corral:{token}".encode()).decode() + "\r\n"


async def test_tenants_rules_apply_to_their_own_sessions_only(gateway, origin, tmp_path):
    from corral.web.auth import load_tenants

    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[tenants.acme]\nkeys = ["a"]\nagent_allow = ["127.0.0.1:{origin.port}"]\n'
                       f'[tenants.globex]\nkeys = ["g"]\nagent_deny = ["*.example.com"]\n'
                       f'[tenants.globex.upstreams.llm]\nurl = "http://127.0.0.1:{origin.port}/g"\n'
                       f'headers = {{ "X-Key" = "Bearer env:TEST_GLOBEX_KEY" }}\n')
    os.environ["TEST_GLOBEX_KEY"] = "globex-secret"
    try:
        egress = load_tenants(tenants).egress
    finally:
        del os.environ["TEST_GLOBEX_KEY"]
    gw = await gateway(tenants=egress)
    acme, _ = gw.grant("s", "acme")
    globex, globex_env = gw.grant("s", "globex")
    target = f"GET http://127.0.0.1:{origin.port}/x HTTP/1.1\r\nHost: o\r\n"
    assert (await ask(gw, target + proxy_auth(acme) + "\r\n"))[0] == "HTTP/1.1 200 OK"
    assert (await ask(gw, target + proxy_auth(globex) + "\r\n"))[0] == "HTTP/1.1 403 Forbidden"
    line, body = await ask(gw, "CONNECT www.example.com:443 HTTP/1.1\r\n" + proxy_auth(globex) + "\r\n")
    assert line == "HTTP/1.1 403 Forbidden" and "denied by rule *.example.com" in body  # refused before resolving
    assert "CORRAL_UPSTREAM_LLM" in globex_env and "CORRAL_UPSTREAM_LLM" not in gw.grant("t", "acme")[1]
    _, body = await ask(gw, f"GET /u/{globex}/llm/z HTTP/1.1\r\nHost: x\r\n\r\n")
    assert json.loads(body)["headers"]["X-Key"] == "Bearer globex-secret" and json.loads(body)["path"] == "/g/z"
    with pytest.raises(ValueError, match=r"\[tenants.bad\]: .*agent_allow"):
        tenant_egress({"agent_allow": "not a list"}, "[tenants.bad]")


async def test_a_revoked_token_opens_nothing_and_an_untrusted_tls_upstream_is_refused(gateway, tls_origin, origin):
    upstreams = build_upstreams([f"secure=https://localhost:{tls_origin.port}"], [])
    gw = await gateway(upstreams=upstreams, tls=client_tls(None))  # the system's CAs: not the test's
    token, env = gw.grant("s", "t")
    line, body = await ask(gw, f"GET /u/{token}/secure/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert line == "HTTP/1.1 502 Bad Gateway" and "CERTIFICATE_VERIFY_FAILED" in body
    gw.revoke(token)
    line, _ = await ask(gw, f"GET /u/{token}/secure/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert line.startswith("HTTP/1.1 407")
    assert gw.counters_for("s", "t")["requests"] == 1  # kept after the spawn is gone, for billing
    line, _ = await ask(gw, "NOT HTTP\r\n\r\n")
    assert line == "HTTP/1.1 400 Bad Request"


def test_rules_parse_every_form_and_refuse_nonsense():
    policy = Policy([parse_rule("10.1.0.0/16"), parse_rule("*.corp.example"), parse_rule("[::1]:8080")],
                    [parse_rule("secret.corp.example")], frozenset({"8.8.4.4"}))
    assert policy.refuse("db.corp.example", "10.2.0.1", 5432) is None  # named by its rule
    assert policy.refuse("x", "10.1.2.3", 22) is None
    assert "denied by rule" in policy.refuse("secret.corp.example", "10.1.2.3", 443)
    assert policy.refuse("x", "::1", 8080) is None and "loopback" in policy.refuse("x", "::1", 8081)
    assert "host address" in policy.refuse("x", "8.8.4.4", 80)
    for address, word in (("100.64.0.1", "cgnat"), ("fe80::1", "link-local"), ("224.0.0.1", "multicast"),
                          ("0.0.0.0", "unspecified"), ("::ffff:127.0.0.1", "loopback"), ("fd12::1", "private")):
        assert word in policy.refuse("x", address, 80), address
    assert policy.refuse("example.org", "93.184.215.14", 443) is None
    for bad in ("http://x", "a..b", "host:99999", "*.", ""):
        with pytest.raises(ValueError):
            parse_rule(bad)


def test_the_network_flags_reach_the_gateway(monkeypatch, tmp_path):
    from corral.web.cli import build_parser, config_from

    monkeypatch.setenv("UP_KEY", "k")
    args = build_parser().parse_args([
        "serve", "--agent-allow", "10.0.0.0/8", "--agent-allow", "*.corp.example", "--agent-deny", "evil.example",
        "--upstream", "openai=https://api.openai.com/v1", "--upstream-header", "openai=Authorization: Bearer env:UP_KEY"])
    config = config_from(args, environ={"CORRAL_AGENT_DENY": "ignored.example"})
    assert (config.agent_network, config.agent_allow, config.agent_deny) == (
        "proxy", ("10.0.0.0/8", "*.corp.example"), ("evil.example",))
    gw = build_gateway(config)
    assert gw.upstreams["openai"].headers == (("Authorization", "Bearer k"),)
    assert config_from(build_parser().parse_args(["serve"]), environ={"CORRAL_AGENT_ALLOW": "a.example, 10.0.0.1:80"}
                       ).agent_allow == ("a.example", "10.0.0.1:80")
    for bad in (["--agent-allow", "http://x"], ["--upstream", "nourl"], ["--upstream-header", "x=novalue"],
                ["--agent-network", "on"]):
        with pytest.raises(SystemExit):
            config_from(build_parser().parse_args(["serve", *bad]), environ={})
    monkeypatch.delenv("UP_KEY")
    with pytest.raises(ValueError, match="UP_KEY"):
        build_gateway(config)


async def test_host_mode_is_shown_with_its_reason(make_supervisor):
    sup = await make_supervisor(agent_network="host")
    row = sup.health()["sandbox"]["layers"]["network"]
    assert not row["in_force"] and row["mode"] == "host" and sup.gateway is None
    assert "share the host's network" in row["reason"]


async def test_admin_rows_and_metrics_show_egress_per_session_and_per_tenant(aiohttp_client, make_config, tmp_path, origin):
    from tests.apihelpers import ADMIN, ALICE, TENANTS, json_of, start, supervisor_of

    client = await start(aiohttp_client, make_config, tmp_path, tenants=TENANTS, agent=AGENT,
                         agent_allow=(f"127.0.0.1:{origin.port}",), metrics_token="metrics-token")
    sup = supervisor_of(client)
    needs_namespace(sup)
    for url in (f"http://127.0.0.1:{origin.port}/one", "http://169.254.169.254/"):
        answered = await json_of(await client.post("/api/mcp-command", headers=ALICE, json={
            "command": "fetch", "args": {"url": url}, "session_id": "counted"}), 200)
        assert answered["result"]["status"] in (200, 403)
    row = await json_of(await client.get("/admin/sessions/counted", headers=ADMIN), 200)
    assert row["egress"]["requests"] == 2 and row["egress"]["refused"] == 1 and row["egress"]["bytes_in"] > 0
    metrics = await (await client.get("/metrics", headers={"Authorization": "Bearer metrics-token"})).text()
    assert 'corral_tenant_egress_refused_total{tenant="alice"} 1.0' in metrics
    assert f'corral_tenant_egress_bytes_total{{direction="in",tenant="alice"}} {float(row["egress"]["bytes_in"])}' in metrics
    assert "counted" not in metrics  # never a series per session


async def test_an_agent_past_its_connections_gets_503_with_retry_after(gateway, origin, monkeypatch):
    from corral.supervisor.egress import gateway as gateway_module

    monkeypatch.setattr(gateway_module, "MAX_OPEN", 1)
    gw = await gateway(policy=Policy([parse_rule(f"127.0.0.1:{origin.port}")]))
    token, _ = gw.grant("s", "t")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n{proxy_auth(token)}\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")  # held open: the one allowed
    line, body = await ask(gw, f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\n{proxy_auth(token)}\r\n")
    assert line == "HTTP/1.1 503 Service Unavailable" and json.loads(body)["error"]["code"] == "egress_busy"
    writer.close()


# ---------------------------------------------------------------- a real unprivileged server


async def test_an_unprivileged_servers_agents_are_in_their_own_network_namespace(
        user_namespaces, unprivileged_uid, python_for_user, shared_dir, origin):
    from tests.chaos_kit import call, client_session
    from tests.unprivileged_kit import serve_as_user

    async def agent(http, name, **args):
        status, body = await call(http, "POST", url + "/api/mcp-command", json={"command": name, "args": args,
                                                                                 "session_id": "u"})
        assert status == 200, body
        return body["result"]

    home = shared_dir / "server"
    home.mkdir()
    proc, url = await asyncio.to_thread(serve_as_user, unprivileged_uid, python_for_user, home, "--agent", AGENT,
                                        "--agent-allow", f"127.0.0.1:{origin.port}")
    try:
        async with client_session() as http:
            _, health = await call(http, "GET", url + "/health")
            row = health["sandbox"]["layers"]["network"]
            assert row["in_force"] and row["mode"] == "proxy" and row["gateway"], row
            port = url.rsplit(":", 1)[1]
            for host, target in (("127.0.0.1", origin.port), ("127.0.0.1", port)):  # the origin, corral's own port
                assert not (await agent(http, "attack", what="tcp", host=host, port=target))["escaped"]
            fetched = await agent(http, "fetch", url=f"http://127.0.0.1:{origin.port}/through")
            assert echoed(fetched)["path"] == "/through"
    finally:
        proc.terminate()
        proc.wait()


async def test_silent_connections_are_cut_oldest_first_and_a_smuggled_line_is_refused(gateway, origin, monkeypatch):
    from corral.supervisor.egress import gateway as gateway_module

    monkeypatch.setattr(gateway_module, "MAX_PENDING", 2)
    gw = await gateway(policy=Policy([parse_rule(f"127.0.0.1:{origin.port}")]))
    token, _ = gw.grant("s", "t")
    silent = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(3)]
    assert await asyncio.wait_for(silent[0][0].read(), 5) == b""  # the oldest is cut ...
    line, _ = await ask(gw, f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: o\r\n{proxy_auth(token)}\r\n")
    assert line == "HTTP/1.1 200 OK"  # ... and a client that speaks at once is served
    line, body = await ask(gw, f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\n{proxy_auth(token)}"
                               "X-A: 1\nAuthorization: Bearer forged\r\n\r\n")
    assert line == "HTTP/1.1 400 Bad Request" and "bare CR or LF" in body
    for _, writer in silent:
        writer.close()


async def test_the_end_of_a_large_answer_reaches_a_slow_reader_whole(gateway, aiohttp_server):
    from aiohttp import web

    size = 4 * 1024 * 1024

    async def big_answer(request):
        return web.Response(body=b"x" * size)

    app = web.Application()
    app.router.add_get("/big", big_answer)
    big = await aiohttp_server(app)
    gw = await gateway(policy=Policy([parse_rule(f"127.0.0.1:{big.port}")]))
    token, _ = gw.grant("s", "t")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # slower than the origin: the gateway must pause it
    sock.connect(("127.0.0.1", gw.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET http://127.0.0.1:{big.port}/big HTTP/1.1\r\nHost: b\r\n{proxy_auth(token)}\r\n".encode())
    answer = bytearray()
    while chunk := await reader.read(1024):
        answer += chunk
    writer.close()
    assert answer.endswith(b"x" * 1024) and len(answer.partition(b"\r\n\r\n")[2]) == size
