"""Dev mode against a local browser: DNS rebinding and cross-site requests are refused.

Dev mode (no API keys) trusts every loopback client, and a browser on this machine is a loopback
client on behalf of every site it visits. Two holes follow, and both are closed here:

- DNS rebinding: a page on ``evil.example`` re-resolves its name to 127.0.0.1 and reads the API
  as same-origin. Its requests carry ``Host: evil.example``, so a ``Host`` that is not a loopback
  name or address (``localhost``, 127.0.0.0/8, ``[::1]``, with or without a port) is refused.
- Cross-site writes: any page can POST a ``text/plain`` body without a preflight. Browsers send
  ``Origin`` with every such request, so a state-changing request whose ``Origin`` is neither the
  server's own (the built-in pages) nor allowed by ``--cors-origins`` is refused.

Clients that are not browsers (curl, SDKs) send no ``Origin`` and a loopback ``Host``: untouched.
With API keys configured none of this applies: a page cannot get a key to send.
"""

import functools

from aiohttp import web

from corral.web.auth import is_loopback
from corral.web.cors import CorsPolicy
from corral.web.error_responses import error_response
from corral.web.keys import AUTH, CONFIG

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def host_name(host: str) -> str:
    """The name or address of a Host header, without port, brackets or a trailing dot, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.removesuffix(".")


def is_loopback_host(host: str | None) -> bool:
    """Whether a Host header names this machine's loopback (a missing header is not a browser's)."""
    return host is None or is_loopback(host_name(host))


@functools.lru_cache(maxsize=8)
def _policy(origins: tuple[str, ...]) -> CorsPolicy:
    """The CORS policy of a set of origins (one per app, built once)."""
    return CorsPolicy(origins)


def origin_allowed(request: web.Request, origin: str) -> bool:
    """The server's own origin (its built-in pages), or one ``--cors-origins`` allows."""
    own = f"{request.scheme}://{request.headers.get('Host', '')}"
    return origin.lower().rstrip("/") == own.lower() or _policy(request.app[CONFIG].cors_origins).allows(origin)


def browser_refusal(request: web.Request) -> web.Response | None:
    """In dev mode: the 403 for a rebound Host or a foreign Origin on a write, else None."""
    if not request.app[AUTH].dev_mode:
        return None
    host = request.headers.get("Host")
    if not is_loopback_host(host):
        return error_response(
            403, "forbidden_host",
            f"dev mode answers loopback names only (localhost, 127.0.0.1, [::1]), not Host {host[:100]!r}; "
            "configure API keys (--tenants) to serve other names")
    origin = request.headers.get("Origin")
    if origin is not None and request.method in STATE_CHANGING and not origin_allowed(request, origin):
        return error_response(
            403, "forbidden_origin",
            f"dev mode refuses {request.method} from pages of other origins ({origin[:100]!r}); "
            "allow one with --cors-origins")
    return None
