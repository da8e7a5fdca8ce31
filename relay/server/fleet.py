"""The fleet view the admin API, the status page and the metrics share.

Rules:

* Everything is derived from the registry when asked (states depend on the
  time); nothing here is stored.
* Nothing here walks the registry on the event loop: the report and its counts
  are computed in a thread (:meth:`relay.fleet.registry.Registry.summary`,
  ``rows_sync``); the agent list is read a page at a time from the registry's
  sorted ids (``?limit=&after=``) and its JSON written in a thread.
* Report filters come from the query string (``state``, ``group``,
  ``product``); an unknown state is a ``400`` naming the field.
* Metric labels stay bounded: states are the five fleet states; versions are
  those of the verified metadata, any other version counts as ``other``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aiohttp import web

from relay.core.fleet import FleetState, ReportRow, filter_rows, to_csv
from relay.core.protocol import AGENT_ID_RULE, is_agent_id, utc_now
from relay.errors import BodyError
from relay.fleet.registry import AgentRecord, FleetSummary, Registry
from relay.server.http import bad_request
from relay.server.state import RelayState

CSV_TYPE = "text/csv"
PAGE_DEFAULT = 500
"""Agents per page of ``GET /v1/admin/agents`` when ``limit`` is not given."""
PAGE_MAX = 5000
"""The largest ``limit`` of ``GET /v1/admin/agents``."""


@dataclass(frozen=True, slots=True)
class ReportFilter:
    """Which report rows to keep (``None``: all)."""

    state: FleetState | None = None
    group: str | None = None
    product: str | None = None

    def apply(self, rows: Iterable[ReportRow]) -> list[ReportRow]:
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

    The rows are derived, filtered and written in a thread (a large fleet's
    report takes a while; the loop goes on serving).

    Raises:
        Nothing: a bad filter is answered ``400``.
    """
    try:
        wanted = parse_filter(query)
    except BodyError as e:
        return bad_request(str(e))
    registry = state.registry
    body = await asyncio.to_thread(lambda: to_csv(wanted.apply(registry.rows_sync())))
    return web.Response(
        text=body,
        content_type=CSV_TYPE,
        charset="utf-8",
        headers={
            "Content-Disposition": 'attachment; filename="relay-report.csv"',
            "Cache-Control": "no-store",
        },
    )


def parse_page(query: Mapping[str, str]) -> tuple[str | None, int]:
    """Read ``after`` (an agent id; empty = from the start) and ``limit`` from a query string.

    Returns:
        ``(after, limit)``; ``limit`` is :data:`PAGE_DEFAULT` when not given.

    Raises:
        BodyError: ``limit`` is not an integer from 1 to :data:`PAGE_MAX`, or
            ``after`` is not an agent id.
    """
    raw = query.get("limit", "")
    limit = PAGE_DEFAULT
    if raw:
        if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= PAGE_MAX:
            raise BodyError(f"limit: expected an integer from 1 to {PAGE_MAX}")
        limit = int(raw)
    after = query.get("after") or None
    if after is not None and not is_agent_id(after):
        raise BodyError(f"after: an agent id: {AGENT_ID_RULE}")
    return after, limit


def agent_json(record: AgentRecord, now: dt.datetime) -> dict[str, object]:
    """An agent as the agent list shows it: its record and its worst state."""
    return {**record.to_dict(), "state": str(record.worst_state(now))}


async def agents_page(registry: Registry, query: Mapping[str, str]) -> web.Response:
    """One page of the agent list by id: ``{"agents": [...], "next": <last id> | null}``.

    ``next`` is the id to pass as ``after`` for the following page (``null``
    on the last page). The page is found by bisection of the registry's sorted
    ids; its JSON is written in a thread.

    Raises:
        Nothing: bad parameters are answered ``400``.
    """
    try:
        after, limit = parse_page(query)
    except BodyError as e:
        return bad_request(str(e))
    records = registry.page(after, limit + 1)
    more = len(records) > limit
    records = records[:limit]
    nxt = records[-1].agent_id if more else None

    def body() -> bytes:
        now = utc_now()
        return json.dumps({"agents": [agent_json(r, now) for r in records], "next": nxt}).encode()

    return web.Response(body=await asyncio.to_thread(body), content_type="application/json")


@dataclass(frozen=True, slots=True)
class ReportPage:
    """Report rows of consecutive agents (by id) that match a filter.

    Attributes:
        rows: the rows, at most the limit asked for unless one agent has more.
        next: the last agent id shown when more agents follow (pass it as
            ``after``), else ``None``.
        summary: the counts over every agent.
    """

    rows: tuple[ReportRow, ...]
    next: str | None
    summary: FleetSummary


def report_page_sync(
    registry: Registry, wanted: ReportFilter, after: str | None, limit: int
) -> ReportPage:
    """The matching rows of the agents after ``after``, about ``limit`` of them, and the counts.

    Walks the records: call it from a thread (:func:`report_page`).
    """
    now = utc_now()
    rows: list[ReportRow] = []
    last: str | None = None
    more = False
    for agent_id, agent_rows in _rows_by_agent(registry.rows_sync(now, after=after)):
        if len(rows) >= limit:
            more = True
            break
        rows.extend(wanted.apply(agent_rows))
        last = agent_id
    return ReportPage(tuple(rows), last if more else None, registry.summary_sync(now))


def _rows_by_agent(rows: Iterable[ReportRow]) -> Iterable[tuple[str, list[ReportRow]]]:
    agent_id: str | None = None
    group: list[ReportRow] = []
    for row in rows:
        if row.agent_id != agent_id and group:
            yield group[0].agent_id, group
            group = []
        agent_id = row.agent_id
        group.append(row)
    if group:
        yield group[0].agent_id, group


async def report_page(
    registry: Registry, wanted: ReportFilter, after: str | None, limit: int
) -> ReportPage:
    """:func:`report_page_sync` in a thread."""
    return await asyncio.to_thread(report_page_sync, registry, wanted, after, limit)


def versions_by_label(state: RelayState, summary: FleetSummary) -> dict[tuple[str, ...], float]:
    """Agents per (product, version) for the metric; versions outside the metadata are ``other``."""
    current = state.mirror.current
    known = {(t.product, t.version) for t in current.targets.values()} if current else set()
    products = {p for p, _ in known}
    counts: dict[tuple[str, ...], float] = dict.fromkeys(known, 0.0)
    for (product, version), agents in summary.installed.items():
        if product not in products:
            continue
        key = (product, version) if (product, version) in known else (product, "other")
        counts[key] = counts.get(key, 0.0) + agents
    return counts


def watch_fleet(state: RelayState) -> None:
    """Have the fleet metrics read the registry at scrape time.

    The counts come from the registry's summary (:meth:`Registry.summary_sync`:
    computed again when a record changed, or after a few seconds, walking the
    records), so the metrics are rendered in a thread (``/metrics``).
    """
    metrics = state.metrics
    registry = state.registry
    metrics.bind(metrics.agents, lambda: float(len(registry)))
    metrics.agents_by_state.func = lambda: {
        (str(k),): float(v) for k, v in registry.summary_sync().states.items()
    }
    metrics.agents_by_version.func = lambda: versions_by_label(state, registry.summary_sync())
