"""The aiohttp application: routes, middleware, and the supervisor on the same loop."""

from aiohttp import web

from corral.supervisor import Config, Supervisor
from corral.supervisor.errors import CorralError
from corral.supervisor.logs import get_logger
from corral.supervisor.tasks import TaskSet
from corral.web import cors, forward, monitoring, openapi, webhook_wiring
from corral.web.auth import auth_from_config, check_bind, log_mode
from corral.web.error_responses import answer_protocol_errors_in_json
from corral.web.middleware import front_door
from corral.web.routes import admin, api, chat, cluster, dashboard, health, metrics, stream, usage
from corral.web.keys import AUTH, BACKGROUND, CONFIG, SUPERVISOR

log = get_logger(component="web")


def create_app(config: Config, *, store=None, claim=None) -> web.Application:
    """Build the app; the supervisor starts and stops with it (``claim``: see Supervisor).

    Raises ``AuthConfigError`` for a bad tenants file or for dev mode (no keys) off loopback.
    """
    auth = auth_from_config(config)
    check_bind(auth, config.host)
    log_mode(auth)
    app = web.Application(
        middlewares=[front_door], client_max_size=config.max_message_bytes * 4 + 4096
    )
    answer_protocol_errors_in_json(app)
    app[CONFIG] = config
    app[AUTH] = auth
    app[SUPERVISOR] = Supervisor(config, store=store, claim=claim, tenant_limits=auth.tenant_limits,
                                 tenant_env=auth.tenant_env, tenant_egress=auth.tenant_egress)
    app[BACKGROUND] = TaskSet(log, expected=(CorralError,))  # those reached the client or the event stream
    app.cleanup_ctx.append(_supervisor_running)  # first up, last down: the parts installed below use it
    for module in (health, chat, api, admin, cluster, stream, openapi, metrics, usage):
        app.add_routes(module.routes)
    stream.setup(app)
    forward.install(app)
    cors.setup(app, config.cors_origins)
    monitoring.install(app)
    dashboard.install(app)
    webhook_wiring.install(app)
    return app


async def _supervisor_running(app: web.Application):
    """Start the supervisor with the app; at cleanup drain background turns, then stop every session."""
    try:
        await app[SUPERVISOR].start()
    except BaseException:
        await app[SUPERVISOR].close()  # a half-started one (its zygote up, its store not) stops all the same
        raise
    yield
    await app[BACKGROUND].wait(app[CONFIG].stop_timeout)
    await app[SUPERVISOR].close()
