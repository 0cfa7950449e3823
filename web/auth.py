"""Who is calling: tenants and their API keys, the admin token, and dev mode.

Tenants come from a TOML file (``--tenants`` / ``CORRAL_TENANTS``)::

    admin_token = "..."            # optional; --admin-token / CORRAL_ADMIN_TOKEN wins

    [tenants.acme]
    keys = ["key-1", "key-2"]
    max_sessions = 20              # optional per-tenant session quota

Requests carry ``Authorization: Bearer <key>``. Keys are compared in constant time and never
logged. With no keys at all the server is in dev mode: every loopback client is tenant
``default``, and the server refuses to bind anywhere but loopback.
"""

import functools
import hashlib
import hmac
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from corral.supervisor.logs import get_logger
from corral.supervisor.settings import http_url
from corral.web.errors import error_response
from corral.web.keys import ADMIN, AUTH, TENANT

log = get_logger(component="auth")

DEV_TENANT = "default"
_TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Paths under /api/ anyone may read (the API description).
PUBLIC_API_PATHS = frozenset({"/api/openapi.json"})


class AuthConfigError(ValueError):
    """A tenants file or auth setting the server cannot start with; the message says why."""


@dataclass
class Auth:
    """The credentials a server accepts."""

    # (sha256 of the key, tenant) pairs: a list, not a dict, so a lookup compares every key, and
    # digests of one length, so the comparison time says nothing about a key's length either
    keys: list[tuple[bytes, str]] = field(default_factory=list, repr=False)
    tenant_limits: dict[str, int] = field(default_factory=dict)
    admin_token: bytes | None = field(default=None, repr=False)
    metrics_token: bytes | None = field(default=None, repr=False)  # None: /metrics is open
    tenant_webhooks: dict[str, tuple[str, ...]] = field(default_factory=dict)  # tenant -> its webhook URLs

    @property
    def dev_mode(self) -> bool:
        """No API keys configured: loopback clients are tenant ``default``."""
        return not self.keys

    def tenant_for(self, token: str | None) -> str | None:
        """The tenant whose key this is, or None; looks at every key whatever matches."""
        if token is None:
            return None
        given = digest(token)
        found = None
        for key, tenant in self.keys:
            if hmac.compare_digest(key, given) and found is None:
                found = tenant
        return found

    def is_admin_token(self, token: str | None) -> bool:
        """Whether this is the admin token (constant time)."""
        return _matches(self.admin_token, token)

    def is_metrics_token(self, token: str | None) -> bool:
        """Whether this is the metrics token (constant time)."""
        return _matches(self.metrics_token, token)


def _matches(kept: bytes | None, token: str | None) -> bool:
    """Whether a token's digest is the kept one (constant time); never when either is missing."""
    if token is None or kept is None:
        return False
    return hmac.compare_digest(kept, digest(token))


def digest(secret: str) -> bytes:
    """The sha256 of a key or token: what is kept and compared."""
    return hashlib.sha256(secret.encode()).digest()


def load_tenants(path: Path) -> tuple[list[tuple[bytes, str]], dict[str, int], str | None, dict[str, tuple[str, ...]]]:
    """Read a tenants TOML file: (key digests, per-tenant session limits, admin token or None, webhook URLs)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise AuthConfigError(f"tenants file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AuthConfigError(f"tenants file {path}: not valid TOML ({exc})") from None
    unknown = set(data) - {"tenants", "admin_token"}
    if unknown:
        raise AuthConfigError(f"tenants file {path}: unknown top-level keys {sorted(unknown)}")
    tenants = data.get("tenants", {})
    if not isinstance(tenants, dict):
        raise AuthConfigError(f"tenants file {path}: [tenants] must be a table of [tenants.NAME] tables")
    keys, limits, webhooks = [], {}, {}
    for name, table in tenants.items():
        where = f"tenants file {path}: [tenants.{name}]"
        tenant_keys, limit = _read_tenant(where, name, table)
        keys.extend((digest(key), name) for key in tenant_keys)
        if limit is not None:
            limits[name] = limit
        if "webhooks" in table:
            webhooks[name] = _read_webhooks(where, table["webhooks"])
    admin = data.get("admin_token")
    if admin is not None and (not isinstance(admin, str) or not admin):
        raise AuthConfigError(f"tenants file {path}: admin_token must be a non-empty string")
    return keys, limits, admin, webhooks


def _read_webhooks(where: str, urls) -> tuple[str, ...]:
    """A tenant's ``webhooks = ["https://...", ...]``."""
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise AuthConfigError(f"{where}: webhooks must be a list of URLs")
    try:
        return tuple(http_url(url) for url in urls)
    except ValueError as exc:
        raise AuthConfigError(f"{where}: webhooks: {exc}") from None


def _read_tenant(where: str, name: str, table) -> tuple[list[str], int | None]:
    """Validate one [tenants.NAME] table: its keys and optional max_sessions."""
    if not _TENANT_NAME.fullmatch(name):
        raise AuthConfigError(f"{where}: tenant names are 1-64 characters of A-Z a-z 0-9 . _ -")
    if not isinstance(table, dict):
        raise AuthConfigError(f"{where}: must be a table with keys = [...]")
    unknown = set(table) - {"keys", "max_sessions", "webhooks"}
    if unknown:
        raise AuthConfigError(f"{where}: unknown settings {sorted(unknown)} (allowed: keys, max_sessions, webhooks)")
    keys = table.get("keys")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise AuthConfigError(f"{where}: keys must be a non-empty list of non-empty strings")
    limit = table.get("max_sessions")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise AuthConfigError(f"{where}: max_sessions must be a positive integer")
    return keys, limit


def auth_from_config(config) -> Auth:
    """Build the server's Auth from ``config.tenants`` and ``config.admin_token``."""
    keys, limits, admin, webhooks = ([], {}, None, {}) if config.tenants is None else load_tenants(config.tenants)
    seen: dict[bytes, str] = {}
    for key, tenant in keys:
        if key in seen:
            raise AuthConfigError(f"the same API key is given to tenants {seen[key]!r} and {tenant!r}")
        seen[key] = tenant
    admin = config.admin_token or admin
    if admin and digest(admin) in seen:
        raise AuthConfigError("the admin token must differ from every tenant key")
    metrics = getattr(config, "metrics_token", None)
    return Auth(keys=keys, tenant_limits=limits, admin_token=digest(admin) if admin else None,
                metrics_token=digest(metrics) if metrics else None, tenant_webhooks=webhooks)


@functools.lru_cache(maxsize=1024)
def is_loopback(host: str | None) -> bool:
    """Whether a bind address or peer address is loopback-only (cached: parsing it is ~6% of a request)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def check_bind(auth: Auth, host: str) -> None:
    """Refuse dev mode (no keys) on anything but a loopback address."""
    if auth.dev_mode and not is_loopback(host):
        raise AuthConfigError(
            f"refusing to serve on {host} without API keys: dev mode (no keys) is allowed only on loopback. "
            "Give a tenants file with keys (--tenants FILE or CORRAL_TENANTS) or bind to 127.0.0.1."
        )


def log_mode(auth: Auth) -> None:
    """Say at start how requests are authenticated (names and counts, never keys)."""
    if auth.dev_mode:
        log.warning(
            "dev_mode",
            detail="no API keys configured: loopback clients only, all as tenant 'default'; "
            + ("the admin API needs the admin token" if auth.admin_token else "the admin API is open to loopback clients"),
        )
        return
    tenants = sorted({tenant for _, tenant in auth.keys})
    log.info("tenants_loaded", tenants=tenants, keys=len(auth.keys), quotas=auth.tenant_limits)
    if auth.admin_token is None:
        log.warning("admin_api_disabled", detail="no admin token configured (--admin-token or admin_token)")


def bearer_token(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def unauthorized(message: str) -> web.Response:
    """A 401 with the Bearer challenge."""
    response = error_response(401, "unauthorized", message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="corral"'
    return response


def _tenant_check(auth: Auth, request: web.Request) -> str | web.Response:
    """The request's tenant, or the 401 to answer with."""
    if auth.dev_mode:
        if not is_loopback(request.remote):
            return unauthorized("dev mode (no API keys configured) accepts loopback clients only")
        return DEV_TENANT
    tenant = auth.tenant_for(bearer_token(request))
    if tenant is None:
        has_key = bearer_token(request) is not None
        return unauthorized("invalid API key" if has_key else "missing API key: send Authorization: Bearer <key>")
    return tenant


def _admin_check(auth: Auth, request: web.Request) -> web.Response | None:
    """None if the request may use the admin API, else the 401 to answer with."""
    if auth.admin_token is not None:
        if auth.is_admin_token(bearer_token(request)):
            return None
        return unauthorized("the admin API needs the admin token: Authorization: Bearer <admin token>")
    if auth.dev_mode and is_loopback(request.remote):
        return None
    if auth.dev_mode:
        return unauthorized("dev mode: the admin API accepts loopback clients only")
    return unauthorized("the admin API is disabled: no admin token is configured")


def may_administer(request: web.Request) -> bool:
    """Whether the request may see what the admin API shows (pids, paths): /health uses it."""
    return _admin_check(request.app[AUTH], request) is None


def _metrics_check(auth: Auth, request: web.Request) -> web.Response | None:
    """None if the request may read /metrics (open unless a metrics token is set), else the 401."""
    token = bearer_token(request)
    if auth.metrics_token is None or auth.is_metrics_token(token) or auth.is_admin_token(token):
        return None
    return unauthorized("/metrics needs the metrics token: Authorization: Bearer <metrics token>")


def refusal(request: web.Request) -> web.Response | None:
    """Authenticate /api/ requests as a tenant, /admin/ requests as the admin, /metrics by its token: the 401, or None."""
    if request.method == "OPTIONS":  # CORS preflights carry no credentials
        return None
    path = request.path
    if path == "/metrics":
        return _metrics_check(request.app[AUTH], request)
    if path.startswith("/admin/"):
        refused = _admin_check(request.app[AUTH], request)
        if refused is not None:
            return refused
        request[ADMIN] = True
    elif path.startswith("/api/") and path not in PUBLIC_API_PATHS:
        tenant = _tenant_check(request.app[AUTH], request)
        if isinstance(tenant, web.Response):
            return tenant
        request[TENANT] = tenant
    return None
