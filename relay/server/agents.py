"""Agent-facing API: ``POST /v1/checkin`` and ``POST /v1/reports`` (DESIGN §7).

Rules:

* Bodies are JSON objects; a bad body is ``400`` with ``{"error": ...}`` naming the
  field. A body larger than :data:`MAX_BODY` is refused (``413``) from its
  ``Content-Length``, before it is read.
* Validation is pure (:func:`parse_checkin`, :func:`parse_reports`); the handler
  then asks the policy for offers and records the check-in in the registry.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from relay.core.model import is_sha256
from relay.core.policy import Action, AgentView
from relay.core.policy import offers as policy_offers
from relay.core.protocol import (
    AGENT_ID_RULE,
    DEFAULT_GROUP,
    GROUP_RULE,
    DeltaFormat,
    Event,
    InstalledItem,
    ReportEvent,
    Via,
    delta_formats,
    is_agent_id,
    is_group,
    now_rfc3339,
    rfc3339,
    utc_now,
)

logger = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
MAX_INSTALLED = 1000
MAX_EVENTS = 1000


class BodyError(ValueError):
    """A request body is malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class CheckinRequest:
    """A validated check-in body."""

    agent_id: str
    group: str
    installed: tuple[InstalledItem, ...]
    accept_delta: tuple[DeltaFormat, ...]
    defer_days: int


def _str(
    obj: dict[str, Any], key: str, where: str, *, default: str | None = None, max_len: int = 256
) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise BodyError(f"{where}{key}: expected a string")
    if len(value) > max_len:
        raise BodyError(f"{where}{key}: longer than {max_len} characters")
    return value


def _agent_id(data: dict[str, Any]) -> str:
    agent_id = _str(data, "agent_id", "")
    if not is_agent_id(agent_id):
        raise BodyError(f"agent_id: {AGENT_ID_RULE}")
    return agent_id


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a JSON object.

    Raises:
        BodyError: not UTF-8 JSON, or not an object.
    """
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BodyError(f"body: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BodyError("body: expected a JSON object")
    return data


def parse_checkin(
    data: dict[str, Any], deferral_days: tuple[int, ...] = (1, 3, 7)
) -> CheckinRequest:
    """Validate a check-in body; ``defer_days`` must be 0 or one of ``deferral_days``.

    Raises:
        BodyError: a field is missing or malformed (the message names it).
    """
    agent_id = _agent_id(data)
    group = _str(data, "group", "", default=DEFAULT_GROUP)
    if not is_group(group):
        raise BodyError(f"group: {GROUP_RULE}")
    installed_raw = data.get("installed", [])
    if not isinstance(installed_raw, list):
        raise BodyError("installed: expected a list")
    if len(installed_raw) > MAX_INSTALLED:
        raise BodyError(f"installed: more than {MAX_INSTALLED} entries")
    installed = []
    for i, item in enumerate(installed_raw):
        where = f"installed[{i}]."
        if not isinstance(item, dict):
            raise BodyError(f"installed[{i}]: expected an object")
        sha = _str(item, "sha256", where)
        if not is_sha256(sha):
            raise BodyError(f"{where}sha256: expected 64 lowercase hex digits")
        installed.append(
            InstalledItem(_str(item, "product", where), _str(item, "version", where), sha)
        )
    accept_raw = data.get("accept_delta", [])
    if not isinstance(accept_raw, list) or not all(isinstance(f, str) for f in accept_raw):
        raise BodyError("accept_delta: expected a list of format names")
    accept = delta_formats(accept_raw)
    defer = data.get("defer_days", 0)
    allowed = (0, *deferral_days)
    if isinstance(defer, bool) or not isinstance(defer, int) or defer not in allowed:
        raise BodyError(f"defer_days: expected one of {', '.join(map(str, allowed))}")
    return CheckinRequest(agent_id, group, tuple(installed), accept, defer)


def parse_reports(data: dict[str, Any]) -> tuple[str, list[ReportEvent]]:
    """Validate a reports body.

    Raises:
        BodyError: a field is missing or malformed (the message names it).
    """
    agent_id = _agent_id(data)
    events_raw = data.get("events")
    if not isinstance(events_raw, list):
        raise BodyError("events: expected a list")
    if len(events_raw) > MAX_EVENTS:
        raise BodyError(f"events: more than {MAX_EVENTS} entries")
    events = []
    for i, item in enumerate(events_raw):
        where = f"events[{i}]."
        if not isinstance(item, dict):
            raise BodyError(f"events[{i}]: expected an object")
        event = _str(item, "event", where)
        if event not in Event.__members__.values():
            raise BodyError(f"{where}event: expected one of {', '.join(Event)}")
        via = _str(item, "via", where, default=Via.FULL)
        if via not in Via.__members__.values():
            raise BodyError(f"{where}via: expected one of {', '.join(Via)}")
        nbytes = item.get("bytes", 0)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise BodyError(f"{where}bytes: expected a non-negative integer")
        at = _str(item, "at", where, default="")
        if at:
            try:
                dt.datetime.fromisoformat(at)
            except ValueError:
                raise BodyError(f"{where}at: expected an RFC 3339 time") from None
        events.append(
            ReportEvent(
                product=_str(item, "product", where),
                from_version=_str(item, "from_version", where, default=""),
                to_version=_str(item, "to_version", where, default=""),
                event=Event(event),
                via=Via(via),
                bytes=nbytes,
                reason=_str(item, "reason", where, default="", max_len=64),
                message=_str(item, "message", where, default="", max_len=2000),
                at=at or now_rfc3339(),
            )
        )
    return agent_id, events


def bad_request(message: str) -> web.Response:
    """``400`` with a JSON error."""
    return web.json_response({"error": message}, status=400)


async def read_json_body(request: web.Request) -> dict[str, Any] | web.Response:
    """Read a bounded JSON object body, or return the error response."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        return web.json_response({"error": f"body: larger than {MAX_BODY} bytes"}, status=413)
    ctype = request.content_type
    if ctype not in ("application/json", "application/octet-stream", ""):
        return web.json_response({"error": "body: expected application/json"}, status=415)
    raw = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        raw += chunk
        if len(raw) > MAX_BODY:
            return web.json_response({"error": f"body: larger than {MAX_BODY} bytes"}, status=413)
    try:
        return parse_json_object(bytes(raw))
    except BodyError as e:
        return bad_request(str(e))


# -- handlers --------------------------------------------------------------------


def _product_version(key: str) -> tuple[str, str]:
    product, _, version = key.partition("@")
    return product, version


def _base_url(request: web.Request, public_url: str) -> str:
    if public_url:
        return public_url.rstrip("/")
    return str(request.url.origin())


async def checkin(request: web.Request) -> web.StreamResponse:
    """``POST /v1/checkin``: inventory in, per-product offers out."""
    from relay.server.app import STATE  # noqa: PLC0415 - app imports this module's users

    state = request.app[STATE]
    body = await read_json_body(request)
    if isinstance(body, web.Response):
        return body
    try:
        req = parse_checkin(body, state.policy.settings.deferral_days)
    except BodyError as e:
        return bad_request(str(e))
    current = state.mirror.current
    if current is None:
        return web.json_response(
            {"error": "no verified metadata yet"}, status=503, headers={"Retry-After": "5"}
        )
    record = state.registry.checkin(
        req.agent_id,
        group=req.group,
        address=request.remote or "",
        installed=[i.to_dict() for i in req.installed],
        defer_days=req.defer_days,
    )
    now = utc_now()
    view = AgentView(
        agent_id=req.agent_id,
        group=req.group,
        installed=req.installed,
        first_offered={
            _product_version(k): dt.datetime.fromtimestamp(v, dt.UTC)
            for k, v in record.first_offered.items()
            if "@" in k
        },
        defer_days=req.defer_days,
    )
    policy = state.policy
    offers = policy_offers(current.targets.values(), policy.state, policy.settings, view, now)
    base = _base_url(request, state.config.relay.public_url)
    installed_sha = {i.product: i.sha256 for i in req.installed}
    out = []
    for offer in offers:
        target = offer.target
        delta = None
        if target is not None and offer.action is not Action.NONE:
            record.first_offered.setdefault(f"{offer.product}@{target.version}", now.timestamp())
            src = installed_sha.get(offer.product)
            if src is not None and src != target.sha256 and state.deltas is not None:
                accept = list(req.accept_delta)
                patch = state.deltas.lookup(src, target.sha256, accept) if accept else None
                if patch is not None:
                    delta = {
                        "url": f"{base}/deltas/{src}/{target.sha256}",
                        "format": str(patch.format),
                        "length": patch.length,
                    }
                elif accept and state.config.delta.enabled:
                    state.deltas.request(src, target.sha256)
        out.append(
            {
                "product": offer.product,
                "action": str(offer.action),
                "target": target.path if target is not None else None,
                "version": target.version if target is not None else None,
                "sha256": target.sha256 if target is not None else None,
                "length": target.length if target is not None else None,
                "delta": delta,
                "mode": str(offer.mode),
                "deadline": rfc3339(offer.deadline),
            }
        )
    await state.registry.save(record)
    state.metrics.checkins.inc()
    cfg = state.config
    relays_only = policy.settings.relays_only
    origin = None
    if not relays_only:
        origin = cfg.policy.origin_url or (cfg.upstream.urls[0] if cfg.upstream.urls else None)
    return web.json_response(
        {
            "offers": out,
            "relays": [f"{base}/", *cfg.policy.relays],
            "origin": origin,
            "relays_only": relays_only,
            "poll_seconds": cfg.policy.poll_seconds,
        }
    )


async def reports(request: web.Request) -> web.StreamResponse:
    """``POST /v1/reports``: agents' outcome events."""
    from relay.fleet.registry import AgentRecord  # noqa: PLC0415
    from relay.server.app import STATE  # noqa: PLC0415

    state = request.app[STATE]
    body = await read_json_body(request)
    if isinstance(body, web.Response):
        return body
    try:
        agent_id, events = parse_reports(body)
    except BodyError as e:
        return bad_request(str(e))
    record = state.registry.get(agent_id) or AgentRecord(
        agent_id=agent_id, first_seen=time.time(), address=request.remote or ""
    )
    for event in events:
        state.metrics.agent_events.labels(event.event, event.reason or "").inc()
        if event.event == "failed":
            record.failures += 1
        record.last_outcome = event.to_dict()
        if event.event == "failed":
            logger.warning(
                "agent %s: %s %s -> %s failed (%s): %s",
                agent_id,
                event.product,
                event.from_version,
                event.to_version,
                event.reason,
                event.message,
            )
    record.last_seen = time.time()
    await state.registry.save(record)
    return web.json_response({"accepted": len(events)}, status=202)
