"""The wire contract between agents, relays and child relays: names and rules, once.

Rules:

* Every header name, identifier rule, format name, event name and time format
  that crosses the wire is defined here and nowhere else; the server, the agent,
  the delta service and the CLI import it.
* Values in, values out: no I/O.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from relay.core.model import is_sha256
from relay.errors import BodyError

AGENT_ID_HEADER = "Relay-Agent-Id"
"""The header an agent sends on every request (its own id, as in its check-in)."""

AGENT_TOKEN_HEADER = "Relay-Agent-Token"  # noqa: S105 - a header name
"""The header beside :data:`AGENT_ID_HEADER` carrying the token of the last check-in
(:mod:`relay.core.tokens`); without a valid one a request counts as its client address."""

DEFAULT_GROUP = "default"
"""The group of an agent that names none."""

_AGENT_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
AGENT_ID_RULE = "1-128 characters of letters, digits and ._:@-"
_GROUP = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
GROUP_RULE = "1-64 characters of letters, digits and ._-"


def is_agent_id(value: str) -> bool:
    """Whether ``value`` is a well-formed agent id (:data:`AGENT_ID_RULE`)."""
    return _AGENT_ID.match(value) is not None


def is_group(value: str) -> bool:
    """Whether ``value`` is a well-formed group name (:data:`GROUP_RULE`)."""
    return _GROUP.match(value) is not None


class DeltaFormat(StrEnum):
    """Patch formats, as named in ``accept_delta`` and ``Relay-Delta-Format``."""

    BSDIFF4 = "bsdiff4"
    ZSTD = "zstd"


MEDIA_TYPES: dict[DeltaFormat, str] = {
    DeltaFormat.BSDIFF4: "application/vnd.relay.bsdiff4",
    DeltaFormat.ZSTD: "application/vnd.relay.zstd-patch",
}
_FORMAT_BY_MEDIA = {v: k for k, v in MEDIA_TYPES.items()}


def delta_formats(names: object) -> tuple[DeltaFormat, ...]:
    """The known formats among ``names``, in order, once each.

    Unknown names are ignored: a newer agent may know formats this relay does not.
    """
    if not isinstance(names, list | tuple):
        return ()
    out: list[DeltaFormat] = []
    for name in names:
        if name in DeltaFormat.__members__.values() and DeltaFormat(name) not in out:
            out.append(DeltaFormat(name))
    return tuple(out)


def formats_from_accept(header: str | None) -> list[DeltaFormat] | None:
    """Delta formats named by an ``Accept`` header, in its order (``None``: no preference)."""
    if not header:
        return None
    out = []
    for part in header.split(","):
        media = part.split(";", 1)[0].strip().lower()
        if media in ("*/*", "application/*"):
            return None
        fmt = _FORMAT_BY_MEDIA.get(media)
        if fmt is not None and fmt not in out:
            out.append(fmt)
    return out


DELTA_HEADERS = ("Relay-Delta-Format", "Relay-Target-Sha256", "Relay-Target-Length")
"""Headers of a ``/deltas/{from}/{to}`` answer: format, and the full target it rebuilds."""


class Event(StrEnum):
    """What an agent reports (``POST /v1/reports``)."""

    CHECKED = "checked"
    DOWNLOADED = "downloaded"
    INSTALLED = "installed"
    UNINSTALLED = "uninstalled"
    FAILED = "failed"


REPORT_REASONS = frozenset(
    {
        "",
        "metadata_rejected",
        "metadata_unavailable",
        "origin_unreachable",
        "offer_mismatch",
        "delta_rejected",
        "download_failed",
        "install_failed",
        "install_timeout",
        "action_failed",
        "action_timeout",
        "uninstall_failed",
        "uninstall_timeout",
    }
)
"""Reasons the reference agent reports; metrics count any other text as ``other``."""


def reason_label(reason: str) -> str:
    """``reason`` when it is one of :data:`REPORT_REASONS`, else ``"other"``.

    Metric labels must stay a bounded set whatever agents send; the full text stays
    in the agent's history.
    """
    return reason if reason in REPORT_REASONS else "other"


class Via(StrEnum):
    """How a version was downloaded."""

    DELTA = "delta"
    FULL = "full"


def rfc3339(ts: float | dt.datetime | None) -> str | None:
    """Format a time as RFC 3339 UTC to the second (``None`` stays ``None``)."""
    if ts is None:
        return None
    when = ts if isinstance(ts, dt.datetime) else dt.datetime.fromtimestamp(ts, dt.UTC)
    return when.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def utc_now() -> dt.datetime:
    """The current time, UTC."""
    return dt.datetime.fromtimestamp(time.time(), dt.UTC)


def now_rfc3339() -> str:
    """The current time as RFC 3339 UTC, to the second."""
    return rfc3339(time.time()) or ""


@dataclass(frozen=True, slots=True)
class InstalledItem:
    """A product as an agent has it (an entry of ``installed`` in a check-in)."""

    product: str
    version: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        """The JSON form."""
        return {"product": self.product, "version": self.version, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class ReportEvent:
    """One outcome event of ``POST /v1/reports``, as the agent sends it and the relay reads it."""

    product: str
    from_version: str
    to_version: str
    event: Event
    via: Via = Via.FULL
    bytes: int = 0
    reason: str = ""
    message: str = ""
    at: str = field(default_factory=now_rfc3339)

    def to_dict(self) -> dict[str, object]:
        """The JSON form."""
        return {
            "product": self.product,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "event": str(self.event),
            "via": str(self.via),
            "bytes": self.bytes,
            "reason": self.reason,
            "message": self.message,
            "at": self.at,
        }


# -- request bodies (check-in and reports) ------------------------------------

MAX_INSTALLED = 1000
MAX_EVENTS = 1000


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


def _objects(
    data: dict[str, Any], key: str, limit: int, *, default: list[Any] | None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The objects of the list ``data[key]`` with their place (``key[i].``) for messages."""
    items = data.get(key, default)
    if not isinstance(items, list):
        raise BodyError(f"{key}: expected a list")
    if len(items) > limit:
        raise BodyError(f"{key}: more than {limit} entries")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BodyError(f"{key}[{i}]: expected an object")
        yield f"{key}[{i}].", item


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
    except RecursionError:
        raise BodyError("body: nested too deeply") from None
    if not isinstance(data, dict):
        raise BodyError("body: expected a JSON object")
    return data


def deferral_choices(deferral_days: Iterable[int]) -> tuple[int, ...]:
    """Return the ``defer_days`` an agent may send: 0 (none) or one of ``deferral_days``.

    Args:
        deferral_days: the deferrals the relay's policy allows (``policy.deferral_days``).

    Returns:
        ``0``, then the allowed deferrals in ascending order.
    """
    return (0, *sorted(set(deferral_days)))


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
    installed = []
    for where, item in _objects(data, "installed", MAX_INSTALLED, default=[]):
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
    allowed = deferral_choices(deferral_days)
    if isinstance(defer, bool) or not isinstance(defer, int) or defer not in allowed:
        raise BodyError(f"defer_days: expected one of {', '.join(map(str, allowed))}")
    return CheckinRequest(agent_id, group, tuple(installed), accept, defer)


def parse_reports(data: dict[str, Any]) -> tuple[str, list[ReportEvent]]:
    """Validate a reports body.

    Raises:
        BodyError: a field is missing or malformed (the message names it).
    """
    agent_id = _agent_id(data)
    events = []
    for where, item in _objects(data, "events", MAX_EVENTS, default=None):
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
