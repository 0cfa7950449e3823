"""What each session and tenant sent and received through the egress gateway, and the grants that say who is who.

Every agent shares one network namespace, so a connection's origin is the token its spawn was
given (in the proxy URL's userinfo, or in an upstream URL's path). A grant is one spawn's token; a
session's counts live as long as any of its spawns does, then stay readable for a while among the
most recently ended (``RETAINED``), for whoever bills them; a tenant's totals live for the run.
"""
from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass

__all__ = ["EgressCounts", "Grant", "Grants", "RETAINED"]

RETAINED = 4096  # ended sessions whose counts stay readable


@dataclass
class EgressCounts:
    """Egress counts: bytes to the agent (in) and from it (out), requests made, requests refused."""

    bytes_in: int = 0
    bytes_out: int = 0
    requests: int = 0
    refused: int = 0

    def as_dict(self) -> dict:
        """The counts as a plain dict."""
        return asdict(self)


@dataclass(eq=False)
class Grant:
    """One spawn's right to use the gateway: its token, whose it is, and where its counts go."""

    token: str
    session_id: str
    tenant: str
    session: EgressCounts
    tenant_usage: EgressCounts
    open: int = 0  # connections of this spawn the gateway holds now
    on_count: Callable[[str, str, str, int], None] | None = None  # (session, tenant, field, amount): billing

    def count(self, field: str, amount: int = 1) -> None:
        """Add to a count of the session and of its tenant (and tell usage accounting)."""
        setattr(self.session, field, getattr(self.session, field) + amount)
        setattr(self.tenant_usage, field, getattr(self.tenant_usage, field) + amount)
        if self.on_count is not None:
            self.on_count(self.session_id, self.tenant, field, amount)


class Grants:
    """The live grants by token, and the counts per session and per tenant."""

    def __init__(self, on_count: Callable[[str, str, str, int], None] | None = None):
        self.on_count = on_count  # every count of every grant, for usage accounting (supervisor/usage.py)
        self.by_token: dict[str, Grant] = {}
        self.live: dict[tuple[str, str], tuple[EgressCounts, int]] = {}  # (tenant, session) -> (counts, live grants)
        self.ended: OrderedDict[tuple[str, str], EgressCounts] = OrderedDict()
        self.tenants: dict[str, EgressCounts] = {}

    def issue(self, session_id: str, tenant: str) -> Grant:
        """A new token for one spawn of a session."""
        key = (tenant, session_id)
        usage, count = self.live.get(key) or (self.ended.pop(key, None) or EgressCounts(), 0)
        self.live[key] = (usage, count + 1)
        grant = Grant(secrets.token_urlsafe(24), session_id, tenant, usage,
                      self.tenants.setdefault(tenant, EgressCounts()), on_count=self.on_count)
        self.by_token[grant.token] = grant
        return grant

    def revoke(self, token: str) -> None:
        """The spawn is gone: its token opens nothing any more."""
        grant = self.by_token.pop(token, None)
        if grant is None:
            return
        key = (grant.tenant, grant.session_id)
        usage, count = self.live[key]
        if count > 1:
            self.live[key] = (usage, count - 1)
            return
        del self.live[key]
        self.ended[key] = usage
        while len(self.ended) > RETAINED:
            self.ended.popitem(last=False)

    def find(self, token: str | None) -> Grant | None:
        """The live grant of a token, or None."""
        return self.by_token.get(token) if token else None

    def session_usage(self, session_id: str, tenant: str) -> EgressCounts | None:
        """A session's counts (live or recently ended), or None."""
        key = (tenant, session_id)
        live = self.live.get(key)
        return live[0] if live else self.ended.get(key)
