"""Typed keys for what the app, each request and each response carry (aiohttp's AppKey / RequestKey / ResponseKey)."""

import asyncio

from aiohttp import web

from corral.supervisor import Config, Supervisor
from corral.supervisor.metrics import Metrics
from corral.supervisor.procstats import ProcStats
from corral.supervisor.tasks import TaskSet

SUPERVISOR = web.AppKey("supervisor", Supervisor)
CONFIG = web.AppKey("config", Config)
AUTH = web.AppKey("auth")  # web.auth.Auth (typed loosely: web/auth.py imports this module)
# its for_session feeds admin rows (a test may put any object with for_session here)
PROCSTATS = web.AppKey("procstats", ProcStats)
METRICS = web.AppKey("metrics", Metrics)
EVENT_STREAMS = web.AppKey("event_streams", set[asyncio.Queue])  # queues of open /admin/events streams
WEBHOOKS = web.AppKey("webhooks")  # supervisor.webhooks.Webhooks (typed loosely, like AUTH)
BACKGROUND = web.AppKey("background", TaskSet)  # coroutines run past their request; awaited on shutdown

TENANT = web.RequestKey("tenant", str)  # the tenant the request authenticated as
ADMIN = web.RequestKey("admin", bool)  # the request carried the admin token
RAW_BODY = web.RequestKey("raw_body", bytes)  # the body json_body read, kept for a relay to the owner node
# the session's owner node did not answer this read (dead, its lease not yet run out): answer from the store
OWNER_UNREACHABLE = web.RequestKey("owner_unreachable", bool)

ERROR_CODE = web.ResponseKey("error_code", str)  # the error.code of a JSON error answer, for the metrics
