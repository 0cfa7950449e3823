"""Any node serves any session: a request for a session another live node owns is relayed to it.

The supervisor raises ``SessionMoved`` (with the owner's advertised URL) when a request names a
session a live peer holds; this middleware then sends the same request there over one pooled
HTTP connection and answers with the owner's status, headers and body (streamed for SSE). A
relayed request carries ``X-Corral-Forwarded-By`` and is never relayed again: if ownership
moved once more on the way, the client gets 503 ``session_moved`` with ``Retry-After`` instead of a
loop. The balancer's session hashing (deploy/nginx.conf) makes relays rare.
"""

import asyncio
import json

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict

from corral.supervisor import errors
from corral.supervisor.logs import get_logger
from corral.web.keys import CONFIG, ERROR_CODE, OWNER_UNREACHABLE, RAW_BODY, SUPERVISOR

log = get_logger(component="forward")

FORWARDED_BY = "X-Corral-Forwarded-By"
STREAM_PATHS = frozenset({"/api/chat/stream"})
READS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD})
OWNER_UNREACHABLE_CODE = "owner_unreachable"

# headers of one hop (RFC 9110 7.6.1), and the ones aiohttp recomputes for the relayed body
_NOT_RELAYED = frozenset(h.lower() for h in (
    hdrs.CONNECTION, "Keep-Alive", hdrs.PROXY_AUTHENTICATE, hdrs.PROXY_AUTHORIZATION, hdrs.TE,
    hdrs.TRAILER, hdrs.TRANSFER_ENCODING, hdrs.UPGRADE, hdrs.HOST, hdrs.CONTENT_LENGTH,
))


class Pool:
    """One pool of connections to the other nodes, opened on the first forward (a lone node never opens it)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def session(self) -> aiohttp.ClientSession:
        """The client session, made on first use; 503 once the server is shutting down."""
        if self._closed:
            raise errors.Unavailable("the server is shutting down", retry_after=1)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, limit_per_host=64, keepalive_timeout=30),
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def close(self, _app=None) -> None:
        """Close the pool: ends relayed streams, so shutdown does not wait on them."""
        self._closed = True
        if self._session is not None:
            await self._session.close()


POOL = web.AppKey("forward_pool", Pool)


def install(app: web.Application) -> None:
    """Add the relaying middleware (inside the front door) and its connection pool."""
    app.middlewares.append(relay_moved)
    app[POOL] = Pool()
    app.on_shutdown.append(app[POOL].close)  # at shutdown already: it ends relayed streams
    app.cleanup_ctx.append(_pool_open)


async def _pool_open(app: web.Application):
    """The pool's connections live while the app runs (it opens them lazily)."""
    yield
    await app[POOL].close()


@web.middleware
async def relay_moved(request: web.Request, handler):
    """Run the handler; if the session lives on another live node, answer with that node's answer.

    A read (GET) whose owner does not answer (it died, its lease has not run out yet) is answered
    here from the store instead of 503 ``owner_unreachable``.
    """
    try:
        return await handler(request)
    except errors.SessionMoved as moved:
        if moved.owner_url is None or FORWARDED_BY in request.headers:
            raise
        sup = request.app[SUPERVISOR]
        sup.counters["forwards"] += 1
        try:
            if request.path in STREAM_PATHS:  # open as long as the client wants: ended at shutdown
                return await relay(request, moved.owner_url)
            # counted by a stopping server's drain, and answered 503 shutting_down if still waiting at its end
            return await sup.drain.relay(relay(request, moved.owner_url))
        except errors.Unavailable as exc:
            if exc.code != OWNER_UNREACHABLE_CODE or request.method not in READS or request.path in STREAM_PATHS:
                raise
        # a read of a session whose owner died (its lease not yet over): what the store has is the answer
        request[OWNER_UNREACHABLE] = True
        return await handler(request)


async def relay(request: web.Request, owner_url: str) -> web.StreamResponse:
    """Send the request to ``owner_url`` and give its answer back unchanged."""
    body = request.get(RAW_BODY)
    if body is None:
        body = await request.read()
    headers = _relayed_headers(request)
    streaming = request.path in STREAM_PATHS
    # the owner bounds its own turns by request_timeout; this only guards against an owner that hangs
    read = None if streaming else request.app[CONFIG].request_timeout + 10
    try:
        upstream = await request.app[POOL].session.request(
            request.method, owner_url + request.rel_url.raw_path_qs, headers=headers, data=body,
            allow_redirects=False, timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=read))
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        log.warning("forward_failed", owner=owner_url, path=request.path, error=str(exc) or type(exc).__name__)
        raise errors.Unavailable("the node that owns this session is not answering; retry shortly",
                                 retry_after=1, code=OWNER_UNREACHABLE_CODE) from None
    try:
        if streaming and upstream.status == 200:
            return await _relay_stream(request, upstream)
        payload = await upstream.read()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise errors.Unavailable(f"the owning node broke off its answer ({type(exc).__name__})",
                                 retry_after=1, code=OWNER_UNREACHABLE_CODE) from None
    finally:
        upstream.release()
    response = web.Response(status=upstream.status, body=payload, headers=_answer_headers(upstream))
    code = _relayed_error_code(payload) if upstream.status >= 400 else None
    if code is not None:
        response[ERROR_CODE] = code
    return response


def _relayed_headers(request: web.Request) -> CIMultiDict:
    """The client's request headers minus the hop's own, marked as relayed by this node."""
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _NOT_RELAYED)
    headers[FORWARDED_BY] = request.app[SUPERVISOR].node
    return headers


async def follow_stream(request: web.Request, response: web.StreamResponse, owner_url: str) -> None:
    """Relay the owner's event stream into a stream already open here (its session was activated there).

    The owner's stream begins with its own ``state`` snapshot (ids are per node, so no resume);
    it ends when either side goes away, and the client's EventSource reconnects.
    """
    headers = _relayed_headers(request)
    headers.popall("Last-Event-ID", None)
    try:
        upstream = await request.app[POOL].session.get(
            owner_url + request.rel_url.raw_path_qs, headers=headers, allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
    except (aiohttp.ClientError, OSError, errors.Unavailable) as exc:
        log.warning("stream_follow_failed", owner=owner_url, error=str(exc) or type(exc).__name__)
        return
    try:
        if upstream.status == 200:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
    except (ConnectionError, aiohttp.ClientError):
        pass  # the client left, or the owner ended its stream
    finally:
        upstream.release()


def _relayed_error_code(payload: bytes) -> str | None:
    """The ``error.code`` of the owner's JSON error (its own error_response made it): the metrics count it."""
    try:
        code = json.loads(payload)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) and len(code) <= 64 else None


async def live_rows_elsewhere(request: web.Request, tenant: str | None, most: int) -> list[dict]:
    """The live sessions of every other live node, as their own /admin/sessions?state=live lists them.

    Each node answers for its own processes (pid, memory, CPU); a node that does not answer in
    time is left out of this view rather than holding it up.
    """
    query = {"state": "live", "limit": str(min(most, 1000)), **({"tenant": tenant} if tenant else {})}
    answers = await ask_peers(request, "/admin/sessions", query)
    return [row for answer in answers for row in answer.get("sessions", [])]


async def ask_peers(request: web.Request, path: str, query: dict | None = None) -> list[dict]:
    """The JSON answer of every other live node to ``GET path`` (the caller's credentials, local-only).

    A node that does not answer in time, or not with a 200, is left out rather than holding the view up.
    """
    sup = request.app[SUPERVISOR]
    peers = [n["url"] for n in await sup.queries.cluster_nodes() if n.get("alive") and not n.get("self")]
    if not peers:
        return []
    headers = {FORWARDED_BY: sup.node}  # marks the call as local-only: no fan-out from there
    if hdrs.AUTHORIZATION in request.headers:
        headers[hdrs.AUTHORIZATION] = request.headers[hdrs.AUTHORIZATION]

    async def one(url: str) -> dict | None:
        async with request.app[POOL].session.get(url + path, params=query or {}, headers=headers,
                                                 timeout=aiohttp.ClientTimeout(total=5)) as r:
            return await r.json() if r.status == 200 else None

    answers = await asyncio.gather(*(one(url) for url in peers), return_exceptions=True)
    return [answer for answer in answers if isinstance(answer, dict)]


def _answer_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict:
    """The owner's response headers (every Set-Cookie kept) minus the hop's own."""
    return CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in _NOT_RELAYED)


async def _relay_stream(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """Pass an event stream through chunk by chunk until either side goes away."""
    response = web.StreamResponse(status=upstream.status, headers=_answer_headers(upstream))
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
    except (ConnectionError, aiohttp.ClientError):
        pass  # the client left, or the owner ended the stream (it died): the client reconnects
    return response
