"""One /metrics for several processes: the merge (pure), and the leader's scrape of workers.

The merge is tested on real prometheus-client registries rendered and parsed again,
with Hypothesis drawing what each process counted; the scrape with real aiohttp
servers on Unix sockets standing in for worker processes (a dead one and a stuck
one among them), and promtool checking the merged text.
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from relay.metrics import (
    ADDITIVE_GAUGES,
    RelayMetrics,
    WorkerTotals,
    merge_families,
    parse_families,
    render_families,
)
from relay.server.internal import METRICS_PATH
from relay.server.ops import merged_metrics
from tests.test_monitoring import tool

BUCKETS = (1.0, 5.0, 25.0)
LABELS = ("a", "b", "c")

process = st.fixed_dictionaries(
    {
        "counts": st.dictionaries(st.sampled_from(LABELS), st.integers(1, 1000), max_size=3),
        "observations": st.lists(st.floats(0, 50, allow_nan=False), max_size=5),
        "open": st.integers(0, 100),
        "limit": st.integers(0, 10**9),
    }
)


def _registry(drawn) -> bytes:
    r = CollectorRegistry()
    counter = Counter("t_requests", "Requests.", ["route"], registry=r)
    for label, n in drawn["counts"].items():
        counter.labels(label).inc(n)
    histogram = Histogram("t_waiters", "Waiters.", buckets=BUCKETS, registry=r)
    for x in drawn["observations"]:
        histogram.observe(x)
    Gauge("t_open", "Open things (additive).", registry=r).set(drawn["open"])
    Gauge("t_limit", "A limit (not additive).", registry=r).set(drawn["limit"])
    return generate_latest(r)


def _values(text: bytes) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parse_families(text.decode())
        for s in family.samples
    }


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(process, min_size=1, max_size=4))
def test_counters_and_histograms_add_up_gauges_where_additive(processes):
    texts = [_registry(p) for p in processes]
    merged = render_families(
        merge_families(
            parse_families(texts[0].decode()),
            [parse_families(t.decode()) for t in texts[1:]],
            additive={"t_open"},
        )
    )
    values = _values(merged)
    for label in LABELS:
        total = sum(p["counts"].get(label, 0) for p in processes)
        key = ("t_requests_total", (("route", label),))
        assert values.get(key, 0) == total
    observations = [x for p in processes for x in p["observations"]]
    assert values["t_waiters_count", ()] == len(observations)
    assert values["t_waiters_sum", ()] == pytest.approx(sum(observations))
    for bound in BUCKETS:
        expected = sum(1 for x in observations if x <= bound)
        assert values["t_waiters_bucket", (("le", str(bound)),)] == expected
    assert values["t_waiters_bucket", (("le", "+Inf"),)] == len(observations)
    assert values["t_open", ()] == sum(p["open"] for p in processes)
    assert values["t_limit", ()] == processes[0]["limit"]  # the leader's
    # Created times are the earliest, not sums.
    created = [_values(t)["t_waiters_created", ()] for t in texts]
    assert values["t_waiters_created", ()] == min(created)


def _family(text: str):
    return parse_families(text)


@pytest.mark.parametrize(
    ("leader", "worker", "expected"),
    [
        pytest.param(
            "# TYPE x_total counter\nx_total 2\n",
            '# TYPE x_total counter\nx_total 3\nx_total{k="new"} 1\n',
            {("x_total", ()): 5, ("x_total", (("k", "new"),)): 1},
            id="a series only a worker has is added",
        ),
        pytest.param(
            "# TYPE x gauge\nx 2\n",
            '# TYPE x histogram\nx_bucket{le="+Inf"} 3\nx_count 3\nx_sum 3\n',
            {("x", ()): 2},
            id="a family of another type is left out",
        ),
        pytest.param(
            '# TYPE s summary\ns{quantile="0.5"} 1\ns_count 2\ns_sum 3\n',
            '# TYPE s summary\ns{quantile="0.5"} 9\ns_count 1\ns_sum 9\n',
            {("s", (("quantile", "0.5"),)): 1, ("s_count", ()): 3, ("s_sum", ()): 12},
            id="quantiles are not sums",
        ),
        pytest.param(
            "# TYPE g gauge\n",
            '# TYPE g gauge\ng{k="w"} 4\n',
            {("g", (("k", "w"),)): 4},
            id="a gauge the leader lacks is the worker's",
        ),
        pytest.param(
            "# TYPE relay_connections gauge\nrelay_connections 2\n",
            "# TYPE relay_connections gauge\nrelay_connections 5\n",
            {("relay_connections", ()): 7},
            id="the relay's additive gauges add up",
        ),
    ],
)
def test_merge_table(leader, worker, expected):
    merged = merge_families(_family(leader), [_family(worker)], ADDITIVE_GAUGES)
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in merged for s in f.samples}
    assert got == expected


def test_the_samples_of_one_series_stay_together():
    leader = '# TYPE h histogram\nh_bucket{r="a",le="1.0"} 1\nh_bucket{r="a",le="+Inf"} 1\nh_count{r="a"} 1\nh_sum{r="a"} 1\n'
    worker = '# TYPE h histogram\nh_bucket{r="b",le="1.0"} 0\nh_bucket{r="b",le="+Inf"} 2\nh_count{r="b"} 2\nh_sum{r="b"} 4\nh_bucket{r="a",le="1.0"} 2\nh_bucket{r="a",le="+Inf"} 2\nh_count{r="a"} 2\nh_sum{r="a"} 2\n'
    (family,) = merge_families(_family(leader), [_family(worker)])
    routes = [s.labels["r"] for s in family.samples]
    assert routes == ["a"] * 4 + ["b"] * 4
    assert [s.value for s in family.samples[:4]] == [3, 3, 3, 3]


def test_text_that_is_not_the_exposition_format_is_refused():
    with pytest.raises(ValueError, match="Prometheus text format"):
        parse_families('x{k="unterminated} 1\n')


# -- the leader's scrape of its workers ------------------------------------------------


async def _worker(path, metrics: RelayMetrics | None, *, stuck: asyncio.Event | None = None):
    """A stand-in worker process: its registry's text on a Unix socket."""

    async def handler(_request):
        if stuck is not None:
            await stuck.wait()
        assert metrics is not None
        return web.Response(body=metrics.render(), content_type="text/plain")

    app = web.Application()
    app.router.add_get(METRICS_PATH, handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    return runner


async def test_the_leader_merges_every_worker_that_answers(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sockets = {slot: run_dir / f"worker-{slot}.sock" for slot in range(1, 5)}
    leader, one, two = RelayMetrics(), RelayMetrics(), RelayMetrics()
    for m, n in ((leader, 1), (one, 2), (two, 4)):
        m.checkins.inc(n)
        m.requests.inc(("target", "200"), n)
        m.connections.set(n)
        m.fill_waiters.observe(n)
        m.cache_bytes.set(1000 * n)  # the store's: only the leader's counts
    stuck = asyncio.Event()
    runners = [
        await _worker(sockets[1], one),
        await _worker(sockets[2], two),
        await _worker(sockets[4], RelayMetrics(), stuck=stuck),  # answers too late
    ]  # slot 3 is dead: nothing listens
    try:
        body = await merged_metrics(leader, sockets, timeout=1.0)
    finally:
        stuck.set()
        for runner in runners:
            await runner.cleanup()
    values = _values(body)
    assert values["relay_checkins_total", ()] == 7
    assert values["relay_http_requests_total", (("route", "target"), ("status", "200"))] == 7
    assert values["relay_connections", ()] == 7
    assert values["relay_fill_waiters_count", ()] == 3
    assert values["relay_cache_bytes", ()] == 1000
    up = {slot: values["relay_worker_up", (("slot", str(slot)),)] for slot in range(5)}
    assert up == {0: 1, 1: 1, 2: 1, 3: 0, 4: 0}
    errors = {
        labels: v
        for (name, labels), v in values.items()
        if name == "relay_worker_scrape_errors_total"
    }
    assert errors == {(("slot", "3"),): 1, (("slot", "4"),): 1}
    check = await asyncio.to_thread(
        subprocess.run, [tool("promtool"), "check", "metrics"], input=body, capture_output=True
    )
    assert check.returncode == 0 and not check.stdout and not check.stderr, check


# -- counters that never go backwards --------------------------------------------------


class _Process:
    """A worker process's registry as the leader sees it: a counter and a start time."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0

    def families(self):
        text = (
            "# TYPE process_start_time_seconds gauge\n"
            f"process_start_time_seconds {self.start}\n"
            "# TYPE relay_checkins_total counter\n"
            f"relay_checkins_total {self.count}\n"
            "# TYPE relay_connections gauge\n"
            "relay_connections 3\n"
        )
        return parse_families(text)


def _merged_checkins(totals, slot, process, answers):
    contributions = totals.answered(slot, process.families()) if answers else totals.missing(slot)
    merged = merge_families(parse_families(""), contributions)
    values = {s.name: s.value for f in merged for s in f.samples}
    return values.get("relay_checkins_total", 0), values.get("relay_connections", 0)


steps = st.lists(
    st.one_of(
        st.tuples(st.just("count"), st.integers(1, 50)),
        st.tuples(st.just("restart"), st.just(0)),
        st.tuples(st.just("silent"), st.just(0)),
    ),
    max_size=30,
)


@given(steps)
def test_a_workers_counters_never_go_backwards(steps):
    totals = WorkerTotals()
    process = _Process(start=100.0)
    counted = seen = 0
    for step, n in [*steps, ("count", 0)]:
        answers = step != "silent"
        if step == "count":
            process.count += n
            counted += n
        elif step == "restart":
            process = _Process(start=process.start + 1)
        total, connections = _merged_checkins(totals, 1, process, answers)
        assert total >= seen  # never backwards
        seen = total
        assert connections == (3 if answers else 0)  # a silent worker's gauges are left out
    assert seen == counted  # once it answers, everything it ever counted
