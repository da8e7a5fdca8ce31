"""``relay admin``: the admin API from the command line, with readable tables.

The token is read from ``--token-file`` or the ``RELAY_ADMIN__TOKEN`` variable (the
name ``relay serve`` reads it from too), never from the command line (it would show in
process listings). The older ``RELAY_ADMIN_TOKEN`` still works, with a warning. A refused
token is reported with where it was read from.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlencode

import urllib3

from relay.cli.exitcodes import ExitCode
from relay.core.hints import did_you_mean
from relay.errors import ConfigError, RelayError

# As a browser would: follow redirects (at most 10), retry nothing, wait at most 60 s.
_RETRIES = urllib3.Retry(
    total=None, connect=0, read=0, other=0, status=0, redirect=10, respect_retry_after_header=False
)
_TIMEOUT = urllib3.Timeout(60)


class AdminError(RelayError):
    """The admin API refused a request or could not be reached."""


TOKEN_VARIABLE = "RELAY_ADMIN__TOKEN"  # noqa: S105 - a name, not a secret
OLD_TOKEN_VARIABLE = "RELAY_ADMIN_TOKEN"  # noqa: S105 - deprecated (one underscore)


class AdminClient:
    """The admin API of one relay, with its bearer token.

    Args:
        url: the relay's admin base URL.
        token: the bearer token.
        token_source: where the token was read from, named when the relay refuses it.
    """

    def __init__(self, url: str, token: str, token_source: str = "") -> None:
        self.url = url
        self.token_source = token_source
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._pool = urllib3.PoolManager(retries=_RETRIES, timeout=_TIMEOUT)

    def call(self, method: str, path: str, body: object = None) -> Any:  # noqa: ANN401 - JSON
        """Call the admin API and return the decoded JSON (or the text of another type).

        Args:
            method: the HTTP method.
            path: the path under the relay's URL, e.g. ``/v1/admin/updates``.
            body: a JSON value to send, if any.

        Returns:
            The decoded JSON, or the body as text when it is not JSON.

        Raises:
            AdminError: an HTTP error (with the server's message) or no connection.
        """
        data = json.dumps(body).encode() if body is not None else None
        try:
            resp = self._pool.request(
                method, self.url.rstrip("/") + path, body=data, headers=self._headers
            )
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise AdminError(f"{self.url}: cannot connect: {_os_reason(e)}") from None
        text = resp.data.decode(errors="replace")
        if resp.status >= 400:
            detail = text.strip()
            with contextlib.suppress(ValueError, AttributeError):
                detail = json.loads(detail).get("error", detail)
            if resp.status == 401 and self.token_source:
                detail = f"{detail} (the token was read from {self.token_source})"
            raise AdminError(f"{method} {path}: HTTP {resp.status}: {detail}")
        return json.loads(resp.data) if "json" in resp.headers.get("Content-Type", "") else text


def _os_reason(error: BaseException) -> str:
    """The operating system's words for a failed connection (``[Errno 111] Connection refused``).

    urllib3 wraps the socket's error (in ``reason`` and ``__cause__``); say what the
    system said, not which pool gave up.
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and not isinstance(seen, urllib3.exceptions.HTTPError):
            return str(seen)
        nested = seen.reason if isinstance(seen, urllib3.exceptions.MaxRetryError) else None
        seen = nested or seen.__cause__ or seen.__context__
    return str(error)


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """Left-aligned columns."""
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def render_updates(data: dict[str, Any]) -> str:
    """The ``updates`` listing."""
    rows = []
    for u in data["updates"]:
        effective = ", ".join(f"{g}={s}" for g, s in sorted(u["effective"].items()))
        eula = "" if not u["eula"] else ("accepted" if u["eula_accepted"] else "NOT accepted")
        rows.append(
            (
                u["product"],
                u["version"],
                u["kind"],
                u["severity"],
                u["channel"],
                u["status"],
                effective,
                eula,
            )
        )
    return table(
        rows,
        (
            "PRODUCT",
            "VERSION",
            "KIND",
            "SEVERITY",
            "CHANNEL",
            "STATUS",
            "EFFECTIVE BY GROUP",
            "EULA",
        ),
    )


def render_agents(data: dict[str, Any]) -> str:
    """The ``agents`` listing."""
    rows = []
    for a in data["agents"]:
        versions = ", ".join(f"{i['product']} {i['version']}" for i in a["installed"])
        last = a.get("last_outcome") or {}
        outcome = (
            f"{last.get('event', '')} {last.get('product', '')} {last.get('to_version', '')}"
            f"{' (' + last['reason'] + ')' if last.get('reason') else ''}"
        ).strip()
        rows.append(
            (
                a["agent_id"],
                a["group"],
                a["address"],
                versions,
                a.get("state", ""),
                outcome,
                a["failures"],
            )
        )
    return table(
        rows, ("AGENT", "GROUP", "ADDRESS", "INSTALLED", "STATE", "LAST OUTCOME", "FAILURES")
    )


def all_agents(client: AdminClient) -> Iterator[dict[str, Any]]:
    """Every agent of ``GET /v1/admin/agents``, page after page.

    Raises:
        AdminError: a page could not be read.
    """
    after = ""
    while True:
        query = f"?limit=5000&after={quote(after)}" if after else "?limit=5000"
        data = client.call("GET", "/v1/admin/agents" + query)
        yield from data["agents"]
        after = data.get("next") or ""
        if not after:
            return


REPORT_COLUMNS = (
    ("agent_id", "AGENT"),
    ("group", "GROUP"),
    ("product", "PRODUCT"),
    ("installed_version", "INSTALLED"),
    ("offered_version", "OFFERED"),
    ("state", "STATE"),
    ("reason", "REASON"),
    ("last_seen", "LAST SEEN"),
)


def render_report(text: str) -> str:
    """The fleet report CSV as a table (messages are left to the CSV and ``/ui/``)."""
    rows = csv.DictReader(io.StringIO(text, newline=""))
    return table(
        [[" ".join(row.get(k, "").split()) for k, _ in REPORT_COLUMNS] for row in rows],
        [h for _, h in REPORT_COLUMNS],
    )


def _report(client: AdminClient, args: argparse.Namespace) -> str:
    query = urlencode(
        {k: v for k in ("state", "group", "product") if (v := getattr(args, k, None))}
    )
    text = client.call("GET", "/v1/admin/report.csv" + (f"?{query}" if query else ""))
    return str(text).rstrip("\r\n") if args.csv else render_report(str(text))


def render_versions(data: dict[str, Any]) -> str:
    """Agents per product, version and group; then agents by state."""
    rows = []
    for v in data["versions"]:
        reasons = ", ".join(f"{r or '?'}: {n}" for r, n in sorted(v["reasons"].items()))
        rows.append(
            (
                v["product"],
                v["version"],
                v["group"],
                v["installed"],
                v["up_to_date"],
                v["pending"],
                v["deferred"],
                v["failed"],
                reasons,
            )
        )
    header = (
        "PRODUCT",
        "VERSION",
        "GROUP",
        "INSTALLED",
        "UP-TO-DATE",
        "PENDING",
        "DEFERRED",
        "FAILED",
        "REASONS",
    )
    states = ", ".join(f"{s} {n}" for s, n in data["states"].items())
    return f"{table(rows, header)}\n\nagents: {data['agents']} ({states})"


def render_audit(data: dict[str, Any]) -> str:
    """The audit log."""
    rows = []
    for e in data["audit"]:
        what = {k: v for k, v in e.items() if k not in ("at", "action", "from")}
        rows.append(
            (
                e.get("at", ""),
                e.get("action", ""),
                e.get("from", ""),
                json.dumps(what, sort_keys=True),
            )
        )
    return table(rows, ("WHEN", "ACTION", "FROM", "DETAILS"))


def read_token(
    token_file: Path | None, environ: Mapping[str, str], warn: TextIO | None = None
) -> tuple[str, str]:
    """Return the bearer token and where it was read from.

    From ``token_file`` if given, else ``RELAY_ADMIN__TOKEN``, else the deprecated
    ``RELAY_ADMIN_TOKEN`` (with a warning line on ``warn``, by default stderr).

    Raises:
        ConfigError: the file cannot be read, or there is no token.
    """
    if token_file is not None:
        source = f"--token-file {token_file}"
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            raise ConfigError(
                "--token-file", str(token_file), "command line", f"cannot be read: {e.strerror}"
            ) from None
        if not token:
            raise ConfigError("--token-file", str(token_file), "command line", "is empty")
        return token, source
    if token := environ.get(TOKEN_VARIABLE, "").strip():
        return token, TOKEN_VARIABLE
    if token := environ.get(OLD_TOKEN_VARIABLE, "").strip():
        print(
            f"relay admin: warning: {OLD_TOKEN_VARIABLE} is deprecated: "
            f"set {TOKEN_VARIABLE} (the name relay serve reads) instead",
            file=warn or sys.stderr,
        )
        return token, OLD_TOKEN_VARIABLE
    raise ConfigError(
        "--token-file", None, "command line", f"give --token-file or set {TOKEN_VARIABLE}"
    )


def check_group(client: AdminClient, group: str) -> None:
    """Refuse a group the relay does not know (no agent reported it, no approval names it).

    Raises:
        AdminError: the group is unknown; the message names the known groups and the
            closest one.
    """
    known = [str(g) for g in client.call("GET", "/v1/admin/updates").get("groups", [])]
    if group not in known:
        raise AdminError(
            f"unknown group {group!r} (known: {', '.join(known)}){did_you_mean(group, known)}; "
            "give --new-group for a group no agent has reported yet"
        )


def _approval(client: AdminClient, args: argparse.Namespace) -> str:
    if args.group is not None and not args.new_group:
        check_group(client, args.group)
    status = {"approve": "approved", "decline": "declined", "reset": "undefined"}[
        args.admin_command
    ]
    body = {
        "product": args.product,
        "version": args.version,
        "status": status,
        "group": args.group,
        "mode": getattr(args, "mode", "forced"),
    }
    client.call("POST", "/v1/admin/approvals", body)
    return (
        f"{args.product} {args.version}: {status}"
        f"{' for ' + args.group if args.group else ' for every group'}"
    )


def _accept_eula(client: AdminClient, args: argparse.Namespace) -> str:
    client.call("POST", "/v1/admin/eulas", {"path": args.path})
    return f"accepted {args.path}"


def _settings(client: AdminClient, args: argparse.Namespace) -> str:
    return _show_or_change(client, "/v1/admin/settings", args.set, args.unset)


def _group_settings(client: AdminClient, args: argparse.Namespace) -> str:
    return _show_or_change(client, f"/v1/admin/groups/{args.group}/settings", args.set)


def _show_or_change(
    client: AdminClient, path: str, sets: Sequence[str], unset: Sequence[str] = ()
) -> str:
    changes = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("--set", item, "command line", "expected KEY=JSON")
        try:
            changes[key] = json.loads(value)
        except ValueError:
            changes[key] = value
    for key in unset:
        changes[key] = None  # forget the saved value: follow the configuration again
    data = client.call("PUT", path, changes) if changes else client.call("GET", path)
    return table(sorted((k, json.dumps(v)) for k, v in data.items()), ("SETTING", "VALUE"))


_ACTIONS: dict[str, Callable[[AdminClient, argparse.Namespace], str]] = {
    "updates": lambda c, _: render_updates(c.call("GET", "/v1/admin/updates")),
    "approve": _approval,
    "decline": _approval,
    "reset": _approval,
    "accept-eula": _accept_eula,
    "settings": _settings,
    "groups": _group_settings,
    "agents": lambda c, _: render_agents({"agents": list(all_agents(c))}),
    "report": _report,
    "versions": lambda c, _: render_versions(c.call("GET", "/v1/admin/versions")),
    "audit": lambda c, _: render_audit(c.call("GET", "/v1/admin/audit")),
    "sync": lambda c, _: str(c.call("POST", "/v1/admin/sync")["result"]),
}


def run(args: argparse.Namespace) -> int:
    """Run ``relay admin <action>`` and print its table or confirmation.

    Raises:
        ConfigError: no token, or a malformed ``--set``.
        AdminError: the relay refused the request or could not be reached.
    """
    client = AdminClient(args.url, *read_token(args.token_file, os.environ))
    print(_ACTIONS[args.admin_command](client, args))
    return ExitCode.OK
