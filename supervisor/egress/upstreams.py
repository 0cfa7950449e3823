"""Declared upstreams: an API the agents reach over plain HTTP on the gateway, its credential added there.

``--upstream openai=https://api.openai.com/v1`` and ``--upstream-header 'openai=Authorization: Bearer
env:OPENAI_API_KEY'`` (per tenant in the tenants file too): an agent sees
``CORRAL_UPSTREAM_OPENAI=http://127.0.0.1:<port>/u/<its token>/openai`` and asks that; the gateway
replaces the named headers with the declared ones and speaks HTTPS (verified) to the real URL. A
header's value is literal, or ends in ``env:VAR`` (the server's environment) or ``file:PATH`` (the
file's first line), read once at start: the secret stays in the supervisor's memory, never in the
zygote's or an agent's.
"""
from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["Upstream", "parse_upstream", "parse_header", "build_upstreams", "resolve_value", "client_tls", "env_name"]

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_HEADER = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


@dataclass(frozen=True)
class Upstream:
    """One declared upstream: where it is, and the headers the gateway adds (the secrets resolved)."""

    name: str
    scheme: str
    host: str
    port: int
    path: str  # the base path, no trailing slash
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def url(self) -> str:
        """The real base URL (for logs: no secret in it)."""
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"


def env_name(name: str) -> str:
    """``CORRAL_UPSTREAM_OPENAI``: the variable an agent reads an upstream's gateway URL from."""
    return "CORRAL_UPSTREAM_" + name.upper()


def _check_name(name: str, where: str) -> str:
    """An upstream name: a letter, then letters, digits or _ (it becomes part of a variable's name)."""
    if not _NAME.match(name):
        raise ValueError(f"{where}: an upstream name is a letter then letters, digits or _, not {name!r}")
    return name.lower()


def parse_upstream(text: str) -> tuple[str, str]:
    """``NAME=URL`` -> (name, url), the URL http(s) with a host."""
    name, sep, url = text.partition("=")
    if not sep:
        raise ValueError(f"an upstream is NAME=URL, not {text!r}")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment or parts.username:
        raise ValueError(f"an upstream URL is http(s)://host[:port][/path], without credentials, not {url!r}")
    return _check_name(name.strip(), "--upstream"), url.strip()


def parse_header(text: str) -> tuple[str, str, str]:
    """``NAME=Header: value`` -> (upstream name, header, value as written: env:/file: not read yet)."""
    name, sep, rest = text.partition("=")
    header, colon, value = rest.partition(":")
    if not sep or not colon or not _HEADER.match(header.strip()) or not value.strip():
        raise ValueError("an upstream header is 'NAME=Header: value' (value may end in env:VAR or file:PATH)")
    return _check_name(name.strip(), "--upstream-header"), header.strip(), value.strip()


def resolve_value(value: str, environ=os.environ) -> str:
    """A header value with a trailing ``env:VAR`` or ``file:PATH`` read; ValueError when missing."""
    head, _, last = value.rpartition(" ")
    if last.startswith("env:"):
        secret = environ.get(last[4:])
        if not secret:
            raise ValueError(f"upstream header: the environment has no {last[4:]}")
    elif last.startswith("file:"):
        try:
            with open(last[5:]) as f:
                secret = f.readline().strip()
        except OSError as exc:
            raise ValueError(f"upstream header: cannot read {last[5:]}: {exc.strerror}") from None
    else:
        return value
    if any(ch in secret for ch in "\r\n"):
        raise ValueError("upstream header: a value cannot hold a line break")
    return f"{head} {secret}" if head else secret


def build_upstreams(urls, headers, environ=os.environ) -> dict[str, Upstream]:
    """Upstreams from ``NAME=URL`` and ``NAME=Header: value`` texts (or pairs and triples already parsed)."""
    found: dict[str, tuple[str, list]] = {}
    for item in urls:
        name, url = parse_upstream(item) if isinstance(item, str) else item
        if name in found:
            raise ValueError(f"upstream {name!r} is declared twice")
        found[name] = (url, [])
    for item in headers:
        name, header, value = parse_header(item) if isinstance(item, str) else item
        if name not in found:
            raise ValueError(f"a header is given for upstream {name!r}, which is not declared")
        found[name][1].append((header, resolve_value(value, environ)))
    return {name: _upstream(name, url, tuple(hs)) for name, (url, hs) in found.items()}


def _upstream(name: str, url: str, headers) -> Upstream:
    """One Upstream from its URL."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Upstream(name, parts.scheme, parts.hostname, port, parts.path.rstrip("/"), headers)


def client_tls(ca_file: str | None = None) -> ssl.SSLContext:
    """The TLS context the gateway speaks to upstreams with: verified, the system's CAs or ``ca_file``."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
