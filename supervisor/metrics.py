"""Prometheus metrics of one corral server, in a registry of its own (no global state).

Counts the supervisor already keeps (``sup.counters``), sessions by state and by tenant, and agent
memory are read at scrape time by a collector; what only passes by (spawn latency on the
``spawned`` event, request latency and refusals from the web middleware) is observed into
histograms and counters as it happens.
"""

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from corral.supervisor import states

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Seconds; a zygote fork is ~5 ms, a loaded machine or a cold spawn can take seconds.
SPAWN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)

# metric name -> (sup.counters key, help)
_COUNTERS = {
    "corral_spawns": ("spawns", "Agent processes started (first starts and restarts)"),
    "corral_restarts": ("restarts", "Respawns of crashed or OOM-killed sessions"),
    "corral_crashes": (states.CRASHED, "Sessions whose agent crashed"),
    "corral_oom_kills": (states.OOM, "Sessions whose agent was killed for exceeding its memory limit"),
    "corral_reaps": (states.REAPED, "Sessions stopped by the idle timeout"),
    "corral_expiries": (states.EXPIRED, "Sessions stopped by max_age"),
    "corral_admin_kills": (states.KILLED, "Sessions killed: by an admin, or by the supervisor (abuse, unresponsive)"),
    "corral_agents_killed_for_abuse": ("agents_killed_for_abuse", "Agents killed for abusing their connection"),
    "corral_agents_unresponsive": ("agents_unresponsive", "Agents ended for ignoring the interrupt of a timed-out turn"),
    "corral_agent_reads_paused": ("agent_reads_paused", "Times the hub stopped reading an agent that PINGs and reads no PONGs"),
    "corral_session_stops": (states.ENDED, "Sessions ended by their owner or at shutdown"),
    "corral_fenced_out": ("fenced_out", "Agent processes ended because another cluster node claimed their session"),
    "corral_forwards": ("forwards", "Requests relayed to the cluster node that owns their session"),
    "corral_webhooks_delivered": ("webhooks_delivered", "Webhook deliveries a receiver accepted (2xx)"),
    "corral_webhooks_retried": ("webhooks_retried", "Webhook tries that failed and were scheduled again"),
    "corral_webhooks_failed": ("webhooks_failed", "Webhook deliveries given up (a 4xx, or the retry window passed)"),
    "corral_webhooks_dropped": ("webhooks_dropped", "Webhook deliveries dropped: the queue was full, or the server stopped"),
}


class Metrics:
    """The registry and the instruments of one app."""

    def __init__(self, sup, procstats=None):
        self.sup = sup
        self.procstats = procstats
        self.registry = CollectorRegistry()
        self.spawn_seconds = Histogram(
            "corral_spawn_seconds", "Seconds from spawn request to a ready agent",
            buckets=SPAWN_BUCKETS, registry=self.registry,
        )
        self.request_seconds = Histogram(
            "corral_http_request_seconds", "Seconds to answer an HTTP request, by route",
            ["route", "method"], buckets=REQUEST_BUCKETS, registry=self.registry,
        )
        self.refused = Counter(
            "corral_http_refused", "Requests answered with an error, by status and error code",
            ["status", "code"], registry=self.registry,
        )
        # labels() validates and locks on every call (~3% of a request): keep each child once made.
        # A child is never removed from its metric, so a kept one cannot go stale.
        self._request_children: dict[tuple[str, str], object] = {}
        self.registry.register(_SupervisorCollector(self))
        self._unsubscribe = sup.events.subscribe(self._on_event, types={"spawned"})

    def _on_event(self, event: dict) -> None:
        """Observe spawn latency as sessions come up."""
        if event["type"] == "spawned" and event.get("seconds") is not None:
            self.spawn_seconds.observe(event["seconds"])

    def observe_request(self, route: str, method: str, seconds: float) -> None:
        """Count one answered request (methods outside HTTP's own share one label, so labels stay few)."""
        if method not in _METHODS:
            method = "other"
        child = self._request_children.get((route, method))
        if child is None:
            child = self._request_children[(route, method)] = self.request_seconds.labels(route, method)
        child.observe(seconds)

    def observe_refusal(self, status: int, code: str) -> None:
        """Count one request answered with an error."""
        self.refused.labels(str(status), code).inc()

    def exposition(self, *, tenants: bool = True) -> bytes:
        """The text format Prometheus scrapes; without ``tenants``, no series labelled with a tenant."""
        return generate_latest(self.registry if tenants else _WithoutTenants(self.registry))

    def close(self) -> None:
        """Stop listening to the supervisor's events."""
        self._unsubscribe()


class _WithoutTenants:
    """A view of a registry whose series carry no ``tenant`` label (tenant names are for the operator)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        """Every family of the registry, its tenant-labelled samples left out."""
        for family in self.registry.collect():
            family.samples = [sample for sample in family.samples if "tenant" not in sample.labels]
            yield family

def _egress(by_tenant: dict[str, dict]):
    """Per-tenant series of the egress gateway's counts (never one per session)."""
    sent = CounterMetricFamily("corral_tenant_egress_bytes", "Bytes through the egress gateway, by tenant and "
                               "direction (in: to agents)", labels=["tenant", "direction"])
    requests = CounterMetricFamily("corral_tenant_egress_requests", "Requests through the egress gateway, by tenant",
                                   labels=["tenant"])
    refused = CounterMetricFamily("corral_tenant_egress_refused", "Egress refused by the policy, by tenant",
                                  labels=["tenant"])
    for tenant, counts in sorted(by_tenant.items()):
        sent.add_metric([tenant, "in"], counts["bytes_in"])
        sent.add_metric([tenant, "out"], counts["bytes_out"])
        requests.add_metric([tenant], counts["requests"])
        refused.add_metric([tenant], counts["refused"])
    yield from (sent, requests, refused)


class _SupervisorCollector:
    """Reads the supervisor's counts and the process figures at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        """Nothing to pre-register; names are fixed and unique within this registry."""
        return []

    def collect(self):
        """Yield every scrape-time metric."""
        sup = self.metrics.sup
        yield self._by_state(sup)
        by_tenant = GaugeMetricFamily("corral_tenant_sessions", "Live sessions by tenant", labels=["tenant"])
        for tenant, n in sorted(sup.live_by_tenant.items()):
            if n:
                by_tenant.add_metric([tenant], n)
        yield by_tenant
        for name, (key, help_text) in _COUNTERS.items():
            yield CounterMetricFamily(name, help_text, value=sup.counters.get(key, 0))
        yield CounterMetricFamily(
            "corral_spawns_refused", "Spawns refused at max_sessions or a tenant quota",
            value=sup.counters.get("refused_capacity", 0) + sup.counters.get("refused_quota", 0),
        )
        yield from self._memory()
        yield from _egress(sup.egress_by_tenant())
        yield from sup.usage.metric_families()

    @staticmethod
    def _by_state(sup) -> GaugeMetricFamily:
        """Sessions held in memory, by state (every state present, zeros included)."""
        counts = dict.fromkeys(sorted(states.LIVE | states.DOWN), 0)  # a live server holds no "lost" session
        for s in list(sup.sessions.values()):
            if s.state in counts:
                counts[s.state] += 1
        family = GaugeMetricFamily("corral_sessions", "Sessions held by the supervisor, by state", labels=["state"])
        for state, n in counts.items():
            family.add_metric([state], n)
        return family

    def _memory(self):
        """Total agent memory from the last process-stats pass."""
        stats = self.metrics.procstats
        if stats is None:
            return
        family = GaugeMetricFamily(
            "corral_agent_memory_bytes", "Memory of all agent processes together", labels=["kind"]
        )
        family.add_metric(["rss"], stats.total_rss())
        family.add_metric(["uss"], stats.total_uss())
        yield family
