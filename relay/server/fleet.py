"""The fleet view the admin API, the status page and the metrics share.

Rules:

* Everything is derived from the registry when asked (states depend on the
  time); nothing here is stored.
* Report filters come from the query string (``state``, ``group``,
  ``product``); an unknown state is a ``400`` naming the field.
* Metric labels stay bounded: states are the five fleet states; versions are
  those of the verified metadata, any other version counts as ``other``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from relay.core.fleet import FleetState, ReportRow, count_states, filter_rows, to_csv
from relay.errors import BodyError
from relay.server.http import bad_request
from relay.server.state import RelayState

CSV_TYPE = "text/csv"


@dataclass(frozen=True, slots=True)
class ReportFilter:
    """Which report rows to keep (``None``: all)."""

    state: FleetState | None = None
    group: str | None = None
    product: str | None = None

    def apply(self, rows: list[ReportRow]) -> list[ReportRow]:
        """The rows that match."""
        return filter_rows(rows, state=self.state, group=self.group, product=self.product)


def parse_filter(query: Mapping[str, str]) -> ReportFilter:
    """Read ``state``, ``group`` and ``product`` from a query string (empty = all).

    Raises:
        BodyError: ``state`` is not a fleet state.
    """
    raw_state = query.get("state") or None
    try:
        state = FleetState(raw_state) if raw_state is not None else None
    except ValueError:
        raise BodyError(f"state: expected one of {', '.join(FleetState)}") from None
    return ReportFilter(state, query.get("group") or None, query.get("product") or None)


async def csv_response(state: RelayState, query: Mapping[str, str]) -> web.Response:
    """The fleet report as an RFC 4180 CSV download, filtered by ``query`` (or a ``400``).

    The rows are read on the event loop (the registry lives there); the CSV is
    written in a thread (a large fleet's report takes a while).

    Raises:
        Nothing: a bad filter is answered ``400``.
    """
    try:
        wanted = parse_filter(query)
    except BodyError as e:
        return bad_request(str(e))
    body = await asyncio.to_thread(to_csv, wanted.apply(state.registry.rows()))
    return web.Response(
        text=body,
        content_type=CSV_TYPE,
        charset="utf-8",
        headers={
            "Content-Disposition": 'attachment; filename="relay-report.csv"',
            "Cache-Control": "no-store",
        },
    )


def versions_by_label(state: RelayState) -> dict[tuple[str, ...], float]:
    """Agents per (product, version) for the metric; versions outside the metadata are ``other``."""
    current = state.mirror.current
    known = {(t.product, t.version) for t in current.targets.values()} if current else set()
    products = {p for p, _ in known}
    counts: dict[tuple[str, ...], float] = dict.fromkeys(known, 0.0)
    for record in state.registry.all():
        for item in record.installed:
            product, version = item.get("product", ""), item.get("version", "")
            if product not in products:
                continue
            key = (product, version) if (product, version) in known else (product, "other")
            counts[key] = counts.get(key, 0.0) + 1
    return counts


def watch_fleet(state: RelayState) -> None:
    """Have the fleet metrics read the registry at scrape time."""
    metrics = state.metrics
    metrics.bind(metrics.agents, lambda: float(len(state.registry)))
    metrics.agents_by_state.func = lambda: {
        (str(k),): float(v) for k, v in count_states(state.registry.rows()).items()
    }
    metrics.agents_by_version.func = lambda: versions_by_label(state)
