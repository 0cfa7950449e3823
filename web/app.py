"""The aiohttp application: routes, middleware, and the supervisor on the same loop."""

import asyncio

from aiohttp import web

from corral.supervisor import Config, Supervisor
from corral.supervisor.logs import get_logger
from corral.web import cors, forward, monitoring, openapi
from corral.web.auth import auth_from_config, check_bind, log_mode
from corral.web.errors import answer_protocol_errors_in_json
from corral.web.middleware import front_door
from corral.web.routes import admin, api, chat, cluster, dashboard, health, metrics, stream
from corral.web.keys import AUTH, BACKGROUND, BACKGROUND_TASKS, CONFIG, SUPERVISOR

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
    app[SUPERVISOR] = Supervisor(config, store=store, claim=claim, tenant_limits=auth.tenant_limits)
    tasks: set[asyncio.Task] = set()

    def background(coro) -> None:
        """Run a coroutine past the request that started it; awaited on shutdown."""
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(_finished(tasks))

    app[BACKGROUND] = background
    app[BACKGROUND_TASKS] = tasks
    for module in (health, chat, api, admin, cluster, stream, openapi, metrics):
        app.add_routes(module.routes)
    stream.setup(app)
    forward.install(app)
    cors.setup(app, config.cors_origins)
    monitoring.install(app)
    dashboard.install(app)
    app.on_startup.append(_start_supervisor)
    app.on_cleanup.append(_stop_supervisor)
    return app


def _finished(tasks: set):
    """A done-callback that forgets the task and retrieves its outcome."""

    def done(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # errors already reached the client or the event stream

    return done


async def _start_supervisor(app: web.Application) -> None:
    """Start the supervisor with the app."""
    await app[SUPERVISOR].start()


async def _stop_supervisor(app: web.Application) -> None:
    """Drain background turns, then stop every session."""
    tasks = app[BACKGROUND_TASKS]
    if tasks:
        await asyncio.wait(list(tasks), timeout=app[CONFIG].stop_timeout)
    await app[SUPERVISOR].close()
