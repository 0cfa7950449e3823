"""HTTP/1.1 request and response heads as the egress gateway reads and rewrites them (no bodies: those are piped)."""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["HEAD_LIMIT", "Head", "BadHead", "parse_request", "proxy_token", "split_target", "response", "request_head",
           "close_response_head", "HOP_BY_HOP"]

HEAD_LIMIT = 64 * 1024  # bytes of a request or response head

# Headers meant for the hop, not the destination; the gateway drops them and says Connection: close.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authorization", "proxy-connection", "proxy-authenticate",
                        "te", "trailer", "upgrade"})
_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 407: "Proxy Authentication Required",
            431: "Request Header Fields Too Large", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout"}


class BadHead(ValueError):
    """A request head the gateway cannot read."""


@dataclass
class Head:
    """A request's first line and headers (names as sent, in order)."""

    method: str
    target: str
    headers: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        """The first header of that name (any case), or None."""
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def forwarded(self, drop=frozenset()) -> list[tuple[str, str]]:
        """The headers minus the hop's own and any named in ``drop`` (lower case)."""
        return [(k, v) for k, v in self.headers if k.lower() not in HOP_BY_HOP and k.lower() not in drop]


def parse_request(raw: bytes) -> Head:
    """The head of a request (up to and including its blank line); BadHead when it is not HTTP/1.x."""
    text = raw.decode("latin-1")
    if any(ch in text[:-4].replace("\r\n", "") for ch in "\r\n\0"):
        raise BadHead("a bare CR or LF (or NUL) in the head")  # one parser's line end is another's header
    try:
        lines = text.split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise BadHead("the request line is not METHOD TARGET HTTP/1.x") from None
    if not version.startswith("HTTP/1.") or not method.isalpha() or not target:
        raise BadHead("the request line is not METHOD TARGET HTTP/1.x")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or line[0] in " \t":
            raise BadHead("a malformed header line")
        headers.append((name, value.strip()))
    return Head(method.upper(), target, headers)


def proxy_token(head: Head) -> str | None:
    """The token of ``Proxy-Authorization: Basic`` (the password, else the user name), or None."""
    scheme, _, value = (head.get("proxy-authorization") or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return password or user or None


def split_target(target: str, default_port: int | None = None) -> tuple[str, int]:
    """(host, port) from ``host:port`` or ``[v6]:port``; BadHead when it is not one."""
    parts = urlsplit("//" + target)
    try:
        port = parts.port or default_port
    except ValueError:
        raise BadHead(f"bad port in {target!r}") from None
    if not parts.hostname or port is None or parts.path or parts.query or parts.username:
        raise BadHead(f"expected host:port, not {target!r}")
    return parts.hostname, port


def response(status: int, code: str, message: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole error answer from the gateway itself: JSON ``{"error": {"code", "message"}}``, then close."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in extra)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def request_head(method: str, target: str, headers) -> bytes:
    """A request head to send on, ``Connection: close`` added (one request per connection)."""
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers), "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def close_response_head(raw: bytes) -> bytes:
    """A response head with its Connection/Keep-Alive headers replaced by ``Connection: close``."""
    lines = raw.decode("latin-1").split("\r\n")
    kept = [line for line in lines[1:] if line and line.partition(":")[0].strip().lower() not in ("connection", "keep-alive")]
    return ("\r\n".join([lines[0], *kept, "Connection: close"]) + "\r\n\r\n").encode("latin-1")
