"""Agent-facing API: ``POST /v1/checkin`` and ``POST /v1/reports``.

Rules:

* Bodies are bounded JSON objects (:func:`relay.server.http.read_json_body`),
  validated by the pure parsers of :mod:`relay.core.protocol`; a bad body is
  ``400`` with ``{"error": ...}`` naming the field.
* A check-in asks the policy for offers, adds delta URLs where a patch from the
  agent's installed version exists, records the agent in the registry with
  what it was offered per product (a product it neither has nor is offered is
  not recorded), and answers an ``agent_token`` (:mod:`relay.core.tokens`) the
  agent sends back as ``Relay-Agent-Token``. A check-in whose valid token names
  another id is 403. A check-in that changed the record in substance (a new
  agent, its group, installed versions, offers, first-offer times) answers once
  the record is committed; one that only moves ``last_seen`` or the address is
  written with the registry's next batch (:mod:`relay.fleet.registry`).
* Reports come only from agents that checked in: with a valid token for the id
  they name, or, without one, from the address that id last checked in from
  (else 403; a report never creates a record). A report updates the registry
  (recent events, installed versions), committed before the answer. Reasons outside the
  known set count as ``other`` in metrics; the text stays in the agent's record.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

from aiohttp import web

from relay.core.fleet import LastOffer
from relay.core.policy import Action, AgentView, Offer
from relay.core.policy import offers as policy_offers
from relay.core.protocol import (
    AGENT_TOKEN_HEADER,
    Event,
    parse_checkin,
    parse_reports,
    reason_label,
    rfc3339,
    utc_now,
)
from relay.core.tokens import issue_token
from relay.server.events import EVENTS
from relay.server.http import parse_body, verified_agent
from relay.server.state import AGENT_SECRET, STATE

logger = logging.getLogger(__name__)

# -- handlers --------------------------------------------------------------------


def _product_version(key: str) -> tuple[str, str]:
    product, _, version = key.partition("@")
    return product, version


def _last_offer(offer: Offer, now: dt.datetime) -> LastOffer:
    target = offer.target
    moving = offer.action is not Action.NONE and target is not None
    return LastOffer(
        action=offer.action,
        version=target.version if moving and target is not None else "",
        sha256=target.sha256 if moving and target is not None else "",
        mode=offer.mode,
        deadline=rfc3339(offer.deadline),
        at=rfc3339(now) or "",
    )


def _base_url(request: web.Request, public_url: str) -> str:
    if public_url:
        return public_url.rstrip("/")
    return str(request.url.origin())


async def checkin(request: web.Request) -> web.StreamResponse:
    """``POST /v1/checkin``: inventory in, per-product offers out."""
    state = request.app[STATE]
    req = await parse_body(
        request, lambda body: parse_checkin(body, state.policy.settings.deferral_days)
    )
    if isinstance(req, web.Response):
        return req
    proven = verified_agent(request)
    if proven is not None and proven != req.agent_id:
        return _forbidden(f"agent_id: the token is for {proven}, not {req.agent_id}")
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
            for k, v in record.first_offered_items()
            if "@" in k
        },
        defer_days=req.defer_days,
    )
    policy = state.policy
    offers = policy_offers(current.targets.values(), policy.state, policy.settings, view, now)
    base = _base_url(request, state.config.relay.public_url)
    installed_sha = {i.product: i.sha256 for i in req.installed}
    out = []
    offered: dict[str, LastOffer] = {}
    first_offered: dict[str, float] = {}
    for offer in offers:
        target = offer.target
        delta = None
        if offer.action is not Action.NONE or offer.product in installed_sha:
            offered[offer.product] = _last_offer(offer, now)
        if target is not None and offer.action in (Action.INSTALL, Action.ROLLBACK):
            first_offered[f"{offer.product}@{target.version}"] = now.timestamp()
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
    state.registry.set_offers(record, offered, first_offered)
    await state.registry.save(record)
    state.metrics.checkins.inc()
    cfg = state.config
    relays_only = policy.settings.relays_only
    origin = None
    if not relays_only:
        origin = cfg.policy.origin_url or (cfg.upstream.urls[0] if cfg.upstream.urls else None)
    settings = policy.group_settings(req.group)
    return web.json_response(
        {
            "offers": out,
            "relays": [f"{base}/", *cfg.policy.relays],
            "origin": origin,
            "relays_only": relays_only,
            "poll_seconds": settings.poll_seconds,
            "generation": str(request.app[EVENTS].generation(req.group)),
            "settings": settings.to_dict(),
            "agent_token": issue_token(request.app[AGENT_SECRET], req.agent_id, time.time()),
        }
    )


def _forbidden(message: str) -> web.Response:
    return web.json_response({"error": message}, status=403)


async def reports(request: web.Request) -> web.StreamResponse:
    """``POST /v1/reports``: agents' outcome events."""
    state = request.app[STATE]
    parsed = await parse_body(request, parse_reports)
    if isinstance(parsed, web.Response):
        return parsed
    agent_id, events = parsed
    known = state.registry.get(agent_id)
    if known is None:
        return _forbidden(f"agent_id: {agent_id} has not checked in with this relay")
    if verified_agent(request) != agent_id and known.address != (request.remote or ""):
        return _forbidden(f"agent_id: no valid {AGENT_TOKEN_HEADER} for {agent_id}")
    record = state.registry.report(agent_id, events, address=request.remote or "")
    failed = [e for e in events if e.event is Event.FAILED]
    for event in events:
        state.metrics.agent_event(event.event, reason_label(event.reason))
    if failed:  # one line per report, whatever it holds
        first = failed[0]
        logger.warning(
            "agent %s: %s %s -> %s failed (%s): %s%s",
            agent_id,
            first.product,
            first.from_version,
            first.to_version,
            first.reason,
            first.message,
            f" (and {len(failed) - 1} more failures)" if len(failed) > 1 else "",
        )
    await state.registry.save(record)
    return web.json_response({"accepted": len(events)}, status=202)
