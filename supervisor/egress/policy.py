"""Where agents may connect through the egress gateway: rules, the default refusals, one verdict per address.

A destination is checked by name and port before it is resolved, then every address it resolves
to is checked (the gateway connects only to an address that passed: a name cannot be made to point
elsewhere between the check and the connection). The default: the public internet is allowed;
loopback, link-local, private, CGNAT, multicast, unspecified and reserved addresses and the host's
own addresses are refused unless an allow rule names them. A deny rule wins over an allow rule.
Rules (``--agent-allow`` / ``--agent-deny``, and per tenant in the tenants file) are one of:
``host``, ``*.domain`` (the domain and every name under it), ``host:port``, an address or a CIDR
(``10.0.0.0/8``, ``[::1]:8080`` with a port).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["Rule", "Policy", "parse_rule", "default_refusal", "host_addresses"]

_NAME = re.compile(r"^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_ULA = ipaddress.ip_network("fc00::/7")


@dataclass(frozen=True)
class Rule:
    """One allow or deny rule: a name, a ``*.`` suffix or a network, with a port or any port."""

    text: str
    name: str | None = None  # an exact host name (lower case)
    suffix: str | None = None  # "*.example.com" -> ".example.com" (and example.com itself)
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None

    def names(self, host: str, port: int) -> bool:
        """Whether the rule names this host (as the agent asked for it) and port."""
        if self.port is not None and port != self.port:
            return False
        host = host.lower().rstrip(".")
        if self.name is not None:
            return host == self.name
        if self.suffix is not None:
            return host.endswith(self.suffix) or host == self.suffix[1:]
        return False

    def covers(self, address: str, port: int) -> bool:
        """Whether the rule's network holds this address (and its port matches)."""
        if self.network is None or (self.port is not None and port != self.port):
            return False
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        return ip.version == self.network.version and ip in self.network

    def matches(self, host: str, address: str, port: int) -> bool:
        """Whether the rule applies to a connection to ``address`` reached by the name ``host``."""
        return self.names(host, port) or self.covers(address, port)


def parse_rule(text: str) -> Rule:
    """A rule from its text; ValueError says what a rule looks like."""
    raw = text.strip()
    dest, port = _split_port(raw)
    try:
        return Rule(raw, network=ipaddress.ip_network(dest, strict=False), port=port)
    except ValueError:
        pass
    if not _NAME.match(dest) or ".." in dest:
        raise ValueError(f"a destination rule is a host, *.domain, host:port, an address or a CIDR, not {text!r}")
    dest = dest.lower().rstrip(".")
    if dest.startswith("*."):
        return Rule(raw, suffix=dest[1:], port=port)
    return Rule(raw, name=dest, port=port)


def _split_port(text: str) -> tuple[str, int | None]:
    """("host", port) from "host:port", "[v6]:port", a bare host, address or CIDR."""
    if text.startswith("["):
        inside, _, rest = text[1:].partition("]")
        return inside, _port(rest[1:]) if rest.startswith(":") else None
    if text.count(":") == 1:  # host:port; several colons are an IPv6 address
        host, _, port = text.partition(":")
        return host, _port(port)
    return text, None


def _port(text: str) -> int:
    """A port number 1-65535."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"a port is 1-65535, not {text!r}")
    return int(text)


def default_refusal(address: str, own: frozenset[str] = frozenset()) -> str | None:
    """Why the default policy refuses an address (a word for the log), or None for the public internet."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return default_refusal(str(ip.ipv4_mapped), own)
    checks = (
        (ip.is_unspecified, "unspecified"), (ip.is_loopback, "loopback"), (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"), (ip.version == 4 and ip in _CGNAT, "cgnat"),
        (ip.version == 6 and ip in _ULA, "private"), (ip.is_private, "private"), (ip.is_reserved, "reserved"),
        (str(ip) in own, "host address"),
    )
    return next((word for hit, word in checks if hit), None)


def host_addresses() -> frozenset[str]:
    """Every address of this host's interfaces (its public ones too: a service bound there is the host's)."""
    import psutil

    found = set()
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family.name in ("AF_INET", "AF_INET6"):
                found.add(str(ipaddress.ip_address(addr.address.split("%", 1)[0])))
    return frozenset(found)


class Policy:
    """Allow and deny rules over the default refusals: the verdict for one (name, address, port)."""

    def __init__(self, allow=(), deny=(), own: frozenset[str] = frozenset()):
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        self.own = own

    def with_rules(self, allow=(), deny=()) -> "Policy":
        """This policy plus more rules (a tenant's, over the server's)."""
        return Policy((*self.allow, *allow), (*self.deny, *deny), self.own)

    def refuse_name(self, host: str, port: int) -> str | None:
        """Why a destination is refused by name before any resolution (a deny rule naming it), or None."""
        rule = next((r for r in self.deny if r.names(host, port)), None)
        return f"denied by rule {rule.text}" if rule else None

    def refuse(self, host: str, address: str, port: int) -> str | None:
        """Why a connection to ``address`` (reached as ``host``) is refused, or None when it is allowed."""
        rule = next((r for r in self.deny if r.matches(host, address, port)), None)
        if rule is not None:
            return f"denied by rule {rule.text}"
        if any(r.matches(host, address, port) for r in self.allow):
            return None
        word = default_refusal(address, self.own)
        return None if word is None else f"{word} address {address} (no --agent-allow rule names it)"
