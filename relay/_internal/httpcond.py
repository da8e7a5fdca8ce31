"""RFC 9110 conditional and range requests, as one pure decision per request.

The relay serves immutable, content-addressed blobs (strong ETag = the sha256) and
byte-exact metadata. aiohttp's ``FileResponse`` gets several of these cases wrong
(a non-matching ETag ``If-Range`` answers 206; multiple ranges or an unknown unit
answer 416; ``bytes=-0`` answers the whole file; ``HEAD`` with a Range answers 206),
so the relay decides itself, here, with no I/O.

Order of evaluation (RFC 9110 §13.2.2):

1. ``If-Match`` (412 when no current tag matches), else ``If-Unmodified-Since``.
2. ``If-None-Match`` (304 for GET/HEAD when any tag weakly matches), else
   ``If-Modified-Since`` (304 when not modified since; only without
   ``If-None-Match``).
3. ``Range`` (GET only, §14.2), subject to ``If-Range`` (§13.1.5).

A malformed or unsupported ``Range`` is ignored (200), as §14.2 allows; only a
syntactically valid single range that cannot be satisfied gives 416. Nothing here
raises for any header value: a client's mistake never becomes a 500.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass
from enum import Enum

MAX_HEADER = 8 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_ETAG = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')


class Outcome(Enum):
    """What to answer."""

    FULL = 200
    PARTIAL = 206
    NOT_MODIFIED = 304
    PRECONDITION_FAILED = 412
    UNSATISFIABLE = 416


@dataclass(frozen=True, slots=True)
class Decision:
    """The status, the byte range ``[start, end)`` and the headers that depend on it."""

    outcome: Outcome
    status: int
    start: int
    end: int
    headers: tuple[tuple[str, str], ...] = ()


def format_http_date(ts: float) -> str:
    """IMF-fixdate (RFC 9110 §5.6.7) of a POSIX time."""
    return email.utils.formatdate(int(ts), usegmt=True)


def parse_http_date(text: str) -> float | None:
    """POSIX time of an HTTP date, or ``None`` if it is not one."""
    if not text or len(text) > 64:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None or parsed.tzinfo is None:
        return None
    return parsed.timestamp()


def _tags(header: str) -> list[tuple[bool, str]] | None:
    """Parse an entity-tag list into ``(weak, tag)``; ``None`` when malformed."""
    if len(header) > MAX_HEADER:
        return None
    out = []
    pos = 0
    text = header.strip()
    while pos < len(text):
        match = _ETAG.match(text, pos)
        if match is None:
            return None
        out.append((match.group(1) is not None, match.group(2)))
        pos = match.end()
    return out


def _matches(header: str, etag: str, *, weak_ok: bool) -> bool:
    if header.strip() == "*":
        return True
    tags = _tags(header)
    if not tags:
        return False
    return any(tag == etag and (weak_ok or not weak) for weak, tag in tags)


def _parse_range(header: str, length: int) -> tuple[int, int] | str | None:
    """Parse a Range header.

    Returns:
        ``(start, end)`` of a satisfiable single range, ``"unsatisfiable"``, or
        ``None`` when the header must be ignored.
    """
    if len(header) > MAX_HEADER:
        return None
    match = _RANGE.match(header)
    if match is None:
        return None  # other units, several ranges, spaces, garbage: ignore (§14.2)
    first, last = match.groups()
    if not first and not last:
        return None
    if len(first) > 19 or len(last) > 19:
        return None  # absurd numbers: treat as garbage
    if not first:
        suffix = int(last)
        if suffix == 0 or length == 0:
            return "unsatisfiable"
        return max(0, length - suffix), length
    start = int(first)
    if last and int(last) < start:
        return None  # invalid range-spec: ignore the header
    if start >= length:
        return "unsatisfiable"
    end = length if not last else min(int(last) + 1, length)
    return start, end


def decide(
    *,
    method: str,
    length: int,
    etag: str,
    last_modified: float,
    range_header: str | None,
    if_range: str | None,
    if_none_match: str | None,
    if_modified_since: str | None,
    if_match: str | None = None,
    if_unmodified_since: str | None = None,
) -> Decision:
    """Decide the answer to a GET or HEAD of a representation.

    Args:
        method: ``GET`` or ``HEAD``.
        length: the representation's length in bytes.
        etag: its strong entity-tag, quoted (``"<sha256>"``).
        last_modified: its modification time (POSIX seconds).
        range_header: the request's ``Range``, or ``None`` (and so on for the rest).
        if_range: ``If-Range``.
        if_none_match: ``If-None-Match``.
        if_modified_since: ``If-Modified-Since``.
        if_match: ``If-Match``.
        if_unmodified_since: ``If-Unmodified-Since``.

    Returns:
        The :class:`Decision`.
    """
    full = Decision(Outcome.FULL, 200, 0, length)
    lm = int(last_modified)
    # 1. If-Match / If-Unmodified-Since (§13.1.1, §13.1.4)
    if if_match is not None:
        if not _matches(if_match, etag, weak_ok=False):
            return Decision(Outcome.PRECONDITION_FAILED, 412, 0, 0)
    elif if_unmodified_since is not None:
        since = parse_http_date(if_unmodified_since)
        if since is not None and lm > since:
            return Decision(Outcome.PRECONDITION_FAILED, 412, 0, 0)
    # 2. If-None-Match / If-Modified-Since (§13.1.2, §13.1.3)
    if method in ("GET", "HEAD"):
        if if_none_match is not None:
            if _matches(if_none_match, etag, weak_ok=True):
                return Decision(Outcome.NOT_MODIFIED, 304, 0, 0)
        elif if_modified_since is not None:
            since = parse_http_date(if_modified_since)
            if since is not None and lm <= since:
                return Decision(Outcome.NOT_MODIFIED, 304, 0, 0)
    # 3. Range (§14.2): GET only.
    if method != "GET" or range_header is None:
        return full
    parsed = _parse_range(range_header.strip(), length)
    if parsed is None:
        return full
    # If-Range (§13.1.5): a strong ETag match, or exactly the Last-Modified date.
    if if_range is not None:
        value = if_range.strip()
        if value.startswith(('"', "W/")):
            if value != etag:
                return full
        else:
            when = parse_http_date(value)
            if when is None or int(when) != lm:
                return full
    if parsed == "unsatisfiable":
        return Decision(Outcome.UNSATISFIABLE, 416, 0, 0, (("Content-Range", f"bytes */{length}"),))
    assert isinstance(parsed, tuple)
    start, end = parsed
    return Decision(
        Outcome.PARTIAL,
        206,
        start,
        end,
        (("Content-Range", f"bytes {start}-{end - 1}/{length}"),),
    )
