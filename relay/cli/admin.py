"""``relay admin``: the admin API from the command line, with readable tables.

The token is read from ``--token-file`` or the ``RELAY_ADMIN_TOKEN`` variable, never
from the command line (it would show in process listings).
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from relay.errors import RelayError


class AdminError(RelayError):
    """The admin API refused a request or could not be reached."""


def request(url: str, token: str, method: str, path: str, body: object = None) -> Any:  # noqa: ANN401 - JSON
    """Call the admin API and return the decoded JSON.

    Raises:
        AdminError: an HTTP error (with the server's message) or no connection.
    """
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(  # noqa: S310 - the URL is the operator's relay
        url.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
            raw = resp.read()
            ctype = resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace").strip()
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(detail).get("error", detail)
        raise AdminError(f"{method} {path}: HTTP {e.code}: {detail}") from None
    except OSError as e:
        raise AdminError(f"{url}: cannot connect: {e}") from None
    return json.loads(raw) if "json" in ctype else raw.decode(errors="replace")


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
        rows.append((a["agent_id"], a["group"], a["address"], versions, outcome, a["failures"]))
    return table(rows, ("AGENT", "GROUP", "ADDRESS", "INSTALLED", "LAST OUTCOME", "FAILURES"))


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
