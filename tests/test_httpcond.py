"""RFC 9110 range and conditional decisions (relay.core.rfc9110), table-driven.

Each row is one rule; the rows marked "aiohttp" are cases aiohttp's FileResponse gets
wrong (NOTES.md, "HTTP details real clients depend on"). The last tests feed random and
garbage header values: no value may raise, and every answer must be self-consistent.
"""

from __future__ import annotations

import random
import re
import string
from typing import Any

import pytest

from relay.core.rfc9110 import (
    MAX_HEADER,
    Decision,
    Outcome,
    decide,
    format_http_date,
    parse_http_date,
)

N = 10_000
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
ETAG = f'"{SHA}"'
OTHER = '"0000000000000000000000000000000000000000000000000000000000000000"'
# A fractional mtime: Last-Modified (and every comparison) is to the second below.
MTIME = 1_700_000_000.75
LM = format_http_date(MTIME)  # "Tue, 14 Nov 2023 22:13:20 GMT"
LM_RFC850 = "Tuesday, 14-Nov-23 22:13:20 GMT"
LM_ASCTIME = "Tue Nov 14 22:13:20 2023"
EARLIER = format_http_date(MTIME - 1)
LATER = format_http_date(MTIME + 1)


def run(**overrides: Any) -> Decision:
    args: dict[str, Any] = {
        "method": "GET",
        "length": N,
        "etag": ETAG,
        "last_modified": MTIME,
        "range_header": None,
        "if_range": None,
        "if_none_match": None,
        "if_modified_since": None,
    }
    args.update(overrides)
    return decide(**args)


def summary(d: Decision) -> tuple[int, int, int, str | None]:
    headers = dict(d.headers)
    return d.status, d.start, d.end, headers.get("Content-Range")


FULL = (200, 0, N, None)
NOT_MODIFIED = (304, 0, 0, None)
FAILED = (412, 0, 0, None)
UNSATISFIABLE = (416, 0, 0, f"bytes */{N}")


def partial(start: int, last: int) -> tuple[int, int, int, str]:
    return 206, start, last + 1, f"bytes {start}-{last}/{N}"


RANGES = [
    # (id, Range header, expected)
    ("first-ten", "bytes=0-9", partial(0, 9)),
    ("open-ended", "bytes=9990-", partial(9990, 9999)),
    ("from-zero", "bytes=0-", partial(0, N - 1)),
    ("last-byte", "bytes=9999-9999", partial(9999, 9999)),
    ("one-byte", "bytes=5-5", partial(5, 5)),
    ("suffix", "bytes=-10", partial(N - 10, N - 1)),
    ("suffix-whole", f"bytes=-{N}", partial(0, N - 1)),
    ("suffix-longer-than-file", "bytes=-20000", partial(0, N - 1)),
    ("end-clamped", "bytes=100-99999", partial(100, N - 1)),
    ("leading-zeros", "bytes=0005-0009", partial(5, 9)),
    ("unit-case-insensitive", "BYTES=0-9", partial(0, 9)),
    ("surrounding-ows", " \tbytes=0-9\t ", partial(0, 9)),
    ("huge-last", "bytes=0-" + "9" * 40, partial(0, N - 1)),
    ("huge-suffix", "bytes=-" + "9" * 40, partial(0, N - 1)),
    ("start-at-length", f"bytes={N}-", UNSATISFIABLE),
    ("start-past-length", "bytes=20000-30000", UNSATISFIABLE),
    ("huge-start", "bytes=" + "9" * 40 + "-", UNSATISFIABLE),
    ("aiohttp: suffix zero", "bytes=-0", UNSATISFIABLE),
    ("suffix-zeros", "bytes=-000", UNSATISFIABLE),
    ("aiohttp: multiple ranges", "bytes=0-9,20-29", FULL),
    ("multiple-ranges-ows", "bytes=0-9, 20-29", FULL),
    ("trailing-comma", "bytes=0-9,", FULL),
    ("aiohttp: unknown unit", "items=0-9", FULL),
    ("aiohttp: space after =", "bytes= 0-9", FULL),
    ("space-before-dash", "bytes=0 -9", FULL),
    ("space-before-=", "bytes =0-9", FULL),
    ("last-before-first", "bytes=9-0", FULL),
    ("no-numbers", "bytes=-", FULL),
    ("no-spec", "bytes=", FULL),
    ("letters", "bytes=a-b", FULL),
    ("negative", "bytes=-5-9", FULL),
    ("no-unit", "0-9", FULL),
    ("empty", "", FULL),
    ("non-ascii-digits", "bytes=\u0663-\u0669", FULL),
    ("non-ascii-unit", "byte\u017f=0-9", FULL),  # folds to "s" under Unicode rules
    ("newline", "bytes=0-9\n", FULL),
    ("plus-sign", "bytes=+1-9", FULL),
    ("over-8KiB", "bytes=" + "0" * MAX_HEADER + "-9", FULL),
]


@pytest.mark.parametrize(
    ("header", "expected"), [r[1:] for r in RANGES], ids=[r[0] for r in RANGES]
)
def test_range(header: str, expected: tuple[int, int, int, str | None]) -> None:
    d = run(range_header=header)
    assert summary(d) == expected
    assert d.outcome.value == d.status


IF_RANGE = [
    # (id, Range, If-Range, expected)
    ("etag-match", "bytes=100-", ETAG, partial(100, N - 1)),
    ("aiohttp: etag mismatch", "bytes=100-", OTHER, FULL),
    ("weak-etag-never-matches", "bytes=100-", f"W/{ETAG}", FULL),
    ("etag-with-ows", "bytes=100-", f"  {ETAG} ", partial(100, N - 1)),
    ("etag-list-is-not-one-tag", "bytes=100-", f"{ETAG}, {OTHER}", FULL),
    ("unterminated-etag", "bytes=100-", f'"{SHA}', FULL),
    ("unquoted-etag", "bytes=100-", SHA, FULL),
    ("date-equal", "bytes=100-", LM, partial(100, N - 1)),
    ("date-rfc850-equal", "bytes=100-", LM_RFC850, partial(100, N - 1)),
    ("date-asctime-equal", "bytes=100-", LM_ASCTIME, partial(100, N - 1)),
    ("date-earlier", "bytes=100-", EARLIER, FULL),
    ("date-later", "bytes=100-", LATER, FULL),  # only an exact match holds
    ("date-other-zone", "bytes=100-", LM.replace("GMT", "+0000"), FULL),
    ("garbage", "bytes=100-", "yesterday", FULL),
    ("empty", "bytes=100-", "", FULL),
    ("over-8KiB", "bytes=100-", ETAG + " " * MAX_HEADER, FULL),
    ("holds-but-unsatisfiable", f"bytes={N}-", LM, UNSATISFIABLE),
    ("fails-and-unsatisfiable", f"bytes={N}-", OTHER, FULL),
    ("fails-and-suffix-zero", "bytes=-0", EARLIER, FULL),
    ("holds-but-range-ignored", "bytes=0-9,20-29", ETAG, FULL),
    ("without-range", None, OTHER, FULL),
]


@pytest.mark.parametrize(
    ("range_header", "if_range", "expected"),
    [r[1:] for r in IF_RANGE],
    ids=[r[0] for r in IF_RANGE],
)
def test_if_range(range_header: str | None, if_range: str, expected: tuple[Any, ...]) -> None:
    assert summary(run(range_header=range_header, if_range=if_range)) == expected


def test_head_ignores_range() -> None:
    """aiohttp answers 206 to HEAD with a Range; Range applies to GET only (§14.2)."""
    for header in ("bytes=0-9", "bytes=-0", f"bytes={N}-"):
        d = run(method="HEAD", range_header=header, if_range=ETAG)
        assert summary(d) == FULL, header
        assert d.outcome is Outcome.FULL


def test_other_methods_ignore_range() -> None:
    assert summary(run(method="POST", range_header="bytes=0-9")) == FULL


@pytest.mark.parametrize(
    ("length", "header", "expected"),
    [
        (0, "bytes=0-", (416, 0, 0, "bytes */0")),
        (0, "bytes=0-0", (416, 0, 0, "bytes */0")),
        (0, "bytes=5-9", (416, 0, 0, "bytes */0")),
        (0, "bytes=-0", (416, 0, 0, "bytes */0")),
        # §14.1.1 calls a non-zero suffix satisfiable even here, but no Content-Range
        # can describe zero bytes: the (empty) whole is sent, as ignoring Range allows.
        (0, "bytes=-5", (200, 0, 0, None)),
        (1, "bytes=0-0", (206, 0, 1, "bytes 0-0/1")),
        (1, "bytes=-5", (206, 0, 1, "bytes 0-0/1")),
        (1, "bytes=1-", (416, 0, 0, "bytes */1")),
    ],
)
def test_tiny_representations(length: int, header: str, expected: tuple[Any, ...]) -> None:
    assert summary(run(length=length, range_header=header)) == expected


# -- what real clients do ---------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 1, 4096, N - 1])
def test_apt_resumes_with_date_if_range(offset: int) -> None:
    d = run(range_header=f"bytes={offset}-", if_range=LM)
    assert summary(d) == partial(offset, N - 1)


def test_apt_resume_of_a_complete_file_reads_the_length_from_416() -> None:
    d = run(range_header=f"bytes={N}-", if_range=LM)
    assert d.outcome is Outcome.UNSATISFIABLE
    (content_range,) = [v for k, v in d.headers if k == "Content-Range"]
    match = re.fullmatch(r"bytes \*/(\d+)", content_range)
    assert match is not None and int(match.group(1)) == N


def test_apt_resume_after_the_blob_changed_gets_everything() -> None:
    assert summary(run(range_header="bytes=4096-", if_range=EARLIER)) == FULL


@pytest.mark.parametrize("offset", [1, 4096, 8191, N - 1])
def test_pip_resumes_with_etag_if_range_where_it_asked(offset: int) -> None:
    d = run(range_header=f"bytes={offset}-", if_range=ETAG)
    assert d.status == 206 and d.start == offset and d.end == N
    assert dict(d.headers)["Content-Range"].startswith(f"bytes {offset}-")


def test_aria2c_gets_its_range_echoed_exactly() -> None:
    d = run(range_header="bytes=1048-2095")
    assert dict(d.headers)["Content-Range"] == f"bytes 1048-2095/{N}"


def test_curl_continue_on_a_complete_file_is_416_without_body() -> None:
    d = run(range_header=f"bytes={N}-")
    assert (d.status, d.end - d.start) == (416, 0)
    assert d.headers == (("Content-Range", f"bytes */{N}"),)


# -- validators -------------------------------------------------------------------

CONDITIONS = [
    # (id, {headers}, expected)
    ("inm-match", {"if_none_match": ETAG}, NOT_MODIFIED),
    ("inm-weak-form-matches", {"if_none_match": f"W/{ETAG}"}, NOT_MODIFIED),
    ("inm-star", {"if_none_match": "*"}, NOT_MODIFIED),
    ("inm-list", {"if_none_match": f"{OTHER}, {ETAG}"}, NOT_MODIFIED),
    ("inm-list-no-ows", {"if_none_match": f"{OTHER},{ETAG}"}, NOT_MODIFIED),
    ("inm-list-empty-items", {"if_none_match": f" , ,{ETAG}, "}, NOT_MODIFIED),
    ("inm-garbage-item-then-match", {"if_none_match": f"garbage, {ETAG}"}, NOT_MODIFIED),
    ("inm-comma-inside-tag", {"if_none_match": f'"{SHA},x", {ETAG}'}, NOT_MODIFIED),
    ("inm-comma-tag-not-split", {"if_none_match": f'"x,{SHA}"'}, FULL),
    ("inm-mismatch", {"if_none_match": OTHER}, FULL),
    ("inm-unquoted", {"if_none_match": SHA}, FULL),
    ("inm-star-in-list", {"if_none_match": f"*, {OTHER}"}, FULL),
    ("inm-lowercase-weak", {"if_none_match": f"w/{ETAG}"}, FULL),
    ("inm-empty", {"if_none_match": ""}, FULL),
    ("inm-over-8KiB", {"if_none_match": f"{ETAG}," + " " * MAX_HEADER}, FULL),
    ("inm-match-beats-range", {"if_none_match": ETAG, "range_header": "bytes=0-9"}, NOT_MODIFIED),
    ("ims-equal", {"if_modified_since": LM}, NOT_MODIFIED),
    ("ims-later", {"if_modified_since": LATER}, NOT_MODIFIED),
    ("ims-asctime", {"if_modified_since": LM_ASCTIME}, NOT_MODIFIED),
    ("ims-earlier", {"if_modified_since": EARLIER}, FULL),
    ("ims-invalid", {"if_modified_since": "not a date"}, FULL),
    ("ims-list", {"if_modified_since": f"{LM}, {LM}"}, FULL),
    ("ims-with-range", {"if_modified_since": LM, "range_header": "bytes=0-9"}, NOT_MODIFIED),
    (
        "ims-modified-range",
        {"if_modified_since": EARLIER, "range_header": "bytes=0-9"},
        partial(0, 9),
    ),
    ("ims-ignored-when-inm-mismatch", {"if_none_match": OTHER, "if_modified_since": LATER}, FULL),
    ("ims-ignored-when-inm-garbage", {"if_none_match": "garbage", "if_modified_since": LM}, FULL),
    ("im-match", {"if_match": ETAG}, FULL),
    ("im-star", {"if_match": "*"}, FULL),
    ("im-list", {"if_match": f"{OTHER}, {ETAG}"}, FULL),
    ("im-match-with-range", {"if_match": ETAG, "range_header": "bytes=0-9"}, partial(0, 9)),
    ("im-mismatch", {"if_match": OTHER}, FAILED),
    ("im-weak-is-not-strong", {"if_match": f"W/{ETAG}"}, FAILED),
    ("im-garbage", {"if_match": "garbage"}, FAILED),
    ("im-empty", {"if_match": ""}, FAILED),
    ("im-over-8KiB", {"if_match": ETAG + " " * MAX_HEADER}, FAILED),
    ("im-fails-before-inm", {"if_match": OTHER, "if_none_match": ETAG}, FAILED),
    ("im-holds-then-inm", {"if_match": ETAG, "if_none_match": ETAG}, NOT_MODIFIED),
    ("im-holds-ius-ignored", {"if_match": ETAG, "if_unmodified_since": EARLIER}, FULL),
    ("ius-earlier", {"if_unmodified_since": EARLIER}, FAILED),
    ("ius-equal", {"if_unmodified_since": LM}, FULL),
    ("ius-later", {"if_unmodified_since": LATER}, FULL),
    ("ius-invalid", {"if_unmodified_since": "garbage"}, FULL),
    ("ius-fails-before-inm", {"if_unmodified_since": EARLIER, "if_none_match": ETAG}, FAILED),
    (
        "ius-fails-before-range",
        {"if_unmodified_since": EARLIER, "range_header": "bytes=0-9"},
        FAILED,
    ),
    ("head-inm", {"method": "HEAD", "if_none_match": ETAG}, NOT_MODIFIED),
    ("head-ims", {"method": "HEAD", "if_modified_since": LM}, NOT_MODIFIED),
    ("put-inm-match", {"method": "PUT", "if_none_match": ETAG}, FAILED),
    ("put-ims-ignored", {"method": "PUT", "if_modified_since": LATER}, FULL),
]


@pytest.mark.parametrize(
    ("headers", "expected"), [r[1:] for r in CONDITIONS], ids=[r[0] for r in CONDITIONS]
)
def test_conditions(headers: dict[str, str], expected: tuple[Any, ...]) -> None:
    d = run(**headers)
    assert summary(d) == expected
    assert d.outcome.value == d.status


def test_weak_representation_etag() -> None:
    """A weak current tag matches If-None-Match but never If-Match or If-Range."""
    weak = f"W/{ETAG}"
    assert run(etag=weak, if_none_match=ETAG).status == 304
    assert run(etag=weak, if_match=ETAG).status == 412
    assert run(etag=weak, range_header="bytes=0-9", if_range=weak).status == 200


def test_unquoted_representation_etag_matches_no_tag() -> None:
    """A malformed current tag is never equal to a client's (only ``*`` still holds)."""
    assert run(etag=SHA, if_none_match=SHA).status == 200
    assert run(etag=SHA, if_none_match=ETAG).status == 200
    assert run(etag=SHA, if_match=ETAG).status == 412
    assert run(etag=SHA, if_match="*").status == 200
    assert run(etag=SHA, range_header="bytes=0-9", if_range=ETAG).status == 200


def test_caller_mistakes_raise() -> None:
    with pytest.raises(ValueError, match="length"):
        run(length=-1)
    with pytest.raises(ValueError, match="last_modified"):
        run(last_modified=float("nan"))


# -- dates ------------------------------------------------------------------------

RFC_EXAMPLE = 784111777.0  # RFC 9110 §5.6.7: Sun, 06 Nov 1994 08:49:37 GMT


@pytest.mark.parametrize(
    "text",
    [
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
        " Sun, 06 Nov 1994 08:49:37 GMT\t",
    ],
)
def test_parse_http_date_formats(text: str) -> None:
    assert parse_http_date(text, now=1_700_000_000) == RFC_EXAMPLE


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Sun, 06 Nov 1994 08:49:37 UTC",
        "Sun, 06 Nov 1994 08:49:37 +0000",
        "Sun, 6 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 94 08:49:37 GMT",
        "Sun, 06 nov 1994 08:49:37 GMT",
        "sun, 06 Nov 1994 08:49:37 GMT",
        "Sun,  06 Nov 1994 08:49:37 GMT",
        "Sun, 31 Feb 1994 08:49:37 GMT",
        "Sun, 29 Feb 1993 08:49:37 GMT",
        "Sun, 06 Nov 1994 24:00:00 GMT",
        "Sun, 06 Nov 1994 08:60:00 GMT",
        "Sun, 06 Nov 1994 08:49:61 GMT",
        "Sun, 06 Nov 0000 08:49:37 GMT",
        "Sun, 00 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:37 GMT",
        "Sun Nov 6 08:49:37 1994",
        "Sun, \u0660\u0666 Nov 1994 08:49:37 GMT",
        "1994-11-06T08:49:37Z",
        "784111777",
        "Sun, 06 Nov 1994 08:49:37 GMT" + " " * 100 + "x",
    ],
)
def test_parse_http_date_rejects(text: str) -> None:
    assert parse_http_date(text) is None


def test_parse_http_date_leap_years_and_seconds() -> None:
    assert parse_http_date("Thu, 29 Feb 2024 00:00:00 GMT") == 1_709_164_800.0
    assert parse_http_date("Sat, 31 Dec 2016 23:59:60 GMT") == 1_483_228_800.0


@pytest.mark.parametrize(
    ("now_year", "yy", "year"),
    [
        (2025, "94", 1994),
        (2025, "24", 2024),
        (2025, "30", 2030),
        (2025, "75", 2075),
        (2025, "76", 1976),
        (2095, "05", 2105),
    ],
)
def test_rfc850_two_digit_year(now_year: int, yy: str, year: int) -> None:
    """§5.6.7: a year more than 50 years ahead is the most recent past one."""
    now = parse_http_date(f"Thu, 01 Jan {now_year} 00:00:00 GMT")
    expected = parse_http_date(f"Sun, 06 Nov {year} 08:49:37 GMT")
    assert now is not None and expected is not None
    assert parse_http_date(f"Sunday, 06-Nov-{yy} 08:49:37 GMT", now=now) == expected


def test_format_http_date() -> None:
    assert format_http_date(RFC_EXAMPLE) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert format_http_date(RFC_EXAMPLE + 0.999) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert format_http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"
    assert format_http_date(-0.5) == "Wed, 31 Dec 1969 23:59:59 GMT"
    rng = random.Random(9110)
    for _ in range(2000):
        ts = rng.randrange(-2_000_000_000, 100_000_000_000)
        assert parse_http_date(format_http_date(ts)) == ts


@pytest.mark.parametrize("ts", [float("nan"), float("inf"), -float("inf"), 1e300, -1e300])
def test_format_http_date_rejects(ts: float) -> None:
    with pytest.raises(ValueError, match="HTTP date"):
        format_http_date(ts)


# -- no header value raises ---------------------------------------------------------

_PIECES = [
    "bytes",
    "BYTES",
    "items",
    "=",
    "-",
    ",",
    " ",
    "\t",
    "0",
    "9",
    "10000",
    "9999",
    "99999999999999999999999999999999",
    '"',
    "W/",
    "w/",
    "*",
    ETAG,
    SHA,
    OTHER,
    LM,
    LM_RFC850,
    LM_ASCTIME,
    "GMT",
    "Sun,",
    "\x00",
    "\r\n",
    "\u0663",
    "\udcff",
    "\U0001f600",
]
_FIELDS = [
    "range_header",
    "if_range",
    "if_none_match",
    "if_modified_since",
    "if_match",
    "if_unmodified_since",
]


def _well_formed(rng: random.Random, field: str) -> str:
    """A plausible value of ``field``, so that the decisions reach 206 and 304 too."""
    if field == "range_header":
        first, last = rng.randrange(0, N + 5), rng.randrange(0, N + 5)
        return rng.choice([f"bytes={first}-{last}", f"bytes={first}-", f"bytes=-{last}"])
    if field in {"if_modified_since", "if_unmodified_since"}:
        return rng.choice([LM, EARLIER, LATER])
    return rng.choice([ETAG, OTHER, f"W/{ETAG}", "*", LM])


def _garbage(rng: random.Random, field: str) -> str | None:
    kind = rng.randrange(6)
    if kind == 0:
        return None
    if kind == 1:
        return "".join(rng.choices(_PIECES, k=rng.randrange(1, 12)))
    if kind == 2:
        raw = rng.randbytes(rng.randrange(0, 64))
        return raw.decode("utf-8", "surrogateescape")
    if kind == 3:
        return "".join(rng.choices(string.printable, k=rng.randrange(0, 40)))
    if kind == 4:
        base = _well_formed(rng, field)
        if rng.random() < 0.5:
            return base  # well-formed, so that the decision reaches 206 and 304 as well
        i = rng.randrange(len(base) + 1)
        return base[:i] + rng.choice(_PIECES) + base[i + 1 :]
    return rng.choice(_PIECES) * rng.randrange(1, MAX_HEADER // 2)


def _check(d: Decision, length: int) -> None:
    assert d.status == d.outcome.value
    assert 0 <= d.start <= d.end <= length
    ranges = [v for k, v in d.headers if k == "Content-Range"]
    if d.outcome is Outcome.FULL:
        assert (d.start, d.end, d.headers) == (0, length, ())
    elif d.outcome is Outcome.PARTIAL:
        assert d.start < d.end
        assert ranges == [f"bytes {d.start}-{d.end - 1}/{length}"]
    elif d.outcome is Outcome.UNSATISFIABLE:
        assert (d.start, d.end) == (0, 0)
        assert ranges == [f"bytes */{length}"]
    else:
        assert (d.start, d.end, d.headers) == (0, 0, ())


def test_no_header_value_raises() -> None:
    rng = random.Random(20240601)
    seen = set()
    for _ in range(4000):
        length = rng.choice([0, 1, 2, 10, N])
        # Most fields absent, so that a failed If-Match does not end every request.
        values = {field: _garbage(rng, field) if rng.random() < 0.3 else None for field in _FIELDS}
        d = run(method=rng.choice(["GET", "HEAD", "PUT"]), length=length, **values)
        _check(d, length)
        seen.add(d.outcome)
        for value in values.values():
            if value is not None:
                when = parse_http_date(value)
                assert when is None or isinstance(when, float)
    assert seen == set(Outcome)  # the inputs reached every branch


def test_single_garbage_header_never_raises() -> None:
    """One header at a time, so no precondition hides a Range or If-Range mistake."""
    rng = random.Random(7233)
    for _ in range(3000):
        field = rng.choice(_FIELDS)
        value = _garbage(rng, field)
        extra = {"range_header": "bytes=5-"} if field == "if_range" else {}
        d = run(**{field: value, **extra})
        _check(d, N)
