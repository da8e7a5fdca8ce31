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
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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


class Fetcher(abc.ABC):
    """Streams a URL's body; implementations say how."""

    @abc.abstractmethod
    def _fetch(self, url: str, offset: int, total: int | None) -> AsyncIterator[bytes]:
        """Yield the body of ``url`` from byte ``offset``.

        Implementations must, when ``offset > 0``, accept only ``206`` with
        ``Content-Range: bytes offset-(total-1)/total`` (raise
        :class:`RangeNotHonouredError` otherwise), raise
        :class:`relay.errors.UpstreamHTTPError` for any other unexpected status, and
        raise :class:`relay.errors.TransportError` on network failures.
        """

    async def fetch(
        self, url: str, *, max_length: int, offset: int = 0, total: int | None = None
    ) -> AsyncIterator[bytes]:
        """Yield the body of ``url`` from ``offset``, at most ``max_length - offset`` bytes.

        Args:
            url: absolute URL.
            max_length: the most bytes the whole resource may have (the signed length).
            offset: where to start (a resumed transfer).
            total: the expected full length, checked against ``Content-Range``.

        Raises:
            LengthMismatchError: the upstream sent more than ``max_length`` bytes.
            TransportError: any network failure, unexpected status, or refused resume.
        """
        received = offset
        try:
            async for chunk in self._fetch(url, offset, total):
                received += len(chunk)
                if received > max_length:
                    raise LengthMismatchError(url, max_length, received)
                yield chunk
        except (TransportError, UpstreamContentError):
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            raise TransportError(f"{url}: {type(e).__name__}: {e}") from e


class AiohttpFetcher(Fetcher):
    """A :class:`Fetcher` over an application-owned :class:`aiohttp.ClientSession`.

    Args:
        session: the shared client session (its lifetime is the application's).
        connect_timeout: seconds to establish a connection.
        read_timeout: the longest gap between bytes, in seconds.
        headers: extra request headers (for example ``Relay-Agent-Id``).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=connect_timeout,
            connect=connect_timeout,
            sock_read=read_timeout,
        )
        self._headers = dict(headers or {})

    async def _fetch(self, url: str, offset: int, total: int | None) -> AsyncIterator[bytes]:
        headers = dict(self._headers)
        # Identity only: a compressed body would not hash to the signed digest.
        headers["Accept-Encoding"] = "identity"
        if offset:
            headers["Range"] = f"bytes={offset}-"
        async with self._session.get(
            url,
            headers=headers,
            timeout=self._timeout,
            allow_redirects=True,
            auto_decompress=False,
        ) as resp:
            if offset:
                content_range = resp.headers.get("Content-Range")
                if resp.status != 206 or not _range_matches(content_range, offset, total):
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


class Upstream:
    """The configured upstreams, in order, with retries and failover.

    Args:
        fetcher: the transport.
        base_urls: upstream base URLs (an origin's ``public/`` root or a parent relay).
        retries: extra attempts per upstream for transport errors.
        backoff: first backoff in seconds; it doubles, with jitter.
        throttle: awaited with each chunk's size before it is accepted (the WAN limiter).
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
        self.base_urls = [u.rstrip("/") + "/" for u in base_urls]
        self._retries = retries
        self._backoff = backoff
        self._throttle = throttle
        self.health = {u: UpstreamHealth(u) for u in self.base_urls}
        self._stats = _Stats()

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

    def _count(self, base: str, n: int) -> None:
        self._stats.bytes_received += n
        for callback in self._stats.on_bytes:
            callback(base, n)

    async def _sleep_backoff(self, attempt: int) -> None:
        delay = self._backoff * (2**attempt)
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def get_metadata(self, name: str, max_length: int) -> bytes:
        """Return the bytes of ``metadata/<name>`` from the first upstream that has it.

        Raises:
            UpstreamHTTPError: no upstream delivered it and at least one answered 403
                or 404 (``status_code`` 404): the file does not exist (for
                ``N.root.json``: no newer root).
            LengthMismatchError: an upstream sent more than ``max_length`` bytes and no
                other upstream could deliver it.
            UpstreamUnavailableError: no upstream could deliver it.
        """
        causes: list[BaseException] = []
        not_found = 0
        for base in self._ordered():
            url = f"{base}metadata/{name}"
            for attempt in range(self._retries + 1):
                try:
                    parts = [c async for c in self._counted(base, url, max_length)]
                except UpstreamHTTPError as e:
                    if e.status_code in {403, 404}:
                        not_found += 1
                        self._mark_ok(base)
                        break
                    causes.append(e)
                    self._mark_failed(base, e)
                    if e.status_code < 500:
                        break
                except LengthMismatchError as e:
                    causes.append(e)
                    self._mark_failed(base, e)
                    break
                except TransportError as e:
                    causes.append(e)
                    self._mark_failed(base, e)
                else:
                    self._mark_ok(base)
                    return b"".join(parts)
                if attempt < self._retries:
                    await self._sleep_backoff(attempt)
        if not_found:
            # A reachable upstream said the file does not exist; the others failed.
            raise UpstreamHTTPError(f"metadata/{name}", 404)
        raise UpstreamUnavailableError(f"metadata/{name}", causes)

    async def _counted(self, base: str, url: str, max_length: int) -> AsyncIterator[bytes]:
        async for chunk in self._fetcher.fetch(url, max_length=max_length):
            if self._throttle is not None:
                await self._throttle(len(chunk))
            self._count(base, len(chunk))
            yield chunk

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
            url = f"{base}targets/{url_path}"
            attempt = 0
            while attempt <= self._retries:
                before = sink.offset
                try:
                    async for chunk in self._fetcher.fetch(
                        url, max_length=length, offset=sink.offset, total=length
                    ):
                        if self._throttle is not None:
                            await self._throttle(len(chunk))
                        await sink.write(chunk)
                        self._count(base, len(chunk))
                except RangeNotHonouredError as e:
                    logger.info("%s; restarting from zero", e)
                    await sink.restart()
                    causes.append(e)
                    attempt += 1
                    continue
                except UpstreamHTTPError as e:
                    causes.append(e)
                    self._mark_failed(base, e)
                    if e.status_code < 500:
                        break
                except LengthMismatchError as e:
                    self._mark_failed(base, e)
                    raise
                except TransportError as e:
                    causes.append(e)
                    self._mark_failed(base, e)
                else:
                    if sink.offset == length:
                        self._mark_ok(base)
                        return base
                    # The body ended early without an error: resume.
                    causes.append(TransportError(f"{url}: body ended at {sink.offset}/{length}"))
                if sink.offset > before:
                    attempt = 0  # progress was made: a broken transfer resumes at once
                    continue
                attempt += 1
                if attempt <= self._retries:
                    await self._sleep_backoff(attempt - 1)
        raise UpstreamUnavailableError(f"targets/{url_path}", causes)


async def close_quietly(session: aiohttp.ClientSession) -> None:
    """Close ``session``, ignoring errors (used in cleanup contexts)."""
    with contextlib.suppress(Exception):
        await session.close()
