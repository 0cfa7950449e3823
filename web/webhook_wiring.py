"""Wires the lifecycle webhooks (supervisor/webhooks.py) into the app: receivers, the key, their life.

The webhooks start before the supervisor and stop after it (their cleanup runs last), so
``node.joined``, the ends of the sessions stopped at shutdown and ``node.left`` are all sent.
"""

from aiohttp import web

from corral.supervisor.webhooks import Webhooks
from corral.web.auth import AuthConfigError
from corral.web.keys import AUTH, CONFIG, SUPERVISOR, WEBHOOKS

DRAIN_AT_CLOSE = 5.0  # seconds the queue may take to empty when the server stops


def install(app: web.Application) -> None:
    """Create the app's webhooks from ``--webhook`` and the tenants file; AuthConfigError without a key."""
    config = app[CONFIG]
    tenant_urls = app[AUTH].tenant_webhooks
    hooks = Webhooks(app[SUPERVISOR], urls=config.webhook, tenant_urls=tenant_urls, secret=_secret(config))
    if hooks.enabled and not hooks.secret:
        hooks.close_now()
        raise AuthConfigError("webhooks need a signing key: --webhook-secret or --webhook-secret-file")
    app[WEBHOOKS] = hooks
    app.cleanup_ctx.insert(0, _webhooks_running)  # first up, last down: they outlive the supervisor


def _secret(config) -> bytes:
    """The signing key, from --webhook-secret or the file --webhook-secret-file names (its lines' ends stripped)."""
    if config.webhook_secret:
        return config.webhook_secret.encode()
    if config.webhook_secret_file is None:
        return b""
    try:
        with open(config.webhook_secret_file, "rb") as fh:
            return fh.read().strip()
    except OSError as exc:
        raise AuthConfigError(f"webhook secret file {config.webhook_secret_file}: {exc.strerror or exc}") from None


async def _webhooks_running(app: web.Application):
    """Start the senders before the supervisor; after it has stopped, let the queue drain a while."""
    await app[WEBHOOKS].start()
    yield
    await app[WEBHOOKS].close(DRAIN_AT_CLOSE)
