"""Typed keys for what the app and each request carry (aiohttp's AppKey / RequestKey)."""

import asyncio

from aiohttp import web

from corral.supervisor import Config, Supervisor

SUPERVISOR = web.AppKey("supervisor", Supervisor)
CONFIG = web.AppKey("config", Config)
AUTH = web.AppKey("auth")  # web.auth.Auth (typed loosely: auth imports this module)
PROCSTATS = web.AppKey("procstats")  # supervisor.procstats.ProcStats; its for_session feeds admin rows
METRICS = web.AppKey("metrics")  # supervisor.metrics.Metrics
EVENT_STREAMS = web.AppKey("event_streams", set)  # queues of open /admin/events streams
BACKGROUND = web.AppKey("background")  # run a coroutine past its request: background(coro)
BACKGROUND_TASKS = web.AppKey("background_tasks", set[asyncio.Task])

TENANT = web.RequestKey("tenant", str)  # the tenant the request authenticated as
ADMIN = web.RequestKey("admin", bool)  # the request carried the admin token
RAW_BODY = web.RequestKey("raw_body", bytes)  # the body json_body read, kept for a relay to the owner node
