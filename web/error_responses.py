"""Every error leaves as ``{"error": {"code", "message"}}`` with the design's status codes."""

import json

from aiohttp import http_exceptions, web

from corral.supervisor import errors
from corral.supervisor.logs import get_logger
from corral.supervisor.store_errors import api_error
from corral.web.keys import ERROR_CODE

log = get_logger(component="web")


def error_response(status: int, code: str, message: str, *, retry_after: float | None = None) -> web.Response:
    """A JSON error response."""
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
    body = json.dumps({"error": {"code": code, "message": message}})
    response = web.Response(status=status, text=body, content_type="application/json", headers=headers)
    response[ERROR_CODE] = code  # the metrics count refusals by it
    return response


def json_error(request: web.Request, exc: Exception) -> web.Response | None:
    """The JSON answer for an exception a handler raised, or None to let it pass on; never leaks a traceback."""
    exc = api_error(exc) or exc  # a store call no store_call wrapped: the same conversion
    if isinstance(exc, errors.CorralError):
        return error_response(exc.status, exc.code, exc.message, retry_after=exc.retry_after)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400 or exc.content_type == "application/json":
            return None
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status, "http_error")
        response = error_response(exc.status, code, exc.reason, retry_after=None)
        if "Allow" in exc.headers:  # a 405 names the methods the route takes (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    log.exception("unhandled_error", path=request.path, method=request.method)
    return error_response(500, "internal_error", "internal error; see the server log")


# What aiohttp's HTTP parser refused, said without echoing the client's bytes back.
_PARSER_REFUSALS = (
    (http_exceptions.BadHttpMethod, "unknown HTTP method"),
    (http_exceptions.LineTooLong, "the request line or a header is over the server's size limit"),
    (http_exceptions.InvalidHeader, "a header is malformed"),
    (http_exceptions.BadStatusLine, "malformed request line"),
    (http_exceptions.PayloadEncodingError, "malformed request body encoding"),
)
_PROTOCOL_CODES = {400: "bad_request", 413: "too_large", 431: "too_large", 500: "internal_error"}


def protocol_error_response(status: int, exc: BaseException | None) -> web.Response:
    """The JSON answer for a request aiohttp refused before any handler or middleware saw it."""
    message = next((text for kind, text in _PARSER_REFUSALS if isinstance(exc, kind)), None)
    if message is None:
        message = "malformed HTTP request" if status == 400 else "internal error; see the server log"
    response = error_response(status, _PROTOCOL_CODES.get(status, "http_error"), message)
    response.force_close()  # the parser's state is unknown after a refusal: aiohttp closes too
    return response


class _JsonErrorProtocol(web.RequestHandler):
    """aiohttp's connection protocol, answering its own refusals in the JSON error shape.

    A request its parser refuses (unknown method, bad request line, a header over 8 KiB) never
    reaches a handler or the middleware: the protocol answers it with ``handle_error``, by default
    in text/plain and quoting the offending input.
    """

    __slots__ = ()

    def handle_error(self, request, status: int = 500, exc=None, message=None) -> web.StreamResponse:
        """Log as aiohttp does (and refuse if an answer already started), then answer in JSON."""
        super().handle_error(request, status, exc, message)
        return protocol_error_response(status, exc)


class _JsonErrorServer(web.Server):
    """aiohttp's server, making connections of the JSON-answering protocol."""

    def __call__(self) -> web.RequestHandler:
        """A protocol for one new connection."""
        return _JsonErrorProtocol(self, loop=self._loop, **self._kwargs)


def answer_protocol_errors_in_json(app: web.Application) -> None:
    """Make every server of this app (web.run_app, AppRunner, the test server) answer parser errors in JSON.

    aiohttp offers no public way to answer those (checked in its 3.14 source): a parser error goes
    to ``RequestHandler.handle_error`` and never reaches a middleware or ``on_response_prepare``
    (aio-libs/aiohttp#3287 and #6463 are open; #12890, which would route it through the app, was
    closed unmerged), and the server's protocol class is fixed. Its runners build the server
    through the app's private ``_make_handler``, so this is the one place corral touches an aiohttp
    private name (tests/test_structure.py allows exactly this one): the app's own ``_make_handler``
    hands out a server whose class only adds ``__call__`` making our protocol. Drop it when aiohttp
    lets an app answer parser errors.
    """
    make_server = app._make_handler

    def make_json_error_server(**kwargs) -> web.Server:
        """aiohttp's server for this app, answering its own refusals in JSON."""
        server = make_server(**kwargs)
        server.__class__ = _JsonErrorServer  # a subclass that only overrides __call__
        return server

    app._make_handler = make_json_error_server
