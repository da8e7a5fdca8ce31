"""Admin API under ``/v1/admin/`` (bearer token; off without one).

Rules:

* The token comes from ``admin.token_file`` or ``RELAY_ADMIN__TOKEN``; it is
  compared in constant time and never logged. Without a configured token every
  admin route answers 404 (the API is off); a missing or wrong token is 401 and
  changes nothing.
* Every change goes to the audit log with when, what and from where; so do syncs
  asked for here and refusals (wrong tokens, changes a replica or a missing EULA
  acceptance refuses), the wrong tokens within the bounds of
  :mod:`relay.server.signin`.
* Failed sign-ins are counted, logged and slowed down per client address
  (:mod:`relay.server.signin`): past the limit, ``429`` with ``Retry-After``.
* On a replica, changes answer 409 (the parent decides); reads work.
* An unknown path under ``/v1/admin/`` answers 404 JSON naming the closest route
  (after the token check: without the token the routes are not listed); a known path
  with another method answers 405.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
import time
from typing import Any

from aiohttp import web

from relay.core.hints import closest, did_you_mean
from relay.core.policy import (
    RolloutMode,
    Status,
    accept_eula,
    approve,
    decline,
    effective_status,
    explicit_approval,
    reset,
)
from relay.core.protocol import GROUP_RULE, is_group, now_rfc3339, utc_now
from relay.errors import (
    BodyError,
    EulaNotAcceptedError,
    ReplicaReadOnlyError,
    StateUnavailableError,
)
from relay.fleet.groups import known_groups
from relay.server.fleet import agents_page, csv_response
from relay.server.http import Handler, add_counted, bad_request, parse_body, read_json_body
from relay.server.signin import SignInGuard
from relay.server.state import SIGN_INS, STATE, RelayState

logger = logging.getLogger(__name__)

ADMIN_OFF = (
    "the admin API is off: no admin token is configured; set admin.token_file "
    "(relay serve --admin-token-file FILE) or RELAY_ADMIN__TOKEN, then reload\n"
)
_PLACEHOLDER = re.compile(r"\{(\w+)(:[^}]*)?\}")


def _authorised(request: web.Request, token: str) -> None:
    if not token:
        raise web.HTTPNotFound(text=ADMIN_OFF)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if not sign_in(request, given.strip() if scheme.lower() == "bearer" else None):
        raise web.HTTPUnauthorized(
            text="missing or wrong bearer token\n", headers={"WWW-Authenticate": "Bearer"}
        )


def sign_in(request: web.Request, given: str | None) -> bool:
    """Check an admin token (API or status page); a failure is counted, logged, audited.

    Returns:
        Whether ``given`` is the admin token.

    Raises:
        web.HTTPTooManyRequests: this address failed too often lately (even a right
            token waits: guessing must not go on).
    """
    state = request.app[STATE]
    guard = request.app[SIGN_INS]
    who = request.remote or ""
    now = time.monotonic()
    if (wait := guard.blocked_for(who, now)) > 0:
        state.metrics.admin_signin_failures.labels("rate_limited").inc()
        raise web.HTTPTooManyRequests(
            text="too many failed sign-ins from this address\n",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    token = state.admin_token
    if given is not None and token and hmac.compare_digest(given.encode(), token.encode()):
        return True
    failures = guard.failed(who, now)
    state.metrics.admin_signin_failures.labels("refused").inc()
    logger.warning(
        "admin: wrong or missing token from %s for %s %s (%d in the last %g s)",
        who,
        request.method,
        request.path,
        failures,
        guard.window,
    )
    if guard.may_audit(now):
        _audit(state, {"action": "refused-sign-in", "path": request.path, "from": who})
    return False


async def _record(state: RelayState, entry: dict[str, Any]) -> None:
    """Record ``entry`` in the audit log (a state store that cannot save it only loses it)."""
    try:
        await state.policy.record(entry)
    except StateUnavailableError as e:
        logger.warning("audit entry not saved (%s): %s", e, entry)


def _audit(state: RelayState, entry: dict[str, Any]) -> None:
    """Record ``entry`` in the background (from code that cannot wait)."""
    state.spawn(_record(state, entry), "audit")


def _state(request: web.Request) -> RelayState:
    state = request.app[STATE]
    _authorised(request, state.admin_token)
    return state


async def _conflict(request: web.Request, action: str, message: str) -> web.Response:
    await _record(
        request.app[STATE],
        {"action": f"refused-{action}", "reason": message, "from": request.remote or ""},
    )
    return web.json_response({"error": message}, status=409)


async def list_updates(request: web.Request) -> web.Response:
    """``GET /v1/admin/updates``: every target with its status per group, and the groups."""
    state = _state(request)
    current = state.mirror.current
    policy = state.policy
    out = []
    groups = known_groups(state.registry, state.policy.state)
    for target in sorted(
        current.targets.values() if current else [], key=lambda t: (t.product, t.info.semver)
    ):
        every = policy.state.approvals.get((target.product, target.version, None))
        out.append(
            {
                "product": target.product,
                "version": target.version,
                "path": target.path,
                "kind": str(target.info.kind),
                "severity": str(target.info.severity),
                "channel": str(target.info.channel),
                "eula": target.info.eula,
                "eula_accepted": (
                    target.info.eula in policy.state.eulas_accepted if target.info.eula else None
                ),
                "status": str(every.status) if every else str(Status.UNDEFINED),
                "effective": {
                    g: str(effective_status(policy.state, policy.settings, target, g))
                    for g in groups
                },
                "mode": {
                    g: str(a.mode)
                    for g in groups
                    if (a := explicit_approval(policy.state, target, g)) is not None
                },
            }
        )
    return web.json_response({"updates": out, "groups": groups})


def _parse_approval(
    body: dict[str, Any],
) -> tuple[str, str, Status, str | None, RolloutMode]:
    product = _field(body, "product")
    version = _field(body, "version")
    group = body.get("group")
    if group is not None and not isinstance(group, str):
        raise BodyError("group: expected a string or null")
    try:
        status = Status(_field(body, "status"))
        mode = RolloutMode(body.get("mode", "forced"))
    except ValueError as e:
        raise BodyError(f"status or mode: {e}") from None
    return product, version, status, group, mode


async def change_approval(
    state: RelayState,
    *,
    product: str,
    version: str,
    status: Status,
    group: str | None,
    mode: RolloutMode,
    who: str,
) -> tuple[int, dict[str, Any]]:
    """Approve, decline or reset an update; save, audit, and prefetch what became wanted.

    Returns:
        The HTTP status and JSON body to answer (``404`` for an unknown update,
        ``409`` on a replica or with an unaccepted EULA).

    Raises:
        Nothing: refusals are answers.
    """
    current = state.mirror.current
    target = next(
        (
            t
            for t in (current.targets.values() if current else [])
            if t.product == product and t.version == version
        ),
        None,
    )
    if target is None:
        known = [f"{t.product} {t.version}" for t in (current.targets.values() if current else [])]
        hint = did_you_mean(f"{product} {version}", known)
        return 404, {"error": f"no update {product} {version}{hint}"}
    policy = state.policy
    try:
        policy.check_writable()
        if status is Status.APPROVED:
            new = approve(policy.state, target, group=group, mode=mode, at=now_rfc3339(), by=who)
        elif status is Status.DECLINED:
            new = decline(policy.state, target, group=group, at=now_rfc3339(), by=who)
        else:
            new = reset(policy.state, target, group=group)
        await policy.update(
            state=new,
            audit={
                "action": f"set-{status}",
                "product": product,
                "version": version,
                "group": group,
                "mode": str(mode),
                "from": who,
            },
        )
    except (ReplicaReadOnlyError, EulaNotAcceptedError) as e:
        await _record(state, {"action": "refused-approval", "reason": str(e), "from": who})
        return 409, {"error": str(e)}
    _after_change(state)
    return 200, {
        "ok": True,
        "product": product,
        "version": version,
        "status": str(status),
        "group": group,
    }


async def set_approval(request: web.Request) -> web.Response:
    """``POST /v1/admin/approvals``: approve, decline or reset an update."""
    state = _state(request)
    parsed = await parse_body(request, _parse_approval)
    if isinstance(parsed, web.Response):
        return parsed
    product, version, status, group, mode = parsed
    code, body = await change_approval(
        state,
        product=product,
        version=version,
        status=status,
        group=group,
        mode=mode,
        who=request.remote or "",
    )
    return web.json_response(body, status=code)


async def accept(request: web.Request) -> web.Response:
    """``POST /v1/admin/eulas``: accept the EULA at a target path."""
    state = _state(request)
    path = await parse_body(request, lambda body: _field(body, "path"))
    if isinstance(path, web.Response):
        return path
    current = state.mirror.current
    if current is None or (
        path not in current.targets
        and not any(t.info.eula == path for t in current.targets.values())
    ):
        return web.json_response({"error": f"no EULA {path} in the metadata"}, status=404)
    policy = state.policy
    try:
        await policy.update(
            state=accept_eula(policy.state, path),
            audit={"action": "accept-eula", "path": path, "from": request.remote or ""},
        )
    except ReplicaReadOnlyError as e:
        return await _conflict(request, "eula", str(e))
    _after_change(state)
    return web.json_response({"ok": True, "accepted": path})


async def get_eula(request: web.Request) -> web.StreamResponse:
    """``GET /v1/admin/eulas/{path}``: the EULA text, from the verified target."""
    state = _state(request)
    path = request.match_info["path"]
    current = state.mirror.current
    target = current.targets.get(path) if current else None
    if target is None:
        raise web.HTTPNotFound(text="no such target\n")
    await state.mirror.ensure(target)
    return web.FileResponse(
        state.mirror.store.path(target.sha256),
        headers={"Content-Type": "text/plain; charset=utf-8"},
    )


async def get_settings(request: web.Request) -> web.Response:
    """``GET /v1/admin/settings``."""
    state = _state(request)
    return web.json_response(state.policy.settings.to_dict())


async def put_settings(request: web.Request) -> web.Response:
    """``PUT /v1/admin/settings``: save some settings (``null``: follow the configuration)."""
    state = _state(request)
    body = await read_json_body(request)
    if isinstance(body, web.Response):
        return body
    try:
        new = await state.policy.save_settings(
            body, {"action": "settings", "changes": body, "from": request.remote or ""}
        )
    except ReplicaReadOnlyError as e:
        return await _conflict(request, "settings", str(e))
    except ValueError as e:
        return bad_request(str(e))
    _after_change(state)
    return web.json_response(new.to_dict())


def _group(request: web.Request) -> str:
    group = request.match_info["group"]
    if not is_group(group):
        raise web.HTTPBadRequest(
            text=f'{{"error": "group: {GROUP_RULE}"}}', content_type="application/json"
        )
    return group


async def get_group_settings(request: web.Request) -> web.Response:
    """``GET /v1/admin/groups/{group}/settings``: the agent settings of a group."""
    state = _state(request)
    return web.json_response(state.policy.group_settings(_group(request)).to_dict())


async def put_group_settings(request: web.Request) -> web.Response:
    """``PUT /v1/admin/groups/{group}/settings``: set some of a group's agent settings."""
    state = _state(request)
    group = _group(request)
    body = await read_json_body(request)
    if isinstance(body, web.Response):
        return body
    try:
        new = await state.policy.set_group_settings(
            group,
            body,
            audit={
                "action": "group-settings",
                "group": group,
                "changes": body,
                "from": request.remote or "",
            },
        )
    except ValueError as e:
        return bad_request(str(e))
    except ReplicaReadOnlyError as e:
        return await _conflict(request, "group-settings", str(e))
    return web.json_response(new.to_dict())


async def list_agents(request: web.Request) -> web.Response:
    """``GET /v1/admin/agents?limit=&after=``: a page of agents by id, with their worst state."""
    return await agents_page(_state(request).registry, request.query)


async def get_agent(request: web.Request) -> web.Response:
    """``GET /v1/admin/agents/{id}``: one agent, its report rows and recent events (newest first).

    Raises:
        web.HTTPNotFound: no agent with that id.
    """
    state = _state(request)
    record = state.registry.get(request.match_info["agent_id"])
    if record is None:
        raise web.HTTPNotFound(text="no such agent\n")
    rows = state.registry.rows_of(record, utc_now())
    return web.json_response({**record.to_dict(), "products": [r.to_dict() for r in rows]})


async def report_csv(request: web.Request) -> web.Response:
    """``GET /v1/admin/report.csv``: one row per agent and product (``?state=&group=&product=``)."""
    return await csv_response(_state(request), request.query)


async def versions(request: web.Request) -> web.Response:
    """``GET /v1/admin/versions``: agents per product, version and group, and by state."""
    state = _state(request)
    summary = await state.registry.summary()
    return web.json_response(
        {
            "versions": [v.to_dict() for v in summary.versions],
            "states": {str(k): v for k, v in summary.states.items()},
            "agents": summary.agents,
        }
    )


async def audit(request: web.Request) -> web.Response:
    """``GET /v1/admin/audit``: the newest audit entries."""
    state = _state(request)
    return web.json_response({"audit": await state.policy.audit_log()})


async def export_policy(request: web.Request) -> web.Response:
    """``GET /v1/admin/policy``: state and settings, for replica relays."""
    state = _state(request)
    return web.json_response(state.policy.export())


async def sync_now(request: web.Request) -> web.Response:
    """``POST /v1/admin/sync``: run a sync now (and wait for it)."""
    state = _state(request)
    cleared = state.mirror.clear_backoff()  # the operator says the upstream is fixed
    result = await state.mirror.sync_once()
    await _record(
        state,
        {
            "action": "sync",
            "result": result.value,
            "backoffs_cleared": cleared,
            "from": request.remote or "",
        },
    )
    return web.json_response({"result": result.value})


def _field(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise BodyError(f"{key}: expected a non-empty string")
    return value


def _after_change(state: RelayState) -> None:
    # Policy decides prefetch: fetch what became wanted.
    state.on_policy_change()


def _pattern(path: str) -> re.Pattern[str]:
    # "/v1/admin/agents/{agent_id}" matches any one segment; "{path:.+}" its own pattern.
    parts = _PLACEHOLDER.split(path)
    out = []
    for i, part in enumerate(parts):
        if i % 3 == 0:
            out.append(re.escape(part))
        elif i % 3 == 1:
            out.append(parts[i + 1][1:] if parts[i + 1] else "[^/]+")
    return re.compile("".join(out))


def _not_found(routes: tuple[tuple[str, str, Handler], ...]) -> Handler:
    patterns = [(method, _pattern(path)) for method, path, _ in routes]
    paths = sorted({path for _, path, _ in routes})

    async def not_found(request: web.Request) -> web.Response:
        _state(request)  # the API is off, or the token is wrong: say that first
        allowed = {m for m, pattern in patterns if pattern.fullmatch(request.path)}
        if allowed:
            allowed |= {"HEAD"} if "GET" in allowed else set()
            return web.json_response(
                {"error": f"{request.method} is not allowed on {request.path}"},
                status=405,
                headers={"Allow": ", ".join(sorted(allowed))},
            )
        body: dict[str, Any] = {"error": f"no admin route {request.path}", "routes": paths}
        close = closest(request.path, paths)
        if close is not None:
            body["did_you_mean"] = close
            body["error"] += did_you_mean(request.path, paths)
        return web.json_response(body, status=404)

    return not_found


def add_admin_routes(app: web.Application) -> None:
    """Register ``/v1/admin/…`` (counted as one route, ``admin``).

    Any other path under ``/v1/admin/`` answers 404 with the closest route, or 405.
    """
    app[SIGN_INS] = SignInGuard()
    routes: tuple[tuple[str, str, Handler], ...] = (
        ("GET", "/v1/admin/updates", list_updates),
        ("POST", "/v1/admin/approvals", set_approval),
        ("POST", "/v1/admin/eulas", accept),
        ("GET", "/v1/admin/eulas/{path:.+}", get_eula),
        ("GET", "/v1/admin/settings", get_settings),
        ("PUT", "/v1/admin/settings", put_settings),
        ("GET", "/v1/admin/groups/{group}/settings", get_group_settings),
        ("PUT", "/v1/admin/groups/{group}/settings", put_group_settings),
        ("GET", "/v1/admin/agents", list_agents),
        ("GET", "/v1/admin/agents/{agent_id}", get_agent),
        ("GET", "/v1/admin/report.csv", report_csv),
        ("GET", "/v1/admin/versions", versions),
        ("GET", "/v1/admin/audit", audit),
        ("GET", "/v1/admin/policy", export_policy),
        ("POST", "/v1/admin/sync", sync_now),
    )
    add_counted(app, "admin", routes)
    add_counted(app, "admin", (("*", "/v1/admin/{tail:.*}", _not_found(routes)),))
