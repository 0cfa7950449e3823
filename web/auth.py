"""Who is calling: tenants and their API keys, the admin token, and dev mode.

Tenants come from a TOML file (``--tenants`` / ``CORRAL_TENANTS``)::

    admin_token = "..."            # optional; --admin-token / CORRAL_ADMIN_TOKEN wins

    [tenants.acme]
    keys = ["key-1", "key-2"]
    max_sessions = 20              # optional per-tenant session quota
    env = { OPENAI_MODEL = "gpt-4o" }  # optional variables this tenant's agents get

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

from corral.agent_proc import environment
from corral.supervisor.egress import TenantEgress, tenant_egress
from corral.supervisor.logs import get_logger
from corral.supervisor.session_keys import DEFAULT_TENANT

from corral.supervisor.settings import http_url
from corral.web.error_responses import error_response
from corral.web.keys import ADMIN, AUTH, TENANT

log = get_logger(component="auth")

DEV_TENANT = DEFAULT_TENANT
_TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Paths under /api/ anyone may read (the API description).
PUBLIC_API_PATHS = frozenset({"/api/openapi.json"})
# A tenant's own egress rules and upstreams (docs/security.md#network)
EGRESS_KEYS = frozenset({"agent_allow", "agent_deny", "upstreams"})


class AuthConfigError(ValueError):
    """A tenants file or auth setting the server cannot start with; the message says why."""


@dataclass
class Auth:
    """The credentials a server accepts."""

    # (sha256 of the key, tenant) pairs: a list, not a dict, so a lookup compares every key, and
    # digests of one length, so the comparison time says nothing about a key's length either
    keys: list[tuple[bytes, str]] = field(default_factory=list, repr=False)
    tenant_limits: dict[str, int] = field(default_factory=dict)
    tenant_env: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)  # variables its agents get
    admin_token: bytes | None = field(default=None, repr=False)
    metrics_token: bytes | None = field(default=None, repr=False)  # None: /metrics is open
    tenant_egress: dict[str, TenantEgress] = field(default_factory=dict, repr=False)  # their rules and upstreams

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


@dataclass
class TenantsFile:
    """What a tenants file says: key digests with their tenant, and per tenant its limits and settings."""

    keys: list[tuple[bytes, str]] = field(default_factory=list)
    limits: dict[str, int] = field(default_factory=dict)  # max_sessions
    envs: dict[str, dict[str, str]] = field(default_factory=dict)  # env its agents get
    egress: dict[str, TenantEgress] = field(default_factory=dict)  # agent_allow / agent_deny / upstreams
    webhooks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    admin: str | None = None  # admin_token


def load_tenants(path: Path) -> TenantsFile:
    """Read a tenants TOML file: every tenant's key digests, session limit, env, egress rules and webhooks."""
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
    found = TenantsFile()
    keys, limits, envs, egress, webhooks = found.keys, found.limits, found.envs, found.egress, found.webhooks
    for name, table in tenants.items():
        where = f"tenants file {path}: [tenants.{name}]"
        tenant_keys, limit = _read_tenant(where, name, table)
        keys.extend((digest(key), name) for key in tenant_keys)
        if limit is not None:
            limits[name] = limit
        if table.get("env"):
            envs[name] = dict(table["env"])
        if EGRESS_KEYS & set(table):
            try:
                egress[name] = tenant_egress(table, where)
            except ValueError as exc:
                raise AuthConfigError(str(exc)) from None
        if "webhooks" in table:
            webhooks[name] = _read_webhooks(where, table["webhooks"])
    admin = data.get("admin_token")
    if admin is not None and (not isinstance(admin, str) or not admin):
        raise AuthConfigError(f"tenants file {path}: admin_token must be a non-empty string")
    found.admin = admin
    return found


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
    allowed = {"keys", "max_sessions", "env", "webhooks"} | EGRESS_KEYS
    unknown = set(table) - allowed
    if unknown:
        raise AuthConfigError(f"{where}: unknown settings {sorted(unknown)} (allowed: {', '.join(sorted(allowed))})")
    _check_env(where, table.get("env", {}))
    keys = table.get("keys")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise AuthConfigError(f"{where}: keys must be a non-empty list of non-empty strings")
    limit = table.get("max_sessions")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise AuthConfigError(f"{where}: max_sessions must be a positive integer")
    return keys, limit


def _check_env(where: str, env) -> None:
    """Refuse an ``env`` that is not a table of variable names to strings."""
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise AuthConfigError(f"{where}: env must be a table of NAME = \"value\" strings")
    for name in env:
        if not environment.valid_name(name):
            raise AuthConfigError(f"{where}: env: {name!r} is not a variable name agents may get "
                                  f"(A-Z a-z 0-9 _, not {', '.join(environment.RESERVED)})")


def auth_from_config(config) -> Auth:
    """Build the server's Auth from ``config.tenants`` and ``config.admin_token``."""
    tenants = TenantsFile() if config.tenants is None else load_tenants(config.tenants)
    keys, admin = tenants.keys, tenants.admin
    seen: dict[bytes, str] = {}
    for key, tenant in keys:
        if key in seen:
            raise AuthConfigError(f"tenants file {config.tenants}: the same API key is given to tenants "
                                  f"{seen[key]!r} and {tenant!r}")
        seen[key] = tenant
    admin = config.admin_token or admin
    if admin and digest(admin) in seen:
        raise AuthConfigError(f"tenants file {config.tenants}: the admin token must differ from every tenant key")
    metrics = getattr(config, "metrics_token", None)
    return Auth(keys=keys, tenant_limits=tenants.limits, tenant_env=tenants.envs,
                admin_token=digest(admin) if admin else None, metrics_token=digest(metrics) if metrics else None,
                tenant_egress=tenants.egress, tenant_webhooks=tenants.webhooks)


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


def may_see_tenants(request: web.Request) -> bool:
    """Whether /metrics may show tenant names: in dev mode, or to the metrics or admin token's holder."""
    auth, token = request.app[AUTH], bearer_token(request)
    return auth.dev_mode or auth.is_metrics_token(token) or auth.is_admin_token(token)


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
