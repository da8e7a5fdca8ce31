"""The wire contract between agents, relays and child relays: names and rules, once.

Rules:

* Every header name, identifier rule, format name, event name and time format
  that crosses the wire is defined here and nowhere else; the server, the agent,
  the delta service and the CLI import it.
* Values in, values out: no I/O.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass, field
from enum import StrEnum

AGENT_ID_HEADER = "Relay-Agent-Id"
"""The header an agent sends on every request (its own id, as in its check-in)."""

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
    FAILED = "failed"


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
