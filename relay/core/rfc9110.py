"""RFC 9110 conditional and range requests, as one pure decision per request.

The relay serves immutable, content-addressed blobs (strong ETag = ``"<sha256>"``, a
stable ``Last-Modified``) and byte-exact metadata. aiohttp's ``FileResponse`` gets
several of these cases wrong (a non-matching ETag ``If-Range`` answers 206; several
ranges, an unknown unit or spaces answer 416; ``bytes=-0`` answers the whole file;
``HEAD`` with a Range answers 206), so the relay decides itself, here, with no I/O:
the caller passes plain header values and gets a :class:`Decision` back.

Rules:

* Order of evaluation (RFC 9110 §13.2.2):

  1. ``If-Match`` (412 unless ``*`` or a strong match), else ``If-Unmodified-Since``
     (412 when modified after the date).
  2. ``If-None-Match`` (304 for GET/HEAD when ``*`` or a weak match, 412 for other
     methods), else ``If-Modified-Since`` (GET/HEAD only; 304 when not modified since).
  3. ``Range`` (GET only, §14.2), subject to ``If-Range`` (§13.1.5: a strong
     entity-tag match, or a date equal to ``Last-Modified``; otherwise 200 in full).

* Only a single ``bytes`` range is honoured (``a-b``, ``a-``, ``-n``). Anything else
  (several ranges, another unit, spaces, garbage, ``b < a``) is ignored and the whole
  representation is sent (200), which §14.2 allows; only a valid range that cannot be
  satisfied answers 416 with ``Content-Range: bytes */N``.
* A header longer than :data:`MAX_HEADER` is malformed: ``Range`` and ``If-Range`` are
  ignored, entity-tag lists match nothing and dates are ignored.
* Nothing here raises for any header value: a client's mistake never becomes a 500.
"""

from __future__ import annotations

import calendar
import math
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum

#: Header values longer than this (characters) are treated as malformed.
MAX_HEADER = 8 * 1024

# Numbers longer than this (after leading zeros) exceed any representation length; they
# are replaced by _HUGE instead of being converted (int() of thousands of digits is slow
# and, past sys.int_info.str_digits_check_threshold, raises).
_MAX_DIGITS = 24
_HUGE = 10**_MAX_DIGITS

# §14.1: range units are case-insensitive (in ASCII: Unicode folding lets "byte\u017f"
# pass); §14.1.1: int-range and suffix-range. [0-9], never \d: \d would accept non-ASCII
# digits that int() happily converts.
_RANGE = re.compile(r"bytes=(?:([0-9]+)-([0-9]*)|-([0-9]+))", re.IGNORECASE | re.ASCII)

# §8.8.3: entity-tag = [ W/ ] DQUOTE *etagc DQUOTE; etagc = %x21 / %x23-7E / obs-text.
_ENTITY_TAG = re.compile(r'(W/)?("[\x21\x23-\x7e\x80-\U0010ffff]*")')

# §5.6.7: the three HTTP-date formats a recipient must accept (names are case-sensitive).
_DAY = "(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_DAY_LONG = "(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH = "(" + "|".join(_MONTHS) + ")"
_TIME = "([0-9]{2}):([0-9]{2}):([0-9]{2})"
_IMF_FIXDATE = re.compile(rf"{_DAY}, ([0-9]{{2}}) {_MONTH} ([0-9]{{4}}) {_TIME} GMT")
_RFC850_DATE = re.compile(rf"{_DAY_LONG}, ([0-9]{{2}})-{_MONTH}-([0-9]{{2}}) {_TIME} GMT")
_ASCTIME_DATE = re.compile(rf"{_DAY} {_MONTH} ([0-9]{{2}}| [0-9]) {_TIME} ([0-9]{{4}})")
_MAX_DATE = 64  # the longest valid HTTP-date ("Wednesday, 09-Nov-94 ...") has 33 characters
_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_OWS = " \t"  # §5.6.3 optional whitespace


class Outcome(Enum):
    """What to answer; the value is the HTTP status code."""

    FULL = 200
    PARTIAL = 206
    NOT_MODIFIED = 304
    PRECONDITION_FAILED = 412
    UNSATISFIABLE = 416


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one request.

    Attributes:
        outcome: what to answer.
        status: the HTTP status code (``outcome.value``).
        start: the first byte to send (0 for a full answer and for bodiless ones).
        end: one past the last byte to send (the length for a full answer, 0 for 304,
            412 and 416, which carry no body).
        headers: the response headers that depend on the decision (``Content-Range``).
    """

    outcome: Outcome
    status: int
    start: int
    end: int
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def bodiless(self) -> bool:
        """Whether the answer carries no body (304, 412, 416)."""
        return self.outcome in _BODILESS


_BODILESS = frozenset({Outcome.NOT_MODIFIED, Outcome.UNSATISFIABLE, Outcome.PRECONDITION_FAILED})
_NOT_MODIFIED = Decision(Outcome.NOT_MODIFIED, 304, 0, 0)
_PRECONDITION_FAILED = Decision(Outcome.PRECONDITION_FAILED, 412, 0, 0)


def format_http_date(ts: float) -> str:
    """Format a POSIX time as an IMF-fixdate (RFC 9110 §5.6.7), to the second below.

    Args:
        ts: seconds since the epoch.

    Returns:
        For example ``"Sun, 06 Nov 1994 08:49:37 GMT"``.

    Raises:
        ValueError: ``ts`` is not finite or not between the years 1 and 9999.
    """
    if not math.isfinite(ts):
        raise ValueError(f"cannot format {ts!r} as an HTTP date")
    try:
        when = _EPOCH + timedelta(seconds=math.floor(ts))
    except OverflowError as e:
        raise ValueError(f"cannot format {ts!r} as an HTTP date: out of range") from e
    # Fixed English names: strftime's %a and %b follow the locale.
    return (
        f"{_DAY_NAMES[when.weekday()]}, {when.day:02d} {_MONTHS[when.month - 1]} "
        f"{when.year:04d} {when.hour:02d}:{when.minute:02d}:{when.second:02d} GMT"
    )


def parse_http_date(text: str, *, now: float | None = None) -> float | None:
    """Parse an HTTP-date in any of the three formats of RFC 9110 §5.6.7.

    Anything else (another zone than GMT, a list of dates, an impossible day or time)
    is not an HTTP-date and gives ``None``.

    Args:
        text: the field value.
        now: the current POSIX time, used only to place the two-digit year of an
            rfc850-date (§5.6.7: a year more than 50 years ahead is in the past century).
            Defaults to the clock.

    Returns:
        Seconds since the epoch, or ``None`` if ``text`` is not an HTTP-date.
    """
    text = text.strip(_OWS)
    if len(text) > _MAX_DATE:
        return None
    if match := _IMF_FIXDATE.fullmatch(text):
        day, month, year, hour, minute, second = match.groups()
        return _timestamp(int(year), month, int(day), hour, minute, second)
    if match := _ASCTIME_DATE.fullmatch(text):
        month, day, hour, minute, second, year = match.groups()
        return _timestamp(int(year), month, int(day), hour, minute, second)
    if match := _RFC850_DATE.fullmatch(text):
        day, month, yy, hour, minute, second = match.groups()
        this_year = time.gmtime(time.time() if now is None else now).tm_year
        year = this_year // 100 * 100 + int(yy)
        if year > this_year + 50:
            year -= 100
        elif year <= this_year - 50:
            year += 100
        return _timestamp(year, month, int(day), hour, minute, second)
    return None


def _timestamp(year: int, month: str, day: int, hour: str, minute: str, sec: str) -> float | None:
    mon = _MONTHS.index(month) + 1
    h, m, s = int(hour), int(minute), int(sec)
    if year < 1 or not 1 <= day <= calendar.monthrange(year, mon)[1]:
        return None
    if h > 23 or m > 59 or s > 60:  # a second of 60 is a leap second
        return None
    return float(calendar.timegm((year, mon, day, h, m, s, 0, 0, 0)))


def _entity_tag(item: str) -> tuple[bool, str] | None:
    """``(weak, opaque-tag)`` of one entity-tag, or ``None`` when it is not one (§8.8.3)."""
    match = _ENTITY_TAG.fullmatch(item.strip(_OWS))
    if match is None:
        return None
    return match.group(1) is not None, match.group(2)


def _list_items(value: str) -> list[str]:
    """Split a field value on the commas outside quoted strings (§5.6.1, §5.6.4)."""
    items = []
    start = 0
    quoted = False
    for i, char in enumerate(value):
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append(value[start:i])
            start = i + 1
    items.append(value[start:])
    return items


def _any_match(value: str, etag: str, *, strong: bool) -> bool:
    """Whether an entity-tag list (or ``*``) matches ``etag``.

    Strong comparison (§8.8.3.2) needs both tags strong and equal; weak comparison
    only equal opaque tags. Items that are not entity-tags match nothing, and so does
    a value longer than :data:`MAX_HEADER`.
    """
    if len(value) > MAX_HEADER:
        return False
    if value.strip(_OWS) == "*":
        return True  # the relay only decides for representations that exist
    ours = _entity_tag(etag)
    if ours is None:
        return False
    our_weak, our_tag = ours
    for item in _list_items(value):
        theirs = _entity_tag(item)
        if theirs is None:
            continue
        weak, tag = theirs
        if tag == our_tag and not (strong and (weak or our_weak)):
            return True
    return False


def _date_header(value: str | None) -> int | None:
    """Whole seconds of a date-valued header, or ``None`` when absent or invalid."""
    if value is None or len(value) > MAX_HEADER:
        return None
    when = parse_http_date(value)
    return None if when is None else math.floor(when)


def _number(digits: str) -> int:
    digits = digits.lstrip("0")
    return _HUGE if len(digits) > _MAX_DIGITS else int(digits or "0")


def _byte_range(value: str, length: int) -> tuple[int, int] | Outcome | None:
    """Select the bytes a Range header asks for (§14.1.1, §14.1.2, §14.2).

    Returns:
        ``(start, end)`` for a satisfiable range, :attr:`Outcome.UNSATISFIABLE` for a
        valid range that cannot be satisfied, and ``None`` when the header must be
        ignored.
    """
    if len(value) > MAX_HEADER:
        return None
    match = _RANGE.fullmatch(value.strip(_OWS))
    if match is None:
        return None  # another unit, several ranges, spaces, garbage: ignore (§14.2)
    first, last, suffix = match.groups()
    if suffix is not None:
        n = _number(suffix)
        if n == 0:
            return Outcome.UNSATISFIABLE  # §14.1.1: a suffix-range needs a non-zero suffix-length
        if length == 0:
            # §14.1.1 calls this satisfiable, but no Content-Range can describe zero
            # bytes: send the (empty) representation in full, as §14.2 allows.
            return None
        return max(0, length - n), length  # §14.1.2: shorter than n → all of it
    start = _number(first)
    if last:
        stop = _number(last)
        if stop < start:
            return None  # §14.1.1: an invalid range-spec; the header is ignored
        end = min(stop + 1, length)  # §14.1.2: last-pos past the end is clamped
    else:
        end = length
    if start >= length:
        return Outcome.UNSATISFIABLE  # §14.1.1: first-pos must be below the current length
    return start, end


def _if_range_holds(value: str, etag: str, last_modified: int) -> bool:
    """Whether the If-Range condition is true (§13.1.5)."""
    if len(value) > MAX_HEADER:
        return False
    value = value.strip(_OWS)
    if value.startswith(('"', "W/")):
        # The entity-tag form needs a strong match: a weak tag never matches.
        theirs = _entity_tag(value)
        ours = _entity_tag(etag)
        return theirs is not None and ours is not None and not theirs[0] and theirs == ours
    # The date form must equal the Last-Modified a 200 would carry. §13.1.5 also wants
    # that date to be a strong validator; it is here: a content-addressed blob never
    # changes under its URL, and metadata is byte-exact under a fixed time.
    when = parse_http_date(value)
    return when is not None and math.floor(when) == last_modified


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
    """Decide the answer to a request for a representation that exists.

    Header arguments are the raw field values, or ``None`` when the request does not
    carry the field. No value of them raises.

    Args:
        method: the request method (``GET`` or ``HEAD``; other methods get no 304 and
            no range).
        length: the representation's length in bytes (the full, signed length, even
            while the blob is still being filled).
        etag: its entity-tag, quoted (``"<sha256>"``).
        last_modified: its modification time (POSIX seconds; compared to the second,
            like the ``Last-Modified`` header made by :func:`format_http_date`).
        range_header: ``Range``.
        if_range: ``If-Range``.
        if_none_match: ``If-None-Match``.
        if_modified_since: ``If-Modified-Since``.
        if_match: ``If-Match``.
        if_unmodified_since: ``If-Unmodified-Since``.

    Returns:
        The :class:`Decision`: status, byte range ``[start, end)`` and headers.

    Raises:
        ValueError: ``length`` is negative or ``last_modified`` is not finite (the
            caller's values, never a header's).
    """
    if length < 0 or not math.isfinite(last_modified):
        raise ValueError(f"length {length} and last_modified {last_modified} must be valid")
    modified = math.floor(last_modified)
    safe = method in {"GET", "HEAD"}

    # §13.2.2 step 1-2: If-Match, or else If-Unmodified-Since (§13.1.1, §13.1.4).
    if if_match is not None:
        if not _any_match(if_match, etag, strong=True):
            return _PRECONDITION_FAILED
    else:
        since = _date_header(if_unmodified_since)
        if since is not None and modified > since:
            return _PRECONDITION_FAILED

    # §13.2.2 step 3-4: If-None-Match, or else If-Modified-Since (§13.1.2, §13.1.3).
    if if_none_match is not None:
        if _any_match(if_none_match, etag, strong=False):
            return _NOT_MODIFIED if safe else _PRECONDITION_FAILED
    elif safe:
        since = _date_header(if_modified_since)
        if since is not None and modified <= since:
            return _NOT_MODIFIED

    # §13.2.2 step 5, §14.2: Range is defined for GET only.
    full = Decision(Outcome.FULL, 200, 0, length)
    if method != "GET" or range_header is None:
        return full
    selected = _byte_range(range_header, length)
    if selected is None:
        return full
    # §13.1.5: when If-Range is false (or malformed), ignore Range and send it all.
    if if_range is not None and not _if_range_holds(if_range, etag, modified):
        return full
    if isinstance(selected, Outcome):  # only ever Outcome.UNSATISFIABLE
        return Decision(Outcome.UNSATISFIABLE, 416, 0, 0, (("Content-Range", f"bytes */{length}"),))
    start, end = selected
    return Decision(
        Outcome.PARTIAL, 206, start, end, (("Content-Range", f"bytes {start}-{end - 1}/{length}"),)
    )
