"""Prometheus metrics: one registry per application, one metric per operator question.

Rules:

* No global registry: :class:`RelayMetrics` owns a ``CollectorRegistry``, created
  and stored by the application (tests run many relays in one process).
* Values that already live elsewhere (store size, seconds since the last sync) are
  read at scrape time through callbacks, not copied on every change.
* Label values are bounded sets (route names, not paths; reasons are exception
  class names or fixed words), so cardinality stays small.

Questions and their metrics:

* Is the cache working? ``relay_bytes_served_total{source}``, ``relay_cache_*``.
* How much WAN does the relay use and save? ``relay_upstream_bytes_total``,
  ``relay_coalesced_bytes_total``, ``relay_delta_*``.
* Is the relay current? ``relay_sync_*``, ``relay_seconds_since_last_sync``,
  ``relay_timestamp_expiry_seconds``.
* Is it overloaded? ``relay_active_transfers``, ``relay_rejected_total{reason}``,
  ``relay_throttled_seconds_total{limiter}``, ``relay_connections``,
  ``relay_connections_closed_total{reason}``, ``relay_accept_errors_total``.
* Which agents fail and why? ``relay_agent_events_total{event,reason}``,
  ``relay_agents_by_state{state}``, ``relay_agents_by_version{product,version}``
  (the admin report and ``/ui/`` name the agents).
* What runs? ``relay_build_info{version}``, and the standard ``process_*`` and
  ``python_*`` collectors of prometheus-client.

Agent-supplied reasons outside the reference agent's set count as ``other``
(:func:`relay.core.protocol.reason_label`); beyond that, the first
:data:`MAX_REASONS` distinct values get their own label value. Versions in
``relay_agents_by_version`` are those of the verified metadata (signed, so
bounded); any other version an agent reports counts as ``other``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from relay import __version__


class HotCounter(Collector):
    """A labelled counter for the per-request path: a plain dict, no lock.

    All updates happen on the event loop thread; the scrape reads the dict there
    too, so no lock is needed, and an increment costs one dict operation.
    """

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self._name = name
        self._doc = documentation
        self._labels = labels
        self.values: defaultdict[tuple[str, ...], float] = defaultdict(float)

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        """Add ``amount`` to the series with label values ``key``."""
        self.values[key] += amount

    def collect(self) -> Iterator[CounterMetricFamily]:
        """Yield the metric family (called by the registry at scrape time)."""
        family = CounterMetricFamily(self._name, self._doc, labels=self._labels)
        for key, value in list(self.values.items()):
            family.add_metric(list(key), value)
        yield family


class CallbackGauge(Collector):
    """A labelled gauge whose series are read from a function at scrape time.

    ``func`` returns label values -> value; until :attr:`func` is set, the
    series in ``initial`` are reported (so every series exists from the start).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...],
        initial: Mapping[tuple[str, ...], float] | None = None,
    ) -> None:
        self._name = name
        self._doc = documentation
        self._labels = labels
        self._initial = dict(initial or {})
        self.func: Callable[[], Mapping[tuple[str, ...], float]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the metric family (called by the registry at scrape time)."""
        family = GaugeMetricFamily(self._name, self._doc, labels=self._labels)
        values = self.func() if self.func is not None else self._initial
        for key, value in sorted(values.items()):
            family.add_metric(list(key), value)
        yield family


__all__ = ["CONTENT_TYPE_LATEST", "MAX_REASONS", "STATES", "CallbackGauge", "RelayMetrics"]

MAX_REASONS = 50
"""Distinct agent-supplied reasons with a label value of their own."""
STATES = ("up-to-date", "pending", "deferred", "failed", "unknown")
"""The fleet states (``relay.core.fleet.FleetState`` values), the bounded label set."""


def _counter(registry: CollectorRegistry, name: str, doc: str, *labels: str) -> Counter:
    return Counter(name, doc, list(labels), registry=registry)


def _gauge(registry: CollectorRegistry, name: str, doc: str, *labels: str) -> Gauge:
    return Gauge(name, doc, list(labels), registry=registry)


class RelayMetrics:
    """Every metric of one relay, in its own registry."""

    def __init__(self, version: str = __version__) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = _gauge(
            r, "relay_build_info", "The relay's version (the value is always 1).", "version"
        )
        self.build_info.labels(version or "unknown").set(1)
        self.requests = HotCounter(
            "relay_http_requests", "HTTP requests by route and status.", ("route", "status")
        )
        r.register(self.requests)
        self.bytes_served = HotCounter(
            "relay_bytes_served",
            "Body bytes sent to clients, by source: cache (a stored blob), upstream (a blob "
            "still being filled), metadata, delta.",
            ("source",),
        )
        r.register(self.bytes_served)
        self.upstream_bytes = _counter(
            r, "relay_upstream_bytes", "Body bytes received from upstreams.", "upstream"
        )
        self.cache_bytes = _gauge(
            r, "relay_cache_bytes", "Bytes in the blob store (with fills reserved)."
        )
        self.cache_objects = _gauge(r, "relay_cache_objects", "Blobs in the store.")
        self.cache_max_bytes = _gauge(
            r, "relay_cache_max_bytes", "The blob store's quota in bytes (0: unlimited)."
        )
        self.evictions = _counter(r, "relay_evictions", "Blobs evicted for space.")
        self.fills = _counter(
            r, "relay_fills", "Upstream blob fills by result (ok or an error name).", "result"
        )
        self.fill_waiters = Histogram(
            "relay_fill_waiters",
            "Clients served by one upstream fill (single-flight fan-out).",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
            registry=r,
        )
        self.coalesced_bytes = _counter(
            r, "relay_coalesced_bytes", "Upstream bytes saved because waiters shared one fill."
        )
        self.sync_runs = _counter(
            r, "relay_sync_runs", "Metadata sync runs by result (new, unchanged, failed).", "result"
        )
        self.sync_failures = _counter(
            r, "relay_sync_failures", "Failed sync runs by reason.", "reason"
        )
        self.last_sync_age = _gauge(
            r, "relay_seconds_since_last_sync", "Seconds since the last successful sync."
        )
        self.timestamp_expiry = _gauge(
            r,
            "relay_timestamp_expiry_seconds",
            "Seconds until the served metadata expires (negative: already expired).",
        )
        self.upstream_up = _gauge(
            r, "relay_upstream_up", "1 if the upstream's last request succeeded.", "upstream"
        )
        self.scrub = _counter(
            r, "relay_scrub_blobs", "Blobs re-hashed by the scrub, by outcome.", "outcome"
        )
        self.active_transfers = _gauge(
            r, "relay_active_transfers", "Blob and delta responses in progress."
        )
        self.rejected = _counter(r, "relay_rejected", "Requests answered 503, by reason.", "reason")
        self.bandwidth_limit = _gauge(
            r,
            "relay_bandwidth_limit_bytes_per_second",
            "Bandwidth limit in force now, by limit: egress, per_agent, upstream (0 = unlimited).",
            "limit",
        )
        self.events_held = _gauge(
            r, "relay_events_held", "GET /v1/events requests held, waiting for a change."
        )
        self.connections = _gauge(r, "relay_connections", "Open client connections.")
        self.agents_evicted = _counter(
            r,
            "relay_agents_evicted",
            "Agents dropped from the registry: past limits.max_agents (cap) or not seen "
            "for limits.agent_expiry (idle).",
            "reason",
        )
        self.admin_signin_failures = _counter(
            r,
            "relay_admin_signin_failures",
            "Admin requests refused: a missing or wrong token (refused), or an address past "
            "the failure limit (rate_limited).",
            "outcome",
        )
        self.fill_backoff = _gauge(
            r,
            "relay_fill_backoff_targets",
            "Targets not fetched again for now: their upstream copy failed verification.",
        )
        self.connections_closed = _counter(
            r,
            "relay_connections_closed",
            "Client connections refused or closed by a limit, by reason (over_capacity, "
            "evicted, header_timeout, head_too_large, slow_reader).",
            "reason",
        )
        self.accept_errors = _counter(
            r, "relay_accept_errors", "Connections not accepted for lack of file descriptors."
        )
        self.throttled_seconds = _counter(
            r,
            "relay_throttled_seconds",
            "Seconds spent waiting for a bandwidth limiter.",
            "limiter",
        )
        self.delta_patches = _counter(
            r,
            "relay_delta_patches",
            "Delta computations by outcome and format.",
            "outcome",
            "format",
        )
        self.delta_seconds = _counter(
            r, "relay_delta_compute_seconds", "Seconds spent computing deltas.", "format"
        )
        self.delta_bytes_served = _counter(
            r, "relay_delta_bytes_served", "Patch bytes served.", "format"
        )
        self.delta_full_bytes = _counter(
            r,
            "relay_delta_full_bytes_replaced",
            "Full target bytes that served patches replaced.",
            "format",
        )
        self.delta_wan_saved = _counter(
            r,
            "relay_delta_wan_bytes_saved",
            "Upstream bytes saved by rebuilding targets from a parent relay's patch.",
        )
        self.delta_rejected = _counter(
            r, "relay_delta_rejected", "Patches refused on apply, by reason.", "reason"
        )
        self.agent_events = _counter(
            r, "relay_agent_events", "Agent outcome reports by event and reason.", "event", "reason"
        )
        self.background_failures = _counter(
            r, "relay_background_failures", "Failures of background loops, by task.", "task"
        )
        self.worker_restarts = _counter(
            r, "relay_worker_restarts", "Worker processes started again after they exited."
        )
        self.agents = _gauge(r, "relay_agents", "Agents known to the registry.")
        self.agents_by_state = CallbackGauge(
            "relay_agents_by_state",
            "Agents by their worst state over their products.",
            ("state",),
            {(s,): 0.0 for s in STATES},
        )
        r.register(self.agents_by_state)
        self.agents_by_version = CallbackGauge(
            "relay_agents_by_version",
            "Agents by installed version of each product (versions of the verified "
            "metadata; others count as 'other').",
            ("product", "version"),
        )
        r.register(self.agents_by_version)
        self.checkins = _counter(r, "relay_checkins", "Agent check-ins.")
        self._reasons: set[str] = set()
        for event in ("checked", "downloaded", "installed", "failed"):
            self.agent_events.labels(event, "")
        for source in ("cache", "upstream", "metadata", "delta"):
            self.bytes_served.values[source,] += 0.0
        for result in ("new", "unchanged", "failed"):
            self.sync_runs.labels(result)

    def agent_event(self, event: str, reason: str) -> None:
        """Count one agent report event; reasons beyond :data:`MAX_REASONS` are ``other``."""
        if reason and reason not in self._reasons:
            if len(self._reasons) >= MAX_REASONS:
                reason = "other"
            else:
                self._reasons.add(reason)
        self.agent_events.labels(event, reason).inc()

    def bind(self, gauge: Gauge, func: Callable[[], float]) -> None:
        """Have ``gauge`` report ``func()`` at scrape time."""
        gauge.set_function(func)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
