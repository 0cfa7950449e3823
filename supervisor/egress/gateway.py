"""The egress gateway: the agents' one way out of their network namespace, served by the supervisor's loop.

Its listening socket was made inside the agents' namespace by the zygote (agent_proc/netns.py) and
handed over; the supervisor accepts on it here. Three kinds of request, one per connection:

- ``CONNECT host:port`` (HTTPS through a proxy): a tunnel to a checked address;
- an absolute-URI request (``GET http://host/path``: plain HTTP through a proxy), forwarded;
- ``/u/<token>/<name>/...`` (a declared upstream, supervisor/egress/upstreams.py): forwarded to the
  upstream's real URL with its headers added, over verified TLS when it is https.

Every request names its spawn's token (Proxy-Authorization, or the upstream path): without a live
one it is refused (407) before anything is resolved. Names are resolved here, off the loop, every
address is checked against the session's tenant's policy, and the connection goes to a checked
address. Refusals are logged (``egress_denied``) and counted with the bytes and requests.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections import OrderedDict
from urllib.parse import urlsplit

from corral.agent_proc.netns import PROXY_VARIABLES
from corral.supervisor.egress import heads
from corral.supervisor.egress.heads import HEAD_LIMIT, BadHead
from corral.supervisor.egress.policy import Policy
from corral.supervisor.egress.splice import FarSide, connect, splice
from corral.supervisor.egress.upstreams import Upstream, client_tls, env_name
from corral.supervisor.egress.grants import Grant, Grants
from corral.supervisor.logs import get_logger

__all__ = ["Gateway", "TenantEgress", "Refused"]

log = get_logger(component="egress")

HEAD_TIMEOUT = 10.0  # seconds to send one
# Connections that have not sent their head yet, across all agents (no token says whose they are):
# past this, the oldest is cut, so a flood of silent connections costs bounded memory and a client
# that sends its head at once (every real one) is never the one cut.
MAX_PENDING = 4096
CONNECT_TIMEOUT = 10.0  # seconds to resolve and connect
CLOSE_TIMEOUT = 30.0  # seconds the agent has to take the end of an answer before its connection is cut
MAX_OPEN = 32  # connections one agent process may hold through the gateway at once (each ~1 MB of buffers at worst)
UPSTREAM_PREFIX = "/u/"


class Refused(Exception):
    """A request the gateway answers itself: status, error code, message."""

    def __init__(self, status: int, code: str, message: str, extra=()):
        super().__init__(message)
        self.status, self.code, self.extra = status, code, tuple(extra)

    def answer(self) -> bytes:
        """The HTTP answer."""
        return heads.response(self.status, self.code, str(self), self.extra)


class TenantEgress:
    """A tenant's own rules and upstreams (from the tenants file), over the server's."""

    def __init__(self, allow=(), deny=(), upstreams: dict[str, Upstream] | None = None):
        self.allow, self.deny, self.upstreams = tuple(allow), tuple(deny), dict(upstreams or {})


class Gateway:
    """Serves the agents' listener; issues and revokes the per-spawn tokens; counts."""

    def __init__(self, policy: Policy, upstreams: dict[str, Upstream] | None = None, *,
                 tenants: dict[str, TenantEgress] | None = None, tls=None, on_denied=None, on_count=None):
        self.policy = policy
        self.upstreams = dict(upstreams or {})
        self.tenants = dict(tenants or {})
        self.policies = {name: policy.with_rules(t.allow, t.deny) for name, t in self.tenants.items()}
        self.tls = tls or client_tls()  # for https upstreams: verified, the system's CAs unless told
        self.grants = Grants(on_count)  # on_count(session_id, tenant, field, amount) for each count, if given
        self.on_denied = on_denied  # called with (session_id, tenant, destination, reason) on every refusal
        self.server: asyncio.AbstractServer | None = None
        self.port: int | None = None
        self.clients: set[asyncio.StreamWriter] = set()
        self.pending: OrderedDict[asyncio.StreamWriter, None] = OrderedDict()  # no head yet, oldest first

    # ------------------------------------------------------------ the listener and the grants

    async def serve(self, sock: socket.socket) -> None:
        """Serve a listener the zygote made in the agents' namespace (a new one replaces the last)."""
        if self.server is not None:
            self.server.close()
        self.port = sock.getsockname()[1]
        self.server = await asyncio.start_server(self._connection, sock=sock, limit=HEAD_LIMIT)

    def address(self) -> str | None:
        """Where agents reach the gateway (inside their namespace)."""
        return None if self.port is None else f"127.0.0.1:{self.port}"

    def grant(self, session_id: str, tenant: str) -> tuple[str, dict[str, str]]:
        """A token for one spawn and the environment that carries it: the proxy variables, the upstreams' URLs."""
        grant = self.grants.issue(session_id, tenant)
        base = f"127.0.0.1:{self.port}"
        proxy = f"http://corral:{grant.token}@{base}"
        # NO_PROXY empty: nothing bypasses the proxy; a loopback rule means the host's loopback,
        # reached through the gateway; an upstream URL asked through the proxy comes back here (_own_target).
        env = {name: "" if name.lower() == "no_proxy" else proxy for name in PROXY_VARIABLES}
        for name in self._upstreams(tenant):
            env[env_name(name)] = f"http://{base}{UPSTREAM_PREFIX}{grant.token}/{name}"
        return grant.token, env

    def revoke(self, token: str) -> None:
        """The spawn is gone: its token opens nothing any more."""
        self.grants.revoke(token)

    def counters_for(self, session_id: str, tenant: str) -> dict | None:
        """A session's egress counts (bytes_in, bytes_out, requests, refused), live or recently ended; None if none."""
        usage = self.grants.session_usage(session_id, tenant)
        return None if usage is None else usage.as_dict()

    def tenant_counters(self) -> dict[str, dict]:
        """Every tenant's egress counts since start."""
        return {tenant: usage.as_dict() for tenant, usage in self.grants.tenants.items()}

    def describe(self) -> dict:
        """What /health shows: where the gateway listens, the upstreams' names, the rule counts."""
        return {"address": self.address(), "upstreams": sorted(self.upstreams),
                "allow_rules": len(self.policy.allow), "deny_rules": len(self.policy.deny),
                "tenants_with_rules": sorted(self.tenants)}

    async def close(self) -> None:
        """Stop accepting and cut every open connection."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.clients):
            writer.transport.abort()

    def _upstreams(self, tenant: str) -> dict[str, Upstream]:
        """The upstreams a tenant's agents see: the server's, a tenant's own of the same name winning."""
        own = self.tenants.get(tenant)
        return {**self.upstreams, **own.upstreams} if own else self.upstreams

    # ------------------------------------------------------------ one connection

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read one request head and answer it: a tunnel, a forward, an upstream, or a refusal."""
        self.clients.add(writer)
        self.pending[writer] = None
        if len(self.pending) > MAX_PENDING:
            self.pending.popitem(last=False)[0].transport.abort()
        try:
            await self._serve_one(reader, writer)
        except Refused as exc:
            with contextlib.suppress(OSError):
                writer.write(exc.answer())
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass  # either side went away
        finally:
            self.clients.discard(writer)
            self.pending.pop(writer, None)
            await _close(writer)

    async def _serve_one(self, reader, writer) -> None:
        """Dispatch a request by its kind."""
        try:
            head = await _read_head(reader)
        finally:
            self.pending.pop(writer, None)
        head.target = self._own_target(head.target)
        if head.target.startswith(UPSTREAM_PREFIX):
            await self._upstream(head, reader, writer)
            return
        grant = self.grants.find(heads.proxy_token(head))
        if grant is None:
            raise Refused(407, "proxy_auth_required", "this gateway needs the token of a live session "
                          "(use the HTTP_PROXY the agent was started with)",
                          (("Proxy-Authenticate", 'Basic realm="corral"'),))
        with _holding(grant):
            if head.method == "CONNECT":
                await self._tunnel(grant, head, reader, writer)
            else:
                await self._forward(grant, head, reader, writer)

    def _own_target(self, target: str) -> str:
        """An absolute URI naming the gateway itself (an upstream URL asked through the proxy) in origin form."""
        prefix = f"http://127.0.0.1:{self.port}/"
        return target[len(prefix) - 1:] if target.startswith(prefix) else target

    async def _tunnel(self, grant: Grant, head: heads.Head, reader, writer) -> None:
        """CONNECT: a checked connection, then bytes both ways."""
        try:
            host, port = heads.split_target(head.target)
        except BadHead as exc:
            raise Refused(400, "bad_request", str(exc)) from None
        far = await self._open(grant, writer, host, port)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await splice(far, reader)

    async def _forward(self, grant: Grant, head: heads.Head, reader, writer) -> None:
        """An absolute-URI request for plain HTTP, sent on in origin form to a checked address."""
        parts = urlsplit(head.target)
        if parts.scheme != "http" or not parts.hostname:
            raise Refused(400, "bad_request", "a proxy request needs an absolute http:// URI (https goes by CONNECT)")
        try:
            port = parts.port or 80
        except ValueError:
            raise Refused(400, "bad_request", f"bad port in {head.target!r}") from None
        far = await self._open(grant, writer, parts.hostname, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        _send_head(far, heads.request_head(head.method, target, head.forwarded()))
        await splice(far, reader, rewrite_head=True)

    async def _upstream(self, head: heads.Head, reader, writer) -> None:
        """``/u/<token>/<name>/rest``: to the declared upstream, its headers added, TLS when https."""
        token, _, rest = head.target[len(UPSTREAM_PREFIX):].partition("/")
        grant = self.grants.find(token)
        if grant is None:
            raise Refused(407, "proxy_auth_required", "no live session has this upstream URL")
        name, _, rest = rest.partition("/")
        upstream = self._upstreams(grant.tenant).get(name)
        if upstream is None:
            raise Refused(404, "unknown_upstream", f"no upstream {name!r} is declared for this tenant")
        if {".", ".."} & set(rest.partition("?")[0].split("/")):
            raise Refused(400, "bad_request", "an upstream path stays under the upstream's URL (no . or .. segments)")
        with _holding(grant):
            await self._to_upstream(grant, upstream, head, f"{upstream.path}/{rest}", reader, writer)

    async def _to_upstream(self, grant: Grant, upstream: Upstream, head: heads.Head, target: str, reader, writer) -> None:
        """Send a request on to an upstream (``target``: its path there) and splice its answer back."""
        far = await self._open(grant, writer, upstream.host, upstream.port, upstream=upstream)
        replaced = frozenset(k.lower() for k, _ in upstream.headers) | {"host"}
        host = upstream.host if upstream.port in (80, 443) else f"{upstream.host}:{upstream.port}"
        headers = [("Host", host), *head.forwarded(replaced), *upstream.headers]
        _send_head(far, heads.request_head(head.method, target, headers))
        await splice(far, reader, rewrite_head=True)

    # ------------------------------------------------------------ resolving and checking

    async def _open(self, grant: Grant, agent: asyncio.StreamWriter, host: str, port: int, *,
                    upstream: Upstream | None = None) -> FarSide:
        """Resolve ``host``, check every address (a declared upstream is exempt), connect to a checked one."""
        policy = self.policies.get(grant.tenant, self.policy)
        if upstream is None:
            self._check(grant, host, port, policy.refuse_name(host, port))
        addresses = await _resolve(host, port)
        if upstream is None:
            for address in addresses:
                self._check(grant, host, port, policy.refuse(host, address, port))
        tls = None if upstream is None or upstream.scheme != "https" else self.tls
        return await _connect_first(addresses, port, grant, agent, tls=tls,
                                    server_hostname=upstream.host if tls else None)

    def _check(self, grant: Grant, host: str, port: int, reason: str | None) -> None:
        """Log, count and refuse when the policy gave a reason."""
        if reason is None:
            return
        grant.count("refused")
        log.warning("egress_denied", session_id=grant.session_id, tenant=grant.tenant,
                    destination=f"{host}:{port}", reason=reason)
        if self.on_denied is not None:
            self.on_denied(grant.session_id, grant.tenant, f"{host}:{port}", reason)
        raise Refused(403, "egress_denied", f"{host}:{port} is not allowed: {reason}")


async def _resolve(host: str, port: int) -> list[str]:
    """The addresses of a name (resolved off the loop), or the address itself (no thread hop for a literal)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as exc:
        raise Refused(502, "egress_unresolved", f"cannot resolve {host}: {exc}") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


@contextlib.contextmanager
def _holding(grant: Grant):
    """Count one request and hold one of the spawn's connections while it runs; 503 past MAX_OPEN."""
    if grant.open >= MAX_OPEN:
        raise Refused(503, "egress_busy", f"an agent holds at most {MAX_OPEN} connections through the gateway",
                      (("Retry-After", "1"),))
    grant.count("requests")
    grant.open += 1
    try:
        yield
    finally:
        grant.open -= 1


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close after what is queued for the agent is sent; cut it if the agent does not read it in time."""
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
    writer.transport.abort()


async def _read_head(reader: asyncio.StreamReader) -> heads.Head:
    """The request head, within its time and size bounds."""
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
    except asyncio.LimitOverrunError:
        raise Refused(431, "head_too_large", f"a request head is at most {HEAD_LIMIT} bytes") from None
    except asyncio.TimeoutError:
        raise Refused(400, "bad_request", f"no request head within {HEAD_TIMEOUT:g}s") from None
    try:
        return heads.parse_request(raw)
    except BadHead as exc:
        raise Refused(400, "bad_request", str(exc)) from None


async def _connect_first(addresses, port: int, grant: Grant, agent, *, tls=None, server_hostname=None) -> FarSide:
    """A connection to the first checked address that answers (each tried in turn)."""
    problem = None
    for address in addresses:
        try:
            return await asyncio.wait_for(connect(address, port, grant, agent, tls=tls,
                                                  server_hostname=server_hostname), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            problem = exc
    raise Refused(502, "egress_unreachable", f"cannot connect to port {port} of {', '.join(addresses)}: {problem!r}")


def _send_head(far: FarSide, head: bytes) -> None:
    """Send a request head on, counted as the agent's bytes out."""
    far.transport.write(head)
    far.grant.count("bytes_out", len(head))
