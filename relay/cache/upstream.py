"""Upstream access: a fetcher interface, its aiohttp implementation, and failover.

Rules:

* :class:`Fetcher` has one abstract method, :meth:`Fetcher._fetch`. The public
  :meth:`Fetcher.fetch` enforces the maximum length while streaming and turns any
  stray exception into :class:`relay.errors.TransportError` (after python-tuf's
  ``FetcherInterface``).
* A resumed transfer asks ``Range: bytes=N-`` and accepts only ``206`` with exactly
  ``Content-Range: bytes N-(L-1)/L``; anything else raises
  :class:`RangeNotHonouredError` and the caller starts again from zero. The final
  sha256 is always checked by the caller (the blob store).
* :class:`Upstream` tries the configured base URLs in order, retries transport
  errors with exponential backoff, and remembers per URL the last failure, so that
  ``/readyz`` and the metrics can say which upstream failed, why and since when.
* Every request to an upstream goes through :class:`Upstream`: metadata, blobs, and
  any other bounded document (:meth:`Upstream.fetch_bytes`: a parent relay's patch,
  a parent's policy), so the WAN throttle, the byte counters, the timeouts, the
  retries, the failover order and the health apply to all of them alike.
* aiohttp, OS and timeout errors become :class:`relay.errors.TransportError` in one
  place, :func:`map_exceptions`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import copy
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from relay.errors import (
    LengthMismatchError,
    TransportError,
    UpstreamContentError,
    UpstreamHTTPError,
    UpstreamUnavailableError,
)

logger = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
CHUNK_SIZE = 64 * 1024


class RangeNotHonouredError(TransportError):
    """A resumed request did not get ``206`` with the exact ``Content-Range``."""

    def __init__(self, url: str, status: int, content_range: str | None) -> None:
        self.url = url
        self.status = status
        self.content_range = content_range
        super().__init__(f"{url}: resume refused (HTTP {status}, Content-Range {content_range!r})")


@contextlib.contextmanager
def map_exceptions(url: str) -> Iterator[None]:
    """Translate the transport's exceptions raised inside into :class:`TransportError`.

    The project's own upstream errors pass unchanged; aiohttp's client errors,
    timeouts, ``OSError`` and ``ValueError`` (a malformed response) are raised again
    as :class:`relay.errors.TransportError` naming ``url``, chained to the original.

    Args:
        url: the URL being fetched (named in the message).

    Yields:
        Nothing: the body of the ``with`` block runs.

    Raises:
        TransportError: a network failure inside the block.
    """
    try:
        yield
    except (TransportError, UpstreamContentError):
        raise
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
        raise TransportError(f"{url}: {type(e).__name__}: {e}") from e


@dataclass(slots=True)
class Exchange:
    """One GET to an upstream: what is asked, and the response's headers once they arrive."""

    url: str
    offset: int = 0  # bytes: resume from here (``Range: bytes=offset-``); 0 = the whole body
    total: int | None = None  # bytes: the full length a resumed response must state
    headers: Mapping[str, str] = field(default_factory=dict)  # extra request headers
    response_headers: Mapping[str, str] = field(default_factory=dict)  # set by the fetcher
    # Seconds the upstream may hold the request before it answers (a long poll, such as
    # GET /v1/events): the read timeout and the minimum-rate grace are longer by as
    # much, and 204 No Content is an answer. 0: an ordinary request.
    hold: float = 0.0
    status: int = 0  # the response's status, set by the fetcher


class SlowRetrievalError(TransportError):
    """The upstream sends slower than the minimum rate (TUF's slow-retrieval attack)."""

    def __init__(self, url: str, received: int, seconds: float, min_rate: int) -> None:
        self.url = url
        super().__init__(
            f"{url}: {received} bytes in {seconds:.0f} s, under the minimum of {min_rate} B/s"
        )


class Fetcher(abc.ABC):
    """Streams a URL's body; implementations say how.

    Args:
        min_rate: bytes per second a transfer must average once it has waited
            ``grace`` seconds for the upstream (0: no minimum). Only the time spent
            waiting for the upstream counts, not the caller's own pauses (the WAN
            limiter), so a trickling upstream cannot hold a sync or a fill forever.
        grace: seconds of waiting before the minimum rate applies.
    """

    def __init__(self, *, min_rate: int = 0, grace: float = 30.0) -> None:
        self.min_rate = min_rate
        self.grace = grace

    @abc.abstractmethod
    def _fetch(self, exchange: Exchange) -> AsyncIterator[bytes]:
        """Yield the body of ``exchange.url`` from byte ``exchange.offset``.

        Implementations send ``exchange.headers``, set ``exchange.response_headers``
        before the first chunk, and must, when ``offset > 0``, accept only ``206``
        with ``Content-Range: bytes offset-(total-1)/total`` (raise
        :class:`RangeNotHonouredError` otherwise), raise
        :class:`relay.errors.UpstreamHTTPError` for any other unexpected status, and
        raise :class:`relay.errors.TransportError` on network failures.
        """

    async def fetch(self, exchange: Exchange, *, max_length: int) -> AsyncIterator[bytes]:
        """Yield the body of ``exchange.url`` from its offset, at most ``max_length`` in all.

        Args:
            exchange: the URL, offset, expected total and request headers; its
                ``response_headers`` are set once the response starts.
            max_length: the most bytes the whole resource may have (the signed length).

        Raises:
            LengthMismatchError: the upstream sent more than ``max_length`` bytes.
            SlowRetrievalError: the upstream sent slower than ``min_rate``.
            TransportError: any network failure, unexpected status, or refused resume.
        """
        received = exchange.offset
        fresh = 0  # bytes of this request
        waited = 0.0  # seconds spent waiting for the upstream
        clock = asyncio.get_running_loop().time
        with map_exceptions(exchange.url):
            chunks = aiter(self._fetch(exchange))
            while True:
                started = clock()
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                waited += clock() - started
                received += len(chunk)
                fresh += len(chunk)
                if received > max_length:
                    raise LengthMismatchError(exchange.url, max_length, received)
                grace = self.grace + exchange.hold
                if self.min_rate and waited > grace and fresh < self.min_rate * waited:
                    raise SlowRetrievalError(exchange.url, fresh, waited, self.min_rate)
                yield chunk


class AiohttpFetcher(Fetcher):
    """A :class:`Fetcher` over an application-owned :class:`aiohttp.ClientSession`.

    Args:
        session: the shared client session (its lifetime is the application's).
        connect_timeout: seconds to establish a connection.
        read_timeout: the longest gap between bytes, in seconds (also the grace
            period before ``min_rate`` applies).
        min_rate: the slowest average transfer accepted, in bytes per second.
        headers: extra request headers (for example ``Relay-Agent-Id``).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        min_rate: int = 0,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(min_rate=min_rate, grace=read_timeout)
        self._session = session
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=connect_timeout,
            connect=connect_timeout,
            sock_read=read_timeout,
        )
        self._read_timeout = read_timeout
        self._headers = dict(headers or {})

    async def _fetch(self, exchange: Exchange) -> AsyncIterator[bytes]:
        url, offset = exchange.url, exchange.offset
        headers = {**self._headers, **exchange.headers}
        # Identity only: a compressed body would not hash to the signed digest.
        headers["Accept-Encoding"] = "identity"
        if offset:
            headers["Range"] = f"bytes={offset}-"
        timeout = self._timeout
        if exchange.hold:
            timeout = aiohttp.ClientTimeout(
                total=None,
                sock_connect=timeout.sock_connect,
                connect=timeout.connect,
                sock_read=self._read_timeout + exchange.hold,
            )
        async with self._session.get(
            url,
            headers=headers,
            timeout=timeout,
            allow_redirects=True,
            auto_decompress=False,
        ) as resp:
            exchange.response_headers = resp.headers
            exchange.status = resp.status
            if exchange.hold and resp.status == 204:
                return
            if offset:
                content_range = resp.headers.get("Content-Range")
                if resp.status != 206 or not _range_matches(content_range, offset, exchange.total):
                    raise RangeNotHonouredError(url, resp.status, content_range)
            elif resp.status != 200:
                raise UpstreamHTTPError(url, resp.status)
            async for chunk in resp.content.iter_chunked(CHUNK_SIZE):
                yield chunk


def _range_matches(content_range: str | None, offset: int, total: int | None) -> bool:
    if content_range is None:
        return False
    match = _CONTENT_RANGE.match(content_range.strip())
    if match is None:
        return False
    first, last, length = (int(g) for g in match.groups())
    if first != offset:
        return False
    if total is not None and (length != total or last != total - 1):
        return False
    return last >= first


class BlobSink(Protocol):
    """Where :meth:`Upstream.fetch_blob` writes: the blob store's fill writer."""

    @property
    def offset(self) -> int:
        """Bytes already written (where a resumed transfer starts)."""

    async def write(self, chunk: bytes) -> None:
        """Append ``chunk``."""

    async def restart(self) -> None:
        """Start again from byte zero (the upstream refused to resume)."""


@dataclass(slots=True)
class UpstreamHealth:
    """What is known of one upstream base URL."""

    url: str
    last_ok: float | None = None  # time.time() of the last success
    failing_since: float | None = None  # time.time() of the first failure in a row
    last_error: str = ""
    failures: int = 0

    def to_dict(self) -> dict[str, object]:
        """A JSON-safe summary for ``/readyz``."""
        return {
            "url": self.url,
            "ok": self.failing_since is None,
            "last_ok": self.last_ok,
            "failing_since": self.failing_since,
            "last_error": self.last_error,
        }


@dataclass(slots=True)
class _Stats:
    bytes_received: int = 0
    on_bytes: list[Callable[[str, int], None]] = field(default_factory=list)


_METADATA_MISSING = frozenset({403, 404})  # an object store answers 403 for a missing key
_MISSING = frozenset({404})


def _base_url(url: str) -> str:
    return url.rstrip("/") + "/"


class Upstream:
    """The configured upstreams, in order, with retries and failover.

    Args:
        fetcher: the transport.
        base_urls: upstream base URLs (an origin's ``public/`` root or a parent relay).
        retries: extra attempts per upstream for transport errors.
        backoff: first backoff in seconds; it doubles, with jitter.
        throttle: awaited with each chunk's size before it is accepted (the WAN limiter).

    Raises:
        ValueError: ``base_urls`` is empty.
    """

    def __init__(
        self,
        fetcher: Fetcher,
        base_urls: list[str],
        *,
        retries: int = 3,
        backoff: float = 0.5,
        throttle: Callable[[int], Awaitable[object]] | None = None,
    ) -> None:
        if not base_urls:
            raise ValueError("at least one upstream URL is needed")
        self._fetcher = fetcher
        self.base_urls = [_base_url(u) for u in base_urls]
        self._retries = retries
        self._backoff = backoff
        self._throttle = throttle
        self.health = {u: UpstreamHealth(u) for u in self.base_urls}
        self._stats = _Stats()

    def with_base_url(self, base_url: str) -> Upstream:
        """The same transport and limits over one other base URL.

        For a resource that is not under the configured upstreams (for example a
        parent relay's admin API). The fetcher (session, timeouts, default
        headers), retries, backoff, WAN throttle and byte counters (with their
        :meth:`on_bytes` callbacks) are shared with this one; the health of
        ``base_url`` is kept apart, so it does not show among the upstreams.

        Args:
            base_url: the base URL every path is resolved against.

        Returns:
            A new :class:`Upstream` with ``base_url`` as its only upstream.

        Raises:
            Nothing.
        """
        other = copy.copy(self)
        other.base_urls = [_base_url(base_url)]
        other.health = {u: UpstreamHealth(u) for u in other.base_urls}
        return other

    @property
    def bytes_received(self) -> int:
        """Total body bytes received from every upstream."""
        return self._stats.bytes_received

    def on_bytes(self, callback: Callable[[str, int], None]) -> None:
        """Call ``callback(base_url, n)`` for every chunk received (for metrics)."""
        self._stats.on_bytes.append(callback)

    def _ordered(self) -> list[str]:
        # Healthy upstreams first, in configured order; failing ones after, so a
        # recovered first upstream is used again as soon as it answers.
        ok = [u for u in self.base_urls if self.health[u].failing_since is None]
        bad = [u for u in self.base_urls if self.health[u].failing_since is not None]
        return ok + bad

    def _mark_ok(self, base: str) -> None:
        health = self.health[base]
        health.last_ok = time.time()
        health.failing_since = None
        health.failures = 0

    def _mark_failed(self, base: str, error: BaseException) -> None:
        health = self.health[base]
        if health.failing_since is None:
            health.failing_since = time.time()
        health.failures += 1
        health.last_error = str(error)

    def mark_content_error(self, base: str, error: BaseException) -> None:
        """Record that ``base`` served bad content, so the next attempt prefers another."""
        self._mark_failed(base, error)

    def _failed(
        self, base: str, error: TransportError | LengthMismatchError, causes: list[BaseException]
    ) -> bool:
        """Record a failed attempt at ``base``; True if trying ``base`` again may help.

        A network failure or a 5xx may pass; a 4xx or an over-long body would not.
        """
        causes.append(error)
        self._mark_failed(base, error)
        if isinstance(error, UpstreamHTTPError):
            return error.status_code >= 500
        return isinstance(error, TransportError)

    async def _sleep_backoff(self, attempt: int) -> None:
        delay = self._backoff * (2**attempt)
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _counted(
        self, base: str, exchange: Exchange, max_length: int
    ) -> AsyncIterator[bytes]:
        # Throttled before a chunk is handed on, counted once the consumer took it.
        async for chunk in self._fetcher.fetch(exchange, max_length=max_length):
            if self._throttle is not None:
                await self._throttle(len(chunk))
            yield chunk
            self._stats.bytes_received += len(chunk)
            for callback in self._stats.on_bytes:
                callback(base, len(chunk))

    async def get_metadata(self, name: str, max_length: int) -> bytes:
        """Return the bytes of ``metadata/<name>`` from the first upstream that has it.

        Raises:
            UpstreamHTTPError: no upstream delivered it and at least one answered 403
                or 404 (``status_code`` 404): the file does not exist (for
                ``N.root.json``: no newer root).
            UpstreamUnavailableError: no upstream could deliver it (an upstream that
                sent more than ``max_length`` bytes is among its ``causes``).
        """
        data, _ = await self._get(f"metadata/{name}", max_length, {}, _METADATA_MISSING)
        return data

    async def fetch_bytes(
        self, path: str, *, max_length: int, headers: Mapping[str, str] | None = None
    ) -> tuple[bytes, Mapping[str, str]]:
        """Return the body and headers of ``<base>/<path>`` from the first upstream that has it.

        The same transport as metadata and blobs: upstreams in health order, retries
        with backoff, the WAN throttle, the byte counters and the health records.
        Only ``200`` is a success.

        Args:
            path: the path under each base URL (no leading slash), e.g.
                ``deltas/<from>/<to>``.
            max_length: the most bytes the body may have; a longer body is refused.
            headers: extra request headers (``Accept``, ``Authorization``...).

        Returns:
            The body and the response's headers (case-insensitive where the
            transport's are).

        Raises:
            UpstreamHTTPError: no upstream delivered it and at least one answered
                404 (``status_code`` 404).
            UpstreamUnavailableError: no upstream could deliver it (an upstream that
                sent more than ``max_length`` bytes is among its ``causes``, as a
                :class:`relay.errors.LengthMismatchError`).
        """
        return await self._get(path, max_length, headers or {}, _MISSING)

    async def long_poll(
        self, path: str, *, hold: float, max_length: int, headers: Mapping[str, str] | None = None
    ) -> bytes | None:
        """One long poll of ``<base>/<path>`` on the first healthy upstream.

        The same transport, WAN throttle and byte counters as every other request;
        no retries and no failover (the caller polls again), and the upstreams'
        health is left alone (an upstream without the path is not failing).

        Args:
            path: the path under the base URL, with its query (``v1/events?since=...``).
            hold: the longest the upstream may hold the request, in seconds.
            max_length: the most bytes the body may have.
            headers: extra request headers.

        Returns:
            The body of a ``200``; ``None`` for ``204`` (nothing happened).

        Raises:
            UpstreamHTTPError: any other status (``404``: the upstream has no such path).
            TransportError: a network failure, or no answer within ``hold`` plus the
                read timeout.
            LengthMismatchError: a body longer than ``max_length``.
        """
        base = self._ordered()[0]
        exchange = Exchange(f"{base}{path}", headers=headers or {}, hold=hold)
        parts = [c async for c in self._counted(base, exchange, max_length)]
        return None if exchange.status == 204 else b"".join(parts)

    async def _get(
        self, path: str, max_length: int, headers: Mapping[str, str], missing: frozenset[int]
    ) -> tuple[bytes, Mapping[str, str]]:
        causes: list[BaseException] = []
        not_found = 0
        for base in self._ordered():
            exchange = Exchange(f"{base}{path}", headers=headers)
            for attempt in range(self._retries + 1):
                try:
                    parts = [c async for c in self._counted(base, exchange, max_length)]
                except (TransportError, LengthMismatchError) as e:
                    if isinstance(e, UpstreamHTTPError) and e.status_code in missing:
                        not_found += 1
                        self._mark_ok(base)
                        break
                    if not self._failed(base, e, causes):
                        break
                else:
                    self._mark_ok(base)
                    return b"".join(parts), exchange.response_headers
                if attempt < self._retries:
                    await self._sleep_backoff(attempt)
        if not_found:
            # A reachable upstream said it does not exist; the others failed.
            raise UpstreamHTTPError(path, 404)
        raise UpstreamUnavailableError(path, causes)

    async def fetch_blob(self, url_path: str, length: int, sink: BlobSink) -> str:
        """Stream ``targets/<url_path>`` into ``sink``, resuming and failing over.

        The sink's own offset says where to resume; the caller verifies the hash.

        Returns:
            The base URL that delivered the last byte.

        Raises:
            LengthMismatchError: an upstream sent more than ``length`` bytes.
            UpstreamUnavailableError: no upstream could deliver the blob.
        """
        causes: list[BaseException] = []
        for base in self._ordered():
            exchange = Exchange(f"{base}targets/{url_path}", total=length)
            attempt = 0
            while attempt <= self._retries:
                before = exchange.offset = sink.offset
                slow = False
                try:
                    async for chunk in self._counted(base, exchange, length):
                        await sink.write(chunk)
                except RangeNotHonouredError as e:
                    logger.info("%s; restarting from zero", e)
                    await sink.restart()
                    causes.append(e)
                    attempt += 1
                    continue
                except LengthMismatchError as e:
                    self._mark_failed(base, e)
                    raise
                except TransportError as e:
                    slow = isinstance(e, SlowRetrievalError)
                    if not self._failed(base, e, causes):
                        break
                else:
                    if sink.offset == length:
                        self._mark_ok(base)
                        return base
                    # The body ended early without an error: resume.
                    causes.append(
                        TransportError(f"{exchange.url}: body ended at {sink.offset}/{length}")
                    )
                if sink.offset > before and not slow:
                    # Progress was made: a broken transfer resumes at once. A trickle is
                    # progress too, but it must not buy itself endless attempts.
                    attempt = 0
                    continue
                attempt += 1
                if attempt <= self._retries:
                    await self._sleep_backoff(attempt - 1)
        raise UpstreamUnavailableError(f"targets/{url_path}", causes)


async def close_quietly(session: aiohttp.ClientSession) -> None:
    """Close ``session``, ignoring errors (used in cleanup contexts)."""
    with contextlib.suppress(Exception):
        await session.close()
