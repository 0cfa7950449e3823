"""Every error leaves as ``{"error": {"code", "message"}}`` with the design's status codes."""

import json

from aiohttp import web

from supervisor import errors
from supervisor.logs import get_logger
from supervisor.store import StoreError

log = get_logger(component="web")


def error_response(status: int, code: str, message: str, *, retry_after: float | None = None) -> web.Response:
    """A JSON error response."""
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
    body = json.dumps({"error": {"code": code, "message": message}})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


def json_error(request: web.Request, exc: Exception) -> web.Response | None:
    """The JSON answer for an exception a handler raised, or None to let it pass on; never leaks a traceback."""
    if isinstance(exc, errors.CorralError):
        return error_response(exc.status, exc.code, exc.message, retry_after=exc.retry_after)
    if isinstance(exc, StoreError):
        log.error("store_error", path=request.path, error=str(exc))
        # the cause names files, hosts and tables: it stays in the log
        return error_response(503, "unavailable", "the session store is unavailable; try again shortly", retry_after=5)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400 or exc.content_type == "application/json":
            return None
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason, retry_after=None)
    log.exception("unhandled_error", path=request.path, method=request.method)
    return error_response(500, "internal_error", "internal error; see the server log")
