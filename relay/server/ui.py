"""The status page under ``/ui/``: server-rendered HTML for a branch operator.

Rules:

* Nothing is shown without signing in with the admin token (the same token as
  the admin API; without one configured, ``/ui/`` answers 404 like the API).
* Signing in sets an ``HttpOnly``, ``SameSite=Strict`` cookie holding a random
  session id; sessions live in memory with an expiry (:data:`SESSION_SECONDS`)
  and end on sign-out or restart. The token itself is never stored in a cookie.
* Every change is a ``POST`` form carrying the session's CSRF token; a missing
  or wrong one is ``403`` and changes nothing.
* Every value is escaped (:func:`html.escape`); pages use no external assets
  and no script (inline CSS only, ``Content-Security-Policy`` says so).
"""

from __future__ import annotations

import hmac
import html
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from aiohttp import web

from relay import __version__
from relay.core.fleet import FleetState, ReportRow
from relay.core.policy import RolloutMode, Status, effective_status, explicit_approval
from relay.core.protocol import rfc3339, utc_now
from relay.errors import BodyError
from relay.fleet.groups import known_groups
from relay.server.admin import change_approval, sign_in
from relay.server.fleet import csv_response, parse_filter, parse_page, report_page
from relay.server.http import BodyTimeoutError, add_counted, body_deadline
from relay.server.state import STATE, RelayState

SESSION_COOKIE = "relay_session"
SESSION_SECONDS = 8 * 3600
MAX_SESSIONS = 1000
MAX_ROWS = 1000  # agent rows shown on a page (then a link to the next; the CSV has them all)
_FILTERS = ("state", "group", "product")
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(slots=True)
class Session:
    """One signed-in browser."""

    csrf: str
    expires: float


class Sessions:
    """Signed-in sessions in memory, by random id, with an expiry; the oldest go first."""

    def __init__(
        self,
        ttl: float = SESSION_SECONDS,
        limit: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._limit = limit
        self._clock = clock
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def open(self) -> tuple[str, Session]:
        """Start a session: its id (for the cookie) and its CSRF token."""
        while len(self._by_id) >= self._limit:
            self._by_id.popitem(last=False)
        sid = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(32), self._clock() + self._ttl)
        self._by_id[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        """The live session of ``sid`` (an expired one is dropped)."""
        if not sid:
            return None
        session = self._by_id.get(sid)
        if session is not None and session.expires <= self._clock():
            del self._by_id[sid]
            return None
        return session

    def close(self, sid: str | None) -> None:
        """End the session of ``sid``, if any."""
        if sid:
            self._by_id.pop(sid, None)

    def __len__(self) -> int:
        return len(self._by_id)


SESSIONS = web.AppKey("ui_sessions", Sessions)


# -- rendering helpers ------------------------------------------------------------

_CSS = """
:root{--fg:#1b1f24;--mut:#57606a;--bg:#fff;--line:#d0d7de;--ok:#1a7f37;--warn:#9a6700;
--bad:#cf222e;--info:#0969da;--chip:#f6f8fa}
*{box-sizing:border-box}body{margin:0;font:15px/1.45 system-ui,sans-serif;color:var(--fg);
background:var(--bg)}header{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:center;
justify-content:space-between;padding:.6rem 1rem;border-bottom:1px solid var(--line);
background:var(--chip)}header h1{font-size:1.1rem;margin:0}main{max-width:78rem;margin:0 auto;
padding:0 1rem 2rem}h2{font-size:1.05rem;margin:1.5rem 0 .5rem}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(15rem,1fr));gap:.75rem}
.card{border:1px solid var(--line);border-radius:6px;padding:.6rem .8rem}
.card dt{color:var(--mut);font-size:.85rem}.card dd{margin:0 0 .4rem}
.scroll{overflow-x:auto;border:1px solid var(--line);border-radius:6px}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid var(--line);
vertical-align:top}th{background:var(--chip);white-space:nowrap}
.badge{display:inline-block;padding:0 .45rem;border-radius:1rem;font-size:.8rem;
border:1px solid currentColor;white-space:nowrap}
.up-to-date,.approved,.ok{color:var(--ok)}.pending,.undefined{color:var(--info)}
.deferred{color:var(--warn)}.failed,.declined,.bad{color:var(--bad)}.unknown{color:var(--mut)}
form.inline{display:inline-flex;gap:.25rem;flex-wrap:wrap;margin:.2rem 0}
button,select,input{font:inherit;padding:.2rem .5rem;border:1px solid var(--line);
border-radius:4px;background:var(--bg)}button{cursor:pointer;background:var(--chip)}
.msg{white-space:pre-wrap;color:var(--mut);max-width:30rem}.mut{color:var(--mut)}
.bar{height:.5rem;background:var(--chip);border-radius:.25rem;overflow:hidden}
.bar span{display:block;height:100%;background:var(--info)}
.login{max-width:22rem;margin:4rem auto;padding:1rem}.login input{width:100%;margin:.5rem 0}
.error{color:var(--bad)}nav a{margin-right:.75rem}
@media (max-width:40rem){body{font-size:14px}.scroll{border:0}thead{display:none}
tr{display:block;border:1px solid var(--line);border-radius:6px;margin:0 0 .6rem}
td{display:grid;grid-template-columns:6.5rem minmax(0,1fr);gap:.5rem;border:0;
padding:.2rem .5rem}td.empty{display:none}td::before{content:attr(data-label);color:var(--mut)}}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _page(
    title: str, body: str, *, status: int = 200, session: Session | None = None
) -> web.Response:
    sign_out = (
        f'<form class="inline" method="post" action="/ui/logout">{_csrf(session)}'
        '<button type="submit">Sign out</button></form>'
        if session is not None
        else ""
    )
    text = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>relay {_e(__version__)}: {_e(title)}</h1>{sign_out}</header>"
        f"<main>{body}</main></body></html>"
    )
    return web.Response(
        text=text, status=status, content_type="text/html", charset="utf-8", headers=_HEADERS
    )


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, **_HEADERS})


def _csrf(session: Session | None) -> str:
    token = session.csrf if session is not None else ""
    return f'<input type="hidden" name="csrf" value="{_e(token)}">'


def _badge(word: str) -> str:
    return f'<span class="badge {_e(word)}">{_e(word)}</span>'


def _table(headers: Sequence[str], rows: Iterable[Iterable[str]], *, label: str) -> str:
    """A table; on a narrow screen each row becomes a card of labelled cells."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td data-label="{_e(h)}"{"" if c else " class=empty"}><div>{c}</div></td>'
            for h, c in zip(headers, row, strict=True)
        )
        + "</tr>"
        for row in rows
    )
    return (
        f'<div class="scroll"><table aria-label="{_e(label)}">'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def _ago(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "never"
    s = abs(int(seconds))
    return f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s // 3600} h"


def _dl(items: Iterable[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


# -- sessions and checks --------------------------------------------------------------


def _ui_on(request: web.Request) -> Sessions:
    if not request.app[STATE].admin_token:  # read per request: SIGHUP may change it
        raise web.HTTPNotFound(text="the status page is off (no admin token configured)\n")
    return request.app[SESSIONS]


def _signed_in(request: web.Request) -> Session | None:
    return _ui_on(request).get(request.cookies.get(SESSION_COOKIE))


async def _form(request: web.Request) -> Mapping[str, object]:
    """The posted form, read within ``limits.body_timeout``.

    Raises:
        web.HTTPRequestTimeout: the body did not arrive in time (the connection is closed).
    """
    try:
        async with body_deadline(request):
            return await request.post()
    except BodyTimeoutError as e:
        raise web.HTTPRequestTimeout(
            text=f"{e}\n", headers={**_HEADERS, "Connection": "close"}
        ) from None


async def _change_form(request: web.Request) -> tuple[Session, Mapping[str, str]]:
    """The form of a change, after the session and CSRF checks.

    Raises:
        web.HTTPForbidden: not signed in, or a missing or wrong CSRF token.
    """
    session = _signed_in(request)
    form = await _form(request)
    given = form.get("csrf")
    if (
        session is None
        or not isinstance(given, str)
        or not hmac.compare_digest(given.encode(), session.csrf.encode())
    ):
        raise web.HTTPForbidden(
            text="refused: sign in again (missing or wrong CSRF token)\n", headers=_HEADERS
        )
    return session, {k: v for k, v in form.items() if isinstance(v, str)}


# -- handlers -------------------------------------------------------------------------


async def login_form(request: web.Request) -> web.Response:
    """``GET /ui/login``: the sign-in form."""
    _ui_on(request)
    return _login_page()


def _login_page(error: str = "", status: int = 200) -> web.Response:
    message = f'<p class="error" role="alert">{_e(error)}</p>' if error else ""
    body = (
        '<form class="login card" method="post" action="/ui/login">'
        "<h2>Sign in</h2><label for=token>Admin token</label>"
        '<input id="token" name="token" type="password" autocomplete="current-password" required>'
        f'{message}<button type="submit">Sign in</button></form>'
    )
    return _page("sign in", body, status=status)


async def login(request: web.Request) -> web.StreamResponse:
    """``POST /ui/login``: check the admin token, start a session, go to the status page."""
    sessions = _ui_on(request)
    form = await _form(request)
    given = form.get("token")
    if not sign_in(request, given if isinstance(given, str) else None):
        return _login_page("Wrong token.", status=401)
    sessions.close(request.cookies.get(SESSION_COOKIE))
    sid, _session = sessions.open()
    response = _see_other("/ui/")
    response.set_cookie(
        SESSION_COOKIE,
        sid,
        max_age=SESSION_SECONDS,
        path="/ui/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    """``POST /ui/logout``: end the session."""
    await _change_form(request)
    request.app[SESSIONS].close(request.cookies.get(SESSION_COOKIE))
    response = _see_other("/ui/login")
    response.del_cookie(SESSION_COOKIE, path="/ui/")
    return response


async def approval(request: web.Request) -> web.StreamResponse:
    """``POST /ui/approvals``: approve, decline or reset an update for a group (or all)."""
    session, form = await _change_form(request)
    state = request.app[STATE]
    try:
        status = Status(form.get("status", ""))
        mode = RolloutMode(form.get("mode") or RolloutMode.FORCED)
    except ValueError:
        return _page("refused", "<p>Unknown status or mode.</p>", status=400, session=session)
    code, answer = await change_approval(
        state,
        product=form.get("product", ""),
        version=form.get("version", ""),
        status=status,
        group=form.get("group") or None,
        mode=mode,
        who=f"ui {request.remote or ''}".strip(),
    )
    if code != 200:
        body = (
            f'<p class="error" role="alert">{_e(answer["error"])}</p><p><a href="/ui/">Back</a></p>'
        )
        return _page("refused", body, status=code, session=session)
    return _see_other("/ui/#updates")


async def report(request: web.Request) -> web.StreamResponse:
    """``GET /ui/report.csv``: the fleet report download (same filters as the admin API)."""
    if _signed_in(request) is None:
        return _see_other("/ui/login")
    return await csv_response(request.app[STATE], request.query)


async def agent_page(request: web.Request) -> web.StreamResponse:
    """``GET /ui/agents/{agent_id}``: one agent's products and recent events."""
    session = _signed_in(request)
    if session is None:
        return _see_other("/ui/login")
    state = request.app[STATE]
    agent_id = request.match_info["agent_id"]
    record = state.registry.get(agent_id)
    if record is None:
        return _page("no such agent", "<p>No such agent.</p>", status=404, session=session)
    facts = _dl(
        [
            ("Group", _e(record.group)),
            ("Address", _e(record.address)),
            ("First seen", _e(rfc3339(record.first_seen) or "")),
            ("Last seen", _e(rfc3339(record.last_seen) or "")),
            ("Failures reported", _e(record.failures)),
            ("Deferral chosen", _e(f"{record.defer_days} days" if record.defer_days else "none")),
        ]
    )
    events = _table(
        ["At", "Event", "Product", "From", "To", "Via", "Reason", "Message"],
        (
            [
                _e(ev.get("at", "")),
                _badge(str(ev.get("event", ""))),
                _e(ev.get("product", "")),
                _e(ev.get("from_version", "")),
                _e(ev.get("to_version", "")),
                _e(ev.get("via", "")),
                _e(ev.get("reason", "")),
                f'<div class="msg">{_e(ev.get("message", ""))}</div>',
            ]
            for ev in record.events
        ),
        label="recent events",
    )
    body = (
        '<p><a href="/ui/">&larr; Status</a></p>'
        f'<div class="card">{facts}</div><h2>Products</h2>'
        f"{_agent_rows(state.registry.rows_of(record, utc_now()), link=False)}"
        f"<h2>Recent events (newest first)</h2>{events}"
    )
    return _page(f"agent {agent_id}", body, session=session)


async def index(request: web.Request) -> web.StreamResponse:
    """``GET /ui/``: health, sync, cache, updates with approvals, agents and their failures."""
    session = _signed_in(request)
    if session is None:
        return _see_other("/ui/login")
    state = request.app[STATE]
    try:
        wanted = parse_filter(request.query)
        after, _limit = parse_page(request.query)
    except BodyError as e:
        return _page("refused", f"<p>{_e(e)}</p>", status=400, session=session)
    page = await report_page(state.registry, wanted, after, MAX_ROWS)
    counts = page.summary.states
    chips = " ".join(
        f'<a href="/ui/?state={_e(s)}#agents">{_badge(s)} {counts[s]}</a>' for s in FleetState
    )
    filters = {k: v for k, v in request.query.items() if k in _FILTERS and v}
    query = urlencode(filters)
    csv_link = "/ui/report.csv" + (f"?{query}" if query else "")
    more = (
        f'<p><a href="/ui/?{_e(urlencode({**filters, "after": page.next}))}#agents">'
        "Next agents &rarr;</a> "
        '<span class="mut">(the CSV has them all)</span></p>'
        if page.next is not None
        else ""
    )
    body = (
        '<nav><a href="#health">Health</a><a href="#updates">Updates</a>'
        '<a href="#agents">Agents</a></nav>'
        '<h2 id="health">Health and cache</h2>'
        f'<div class="grid">{_health(state)}{_cache(state)}</div>'
        f'<h2 id="updates">Updates</h2>{_updates(state, session)}'
        f'<h2 id="agents">Agents ({len(state.registry)})</h2><p>{chips} '
        f'<a href="/ui/#agents">all</a></p>'
        f'<p><a href="{_e(csv_link)}" download>Download the report (CSV)</a> '
        f'<a href="/ui/report.csv?state=failed" download>failed only</a></p>'
        f"{_agent_rows(page.rows, link=True)}{more}"
    )
    return _page("status", body, session=session)


def _health(state: RelayState) -> str:
    mirror = state.mirror
    current = mirror.current
    expires_in = mirror.seconds_until_expiry() if current is not None else None
    if current is None:
        ready = _badge("failed") + " no verified metadata yet"
    elif expires_in is not None and expires_in <= 0:
        ready = _badge("failed") + f" the served timestamp expired {_ago(expires_in)} ago"
    else:
        ready = _badge("ok")
    upstreams = "<br>".join(
        f"{_badge('ok' if h.failing_since is None else 'failed')} {_e(h.url)}"
        + (f' <span class="mut">{_e(h.last_error)}</span>' if h.failing_since is not None else "")
        for h in mirror.upstream.health.values()
    )
    since = time.time() - mirror.last_sync_ok if mirror.last_sync_ok else None
    items = [
        ("Ready", ready),
        (
            "Metadata",
            _e(f"timestamp v{current.timestamp_version}, {len(current.targets)} targets")
            if current
            else "none",
        ),
        ("Expires in", _e(_ago(expires_in)) if expires_in is not None and expires_in > 0 else "-"),
        ("Last good sync", _e(f"{_ago(since)} ago" if since is not None else "never")),
        (
            "Sync error",
            f'<span class="bad">{_e(mirror.last_sync_error)}</span>'
            if mirror.last_sync_error
            else "none",
        ),
        ("Upstreams", upstreams or "none"),
    ]
    return f'<div class="card">{_dl(items)}</div>'


def _cache(state: RelayState) -> str:
    store = state.mirror.store
    used, quota = store.used_bytes, store.max_bytes
    share = min(100.0, 100.0 * used / quota) if quota else 0.0
    bar = (
        f'<div class="bar" title="{share:.0f}%"><span style="width:{share:.1f}%"></span></div>'
        if quota
        else ""
    )
    items = [
        ("Blob store", _e(f"{_size(used)} of {_size(quota) if quota else 'unlimited'}") + bar),
        ("Blobs", _e(store.object_count)),
        ("Transfers now", _e(state.gate.active)),
        ("Agents known", _e(len(state.registry))),
    ]
    return f'<div class="card">{_dl(items)}</div>'


def _updates(state: RelayState, session: Session) -> str:
    current = state.mirror.current
    policy = state.policy
    groups = known_groups(state.registry, policy.state)
    targets = sorted(
        current.targets.values() if current else [], key=lambda t: (t.product, t.info.semver)
    )
    rows = []
    for target in targets:
        cells = [
            _e(target.product),
            _e(target.version),
            _e(target.info.kind),
            _e(target.info.severity),
        ]
        for group in [None, *groups]:
            if group is None:
                explicit = policy.state.approvals.get((target.product, target.version, None))
                word = str(explicit.status) if explicit else str(Status.UNDEFINED)
            else:
                word = str(effective_status(policy.state, policy.settings, target, group))
                explicit = explicit_approval(policy.state, target, group)
            mode = (
                f' <span class="mut">{_e(explicit.mode)}</span>'
                if explicit and explicit.status is Status.APPROVED
                else ""
            )
            cells.append(
                _badge(word) + mode + _approval_form(target.product, target.version, group, session)
            )
        rows.append(cells)
    if not rows:
        return '<p class="mut">No verified updates yet.</p>'
    return _table(
        ["Product", "Version", "Kind", "Severity", "All groups", *groups], rows, label="updates"
    )


def _approval_form(product: str, version: str, group: str | None, session: Session) -> str:
    label = f"{product} {version} for {group or 'all groups'}"
    return (
        f'<form class="inline" method="post" action="/ui/approvals" aria-label="{_e(label)}">'
        f"{_csrf(session)}"
        f'<input type="hidden" name="product" value="{_e(product)}">'
        f'<input type="hidden" name="version" value="{_e(version)}">'
        f'<input type="hidden" name="group" value="{_e(group or "")}">'
        '<select name="mode" aria-label="rollout mode"><option value="forced">forced</option>'
        '<option value="on-demand">on-demand</option></select>'
        '<button name="status" value="approved">Approve</button>'
        '<button name="status" value="declined">Decline</button>'
        '<button name="status" value="undefined">Reset</button></form>'
    )


def _agent_rows(rows: Iterable[ReportRow], *, link: bool) -> str:
    def agent(row: ReportRow) -> str:
        if not link:
            return _e(row.agent_id)
        return f'<a href="/ui/agents/{_e(quote(row.agent_id))}">{_e(row.agent_id)}</a>'

    table_rows = [
        [
            agent(r),
            _e(r.group),
            _e(r.product or "(agent)"),
            _e(r.installed_version),
            _e(r.offered_version),
            _badge(r.state),
            _e(r.reason),
            f'<div class="msg">{_e(r.message)}</div>' if r.message else "",
            _e(r.last_seen),
        ]
        for r in rows
    ]
    if not table_rows:
        return '<p class="mut">No agents match.</p>'
    return _table(
        [
            "Agent",
            "Group",
            "Product",
            "Installed",
            "Offered",
            "State",
            "Reason",
            "Message",
            "Last seen",
        ],
        table_rows,
        label="agents",
    )


async def _to_index(_request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently("/ui/")


def add_ui_routes(app: web.Application) -> None:
    """Register ``/ui/…`` (counted as one route, ``ui``) and its in-memory sessions."""
    app[SESSIONS] = Sessions()
    add_counted(
        app,
        "ui",
        (
            ("GET", "/ui", _to_index),
            ("GET", "/ui/", index),
            ("GET", "/ui/login", login_form),
            ("POST", "/ui/login", login),
            ("POST", "/ui/logout", logout),
            ("POST", "/ui/approvals", approval),
            ("GET", "/ui/report.csv", report),
            ("GET", "/ui/agents/{agent_id}", agent_page),
        ),
    )
