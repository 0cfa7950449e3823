"""The agents' egress: the gateway out of their network namespace, its policy, the declared upstreams, the counts."""

import os

from corral.supervisor.egress.gateway import Gateway, TenantEgress
from corral.supervisor.egress.policy import Policy, host_addresses, parse_rule
from corral.supervisor.egress.upstreams import build_upstreams, client_tls

__all__ = ["Gateway", "TenantEgress", "build_gateway", "tenant_egress"]


def tenant_egress(table: dict, where: str, environ=None) -> TenantEgress:
    """A tenant's egress from its tenants-file table: ``agent_allow``, ``agent_deny``, ``upstreams``.

    ``upstreams`` is a table of ``NAME = {url = "...", headers = {"Header" = "value"}}``; values may
    end in env:VAR or file:PATH. ValueError names ``where`` and the problem.
    """
    import os

    try:
        allow = [parse_rule(text) for text in _strings(table.get("agent_allow", []), "agent_allow")]
        deny = [parse_rule(text) for text in _strings(table.get("agent_deny", []), "agent_deny")]
        urls, headers = _upstream_items(table.get("upstreams", {}))
        upstreams = build_upstreams(urls, headers, os.environ if environ is None else environ)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return TenantEgress(allow, deny, upstreams)


def _strings(value, name: str) -> list[str]:
    """A list of strings, or ValueError."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of strings")
    return value


def _upstream_items(tables) -> tuple[list, list]:
    """(name, url) pairs and (name, header, value) triples from the tenants file's upstreams table."""
    if not isinstance(tables, dict):
        raise ValueError("upstreams must be a table of NAME = {url = ..., headers = {...}}")
    urls, headers = [], []
    for name, spec in tables.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("url"), str) or set(spec) - {"url", "headers"}:
            raise ValueError(f"upstreams.{name} must be {{url = \"https://...\", headers = {{...}}}}")
        urls.append(f"{name}={spec['url']}")
        spec_headers = spec.get("headers", {})
        if not isinstance(spec_headers, dict) or not all(isinstance(v, str) for v in spec_headers.values()):
            raise ValueError(f"upstreams.{name}.headers must be a table of strings")
        headers += [f"{name}={header}: {value}" for header, value in spec_headers.items()]
    return urls, headers


def build_gateway(config, tenants: dict | None = None, on_denied=None) -> Gateway:
    """The gateway of a server: its rules, its upstreams (secrets read now), the tenants' own, its TLS."""
    policy = Policy([parse_rule(t) for t in config.agent_allow], [parse_rule(t) for t in config.agent_deny],
                    host_addresses())
    upstreams = build_upstreams(config.upstream, config.upstream_header)
    ca_file = str(config.upstream_ca_file) if config.upstream_ca_file else None
    return Gateway(policy, upstreams, tenants=tenants, tls=client_tls(ca_file), on_denied=on_denied)
