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
* What runs? ``relay_build_info{version}``, ``relay_worker_up{slot}`` and
  ``relay_worker_scrape_errors_total{slot}`` (the processes of one relay), and the
  standard ``process_*`` and ``python_*`` collectors of prometheus-client.

Several processes, one relay: each process has its own registry, and the
leader's ``/metrics`` merges the workers' texts into its own
(:func:`merge_families`): counters, histograms and summaries are summed by name
and labels, gauges only where the sum means something (:data:`ADDITIVE_GAUGES`,
marked where they are made: open connections, transfers in flight, memory), all
other gauges are the leader's (the store, the fleet, the sync live there).

Agent-supplied reasons outside the reference agent's set count as ``other``
(:func:`relay.core.protocol.reason_label`); beyond that, the first
:data:`MAX_REASONS` distinct values get their own label value. Versions in
``relay_agents_by_version`` are those of the verified metadata (signed, so
bounded); any other version an agent reports counts as ``other``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping

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
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

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


__all__ = [
    "ADDITIVE_GAUGES",
    "CONTENT_TYPE_LATEST",
    "MAX_REASONS",
    "STATES",
    "CallbackGauge",
    "RelayMetrics",
    "WorkerTotals",
    "merge_families",
    "parse_families",
    "render_families",
]

MAX_REASONS = 50
"""Distinct agent-supplied reasons with a label value of their own."""
STATES = ("up-to-date", "pending", "deferred", "failed", "unknown")
"""The fleet states (``relay.core.fleet.FleetState`` values), the bounded label set."""


ADDITIVE_GAUGES = frozenset(
    {
        "relay_active_transfers",
        "relay_connections",
        "relay_events_held",
        "process_open_fds",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
    }
)
"""Gauges whose values of several processes add up to the relay's: what each holds open."""


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
            "evicted, header_timeout, head_too_large, slow_reader, body_timeout).",
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
        self.worker_up = _gauge(
            r,
            "relay_worker_up",
            "1 if the process in a slot answered the leader's last scrape (slot 0: the "
            "leader); only with several processes (relay.workers).",
            "slot",
        )
        self.worker_totals = WorkerTotals()  # the leader's: what its workers counted
        self.worker_scrape_errors = _counter(
            r,
            "relay_worker_scrape_errors",
            "Scrapes of a worker process's metrics that failed or timed out, by slot; "
            "that scrape lacks its series.",
            "slot",
        )
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


# -- one relay, several processes ------------------------------------------------------

_SUMMED_TYPES = frozenset({"counter", "histogram", "gaugehistogram", "summary"})
_SERIES_LABELS = frozenset({"le", "quantile"})  # labels of one series' samples, not of the series

_SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def parse_families(text: str) -> list[Metric]:
    """Parse the text exposition format (a process's ``render()``).

    Returns:
        The metric families, in order.

    Raises:
        ValueError: the text is not the exposition format.
    """
    try:
        return list(text_string_to_metric_families(text))
    except (ValueError, IndexError, KeyError) as e:  # the parser's ways of refusing a line
        raise ValueError(f"not the Prometheus text format: {e}") from e


def merge_families(
    own: Iterable[Metric],
    others: Iterable[Iterable[Metric]],
    additive: Collection[str] = ADDITIVE_GAUGES,
) -> list[Metric]:
    """Merge the metric families of several processes into the relay's.

    Rules, by (sample name, labels):

    * counters, histograms and summaries: summed (a summary's quantiles and any
      ``_created`` sample are not sums: the leader's, else the earliest);
    * gauges named in ``additive``: summed;
    * every other gauge (and info, state set, unknown): the leader's value, else
      the first other process's that has the series;
    * a family whose type differs from the leader's is left out (mixed versions).

    Pure: families in, families out; the leader's order first, new series after.

    Args:
        own: the leader's families.
        others: each other process's families.
        additive: the gauges whose values add up.

    Returns:
        The merged families.
    """
    merged: dict[str, Metric] = {}
    series: dict[str, dict[_SampleKey, Sample]] = {}
    for families in (own, *others):
        for family in families:
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                series[family.name] = {}
            elif target.type != family.type:
                continue
            summed = family.type in _SUMMED_TYPES or (
                family.type == "gauge" and family.name in additive
            )
            samples = series[family.name]
            for sample in family.samples:
                key = _key(sample)
                known = samples.get(key)
                if known is None:
                    samples[key] = sample
                elif sample.name.endswith("_created"):
                    samples[key] = known._replace(value=min(known.value, sample.value))
                elif summed and "quantile" not in sample.labels:
                    samples[key] = known._replace(value=known.value + sample.value)
    for name, family in merged.items():
        family.samples = _grouped(list(series[name].values()))
    return list(merged.values())


def _series(sample: Sample) -> tuple[tuple[str, str], ...]:
    """The label set of the series a sample belongs to (without ``le`` or ``quantile``)."""
    return tuple(sorted((k, v) for k, v in sample.labels.items() if k not in _SERIES_LABELS))


def _grouped(samples: list[Sample]) -> list[Sample]:
    """Samples with those of one series together, series in first-seen order (stable)."""
    order: dict[tuple[tuple[str, str], ...], int] = {}
    for sample in samples:
        order.setdefault(_series(sample), len(order))
    return sorted(samples, key=lambda s: order[_series(s)])


class WorkerTotals:
    """The leader's memory of each worker's counters, so the relay's never go backwards.

    Prometheus reads any drop of a counter as a reset, and a sum of processes'
    counters drops whenever one is left out (it did not answer a scrape) or starts
    again at 0 (the process was restarted). So for each slot the leader keeps the
    counters, histograms and summaries of its last answer, and what earlier
    processes in that slot had counted when they ended (*carried*):

    * a slot that answers contributes its families and its carried totals;
    * a slot that does not answer contributes its last answer's counters and its
      carried totals (its gauges are left out: they describe the present);
    * a slot whose process changed (another ``process_start_time_seconds``, or a
      counter lower than before) first adds its last answer to its carried totals.

    Pure (families in, families out); one instance per leader, for its lifetime.
    """

    def __init__(self) -> None:
        self._last: dict[int, list[Metric]] = {}
        self._carried: dict[int, list[Metric]] = {}
        self._start: dict[int, float | None] = {}

    def answered(self, slot: int, families: list[Metric]) -> list[list[Metric]]:
        """Record a slot's answer.

        Returns:
            What the slot contributes to the merge: its families, then its carried
            totals (when it has any).
        """
        counted = [f for f in families if f.type in _SUMMED_TYPES]
        start = _start_time(families)
        last = self._last.get(slot)
        if last is not None and (self._start.get(slot) != start or _decreased(last, counted)):
            self._carried[slot] = merge_families(self._carried.get(slot, []), [last])
        self._last[slot] = counted
        self._start[slot] = start
        return [families, *self.carried(slot)]

    def missing(self, slot: int) -> list[list[Metric]]:
        """What a slot that did not answer contributes: its last counters, its carried totals.

        Returns:
            Lists of families (none when the slot never answered).
        """
        last = self._last.get(slot)
        return [*([last] if last is not None else []), *self.carried(slot)]

    def carried(self, slot: int) -> list[list[Metric]]:
        """The totals of the slot's earlier processes (empty before its first restart).

        Returns:
            At most one list of families.
        """
        carried = self._carried.get(slot)
        return [carried] if carried else []


def _start_time(families: list[Metric]) -> float | None:
    for family in families:
        if family.name == "process_start_time_seconds" and family.samples:
            return family.samples[0].value
    return None


def _decreased(before: list[Metric], after: list[Metric]) -> bool:
    """Whether any summed sample of ``after`` is lower than in ``before``, or gone."""
    now = {_key(s): s.value for f in after for s in f.samples}
    return any(
        now.get(_key(s), -1.0) < s.value
        for f in before
        for s in f.samples
        if not s.name.endswith("_created") and "quantile" not in s.labels
    )


def _key(sample: Sample) -> _SampleKey:
    return sample.name, tuple(sorted(sample.labels.items()))


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render_families(families: Iterable[Metric]) -> bytes:
    """The text exposition format of ``families`` (what :meth:`RelayMetrics.render` gives).

    Returns:
        The text, as bytes.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families)))
    return generate_latest(registry)
