"""Configuration: one TOML file, environment overrides, flags on top.

Rules (docs/PROTOCOL.md):

* Layers, lowest first: built-in defaults < the TOML file named by ``--config`` <
  ``RELAY_<SECTION>__<KEY>`` environment variables < command-line flags (a mapping of
  dotted keys). A higher layer replaces a key whole: lists and tables are not merged
  with the layer below, except that kinds missing from ``policy.install_undefined``
  keep their defaults.
* ``environ`` is a parameter: nothing here reads ``os.environ``, and nothing is read
  at import time. The only file read is the one ``path`` names (and
  ``admin.token_file``, when :meth:`Config.admin_token` is called).
* Each key is declared once, as a field of its section's frozen dataclass made with
  :func:`relay.core.schema.setting`: its default, its parser and its documentation
  (``config/relay.example.toml`` comments each key with that text). The ``[policy]``
  section extends :class:`relay.core.policy.Settings`, so the settings an administrator
  may change are declared in the core, once. Everything is validated once; the tables
  inside the sections are read-only mappings.
* Every failure is a :class:`relay.errors.ConfigError` naming the key, the value and
  where it came from (the file path, the variable name, or ``command line``): an
  unknown section or key, a bad value, a TOML syntax error (its message gives the
  line), a missing file, or a variable written ``RELAY_SECTION_KEY`` with a single
  underscore where two belong.
* Text form, used by environment variables and by string values given on the command
  line for keys that are not strings: lists are comma-separated, booleans are
  ``true``/``false``/``1``/``0``/``yes``/``no``/``on``/``off``, and
  ``policy.install_undefined`` lists the kinds that are on. Other tables
  (``limits.schedule``, ``agent.actions``) are file-only.
* ``agent.defer_days`` is 0 (no deferral) or one of ``policy.deferral_days``, the same
  rule a relay applies to a check-in.
* Secrets (``admin.token``, and any key named like a token, secret or password) never
  appear in an error message or a ``repr``.
* Sizes: bytes, or ``KB``/``MB``/``GB`` (powers of 1000) or ``KiB``/``MiB``/``GiB``
  (powers of 1024); durations: seconds, or ``s``/``m``/``h``/``d``; rates: sizes per
  second. ``inf`` and ``nan`` are refused everywhere.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_type_hints
from urllib.parse import urlsplit

from relay.core.model import Kind
from relay.core.policy import MAX_DEFERRAL_DAYS, Prefetch, Settings
from relay.core.protocol import DeltaFormat, deferral_choices
from relay.core.rates import ScheduleEntry
from relay.core.schema import (
    Parser,
    boolean,
    choice,
    from_dict,
    integer,
    keys_of,
    list_of,
    parser_of,
    setting,
    string,
    to_dict,
)
from relay.core.units import parse_duration, parse_rate, parse_size
from relay.errors import ConfigError

ENV_PREFIX = "RELAY_"
COMMAND_LINE = "command line"
DEFAULTS = "built-in defaults"
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
EventLoop = Literal["uvloop", "asyncio"]
PolicyMode = Literal["autonomous", "replica"]
DeltaFormatName = Literal["zstd", "bsdiff4"]

# Variables that start like a configuration variable but belong to another command:
# `relay admin`'s deprecated name for its token (now RELAY_ADMIN__TOKEN, as the server's).
MAX_WORKERS = 64
"""The most processes ``relay.workers`` may ask for."""
_NOT_CONFIG_VARIABLES = frozenset({"RELAY_ADMIN_TOKEN"})
_SECRET_WORDS = ("token", "secret", "password")
_HIDDEN = "<hidden>"

_HHMM = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")
# HOST:PORT, or [IPv6]:PORT; an empty host listens on every interface.
_LISTEN = re.compile(r"(?:\[(?P<v6>[^\[\]]+)\]|(?P<host>[A-Za-z0-9._-]*)):(?P<port>[0-9]{1,5})")


# -- value parsers -----------------------------------------------------------------
# The generic ones (booleans, integers, choices, lists) are in relay.core.schema. Each
# takes (value, text): ``text`` is true when a string is in the text form of an
# environment variable or a command-line flag. Each returns the typed value or raises
# ValueError with the reason; _parse turns that into a ConfigError.


def _finite(value: Any) -> Any:
    # TOML has inf and nan; neither is a size, a rate or a duration.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def _ratio(value: Any, text: bool) -> float:
    if text and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError("expected a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number")
    if not 0 < value <= 1:  # also refuses nan
        raise ValueError("must be more than 0 and at most 1")
    return float(value)


def _size(minimum: int = 0) -> Parser:
    def parse(value: Any, _text: bool) -> int:
        n = parse_size(_finite(value))
        if n < minimum:
            raise ValueError(f"must be at least {minimum} (bytes)")
        return n

    return parse


def _rate(value: Any, _text: bool) -> int:
    return parse_rate(_finite(value))


def _duration(*, positive: bool = False) -> Parser:
    def parse(value: Any, _text: bool) -> float:
        seconds = parse_duration(_finite(value))
        if positive and seconds <= 0:
            raise ValueError("must be more than 0 seconds")
        return seconds

    return parse


def _path(value: Any, _text: bool) -> Path:
    if not isinstance(value, str | Path):
        raise ValueError("expected a path (a string)")
    if "\0" in str(value):
        raise ValueError("a path cannot contain a NUL character")
    return Path(value)


def _url(value: Any, _text: bool) -> str:
    if not isinstance(value, str):
        raise ValueError("expected an http:// or https:// URL")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("a URL cannot contain spaces or control characters")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
    except ValueError:
        raise ValueError("the port must be a number from 0 to 65535") from None
    if parts.query or parts.fragment:
        raise ValueError("a base URL has no ?query or #fragment")
    return value


def _optional_url(value: Any, text: bool) -> str:
    return "" if value == "" else _url(value, text)


def _listen(value: Any, _text: bool) -> str:
    match = _LISTEN.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError("expected HOST:PORT, such as 127.0.0.1:8080, [::1]:8080 or :8080")
    if match["v6"] is not None:
        try:
            ipaddress.IPv6Address(match["v6"])
        except ValueError:
            raise ValueError(f"{match['v6']!r} in brackets is not an IPv6 address") from None
    if int(match["port"]) > 65535:
        raise ValueError("the port must be from 0 to 65535")
    return str(value)


def _optional_listen(value: Any, text: bool) -> str:
    return "" if value == "" else _listen(value, text)


def _actions(value: Any, text: bool) -> Mapping[str, str]:
    if text and isinstance(value, str):
        raise ValueError("a table: set it in the configuration file ([agent.actions])")
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("expected a table of action name = command line")
    return MappingProxyType(dict(value))


def _hhmm(value: Any) -> str:
    if not isinstance(value, str) or not _HHMM.fullmatch(value):
        raise ValueError(f"{value!r} is not HH:MM (24-hour, such as 08:00)")
    return value


def _days(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError("days: expected a list such as ['mon', 'tue']")
    bad = [d for d in value if d not in DAYS]
    if bad:
        raise ValueError(f"days: unknown day {bad[0]!r} (use {', '.join(DAYS)})")
    return tuple(value)


_SCHEDULE_RATES = ("upstream", "egress", "per_agent")
_SCHEDULE_KEYS = ("start", "end", "days", *_SCHEDULE_RATES)


def _schedule(value: Any, text: bool) -> tuple[ScheduleEntry, ...]:
    if text and isinstance(value, str):
        raise ValueError(
            "an array of tables: set it in the configuration file ([[limits.schedule]])"
        )
    if not isinstance(value, list | tuple):
        raise ValueError("expected an array of tables [[limits.schedule]]")
    entries = []
    for i, raw in enumerate(value):
        try:
            if not isinstance(raw, Mapping):
                raise ValueError("expected a table")
            unknown = set(raw) - set(_SCHEDULE_KEYS)
            if unknown:
                raise ValueError(
                    f"unknown key {min(unknown)!r} (known: {', '.join(_SCHEDULE_KEYS)})"
                )
            for needed in ("start", "end"):
                if needed not in raw:
                    raise ValueError(f"{needed} is required")
            rates = {}
            for key in _SCHEDULE_RATES:
                if key in raw:
                    try:
                        rates[key] = _rate(raw[key], text)
                    except ValueError as e:
                        raise ValueError(f"{key}: {e}") from None
            entries.append(
                ScheduleEntry(
                    start=_hhmm(raw["start"]),
                    end=_hhmm(raw["end"]),
                    days=_days(raw.get("days", ())),
                    **rates,
                )
            )
        except ValueError as e:
            raise ValueError(f"entry {i}: {e}") from None
    return tuple(entries)


_DELTA_FORMAT = choice(*DeltaFormat)


# -- sections -----------------------------------------------------------------------


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


class _UnderDataDir:
    """A directory inside ``data_dir``, read as an attribute (``relay.blobs_dir``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, settings: RelaySettings, owner: type | None = None) -> Path:
        return settings.data_dir / self.name


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """``[relay]``: the process itself."""

    listen: str = setting(
        _listen,
        'HOST:PORT; "[::1]:8080" for IPv6; ":8080" = every interface',
        default="127.0.0.1:8080",
    )
    data_dir: Path = setting(
        _path,
        "path; metadata/, blobs/, deltas/, state/ are created inside",
        default=Path("relay-data"),
    )
    log_format: LogFormat = setting(
        choice("text", "json"), "text | json (one object per line)", default="text"
    )
    access_log: bool = setting(boolean, "boolean: one log line per request", default=True)
    public_url: str = setting(
        _optional_url, 'URL advertised to agents; "" = derived from listen', default=""
    )
    drain: float = setting(
        _duration(), "duration: on SIGTERM/SIGINT, transfers in flight get this long", default=10.0
    )
    log_level: LogLevel = setting(
        choice("debug", "info", "warning", "error"),
        "debug | info | warning | error (-v: debug)",
        default="info",
    )
    workers: int = setting(
        integer(0, MAX_WORKERS),
        "integer 0..64: processes serving relay.listen; 0 = one per core, 1 = a single process",
        default=0,
    )
    event_loop: EventLoop = setting(
        choice("uvloop", "asyncio"),
        "uvloop | asyncio (the standard library's loop: more CPU per request)",
        default="uvloop",
    )

    @property
    def processes(self) -> int:
        """The processes serving ``listen``: ``workers``, or one per core when it is 0.

        The cores are those this process may run on (its CPU affinity: a cpuset
        counts, a CPU quota does not).
        """
        return self.workers or max(1, min(MAX_WORKERS, _usable_cores()))

    metadata_dir = _UnderDataDir("metadata")  # verified TUF metadata, byte-exact
    blobs_dir = _UnderDataDir("blobs")  # the content-addressed blob store
    deltas_dir = _UnderDataDir("deltas")  # computed patches
    state_dir = _UnderDataDir("state")  # the state database (approvals, agents, audit, counters)


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """``[upstream]``: where metadata and targets come from."""

    urls: tuple[str, ...] = setting(
        list_of(_url), "list of http(s) base URLs (origin or parent relay), in order", default=()
    )
    trusted_root: Path = setting(
        _path, "path to the pinned root.json (required to serve)", default=Path()
    )
    connect_timeout: float = setting(_duration(positive=True), "duration, > 0", default=10.0)
    read_timeout: float = setting(
        _duration(positive=True), "duration, > 0: the longest gap between bytes", default=30.0
    )
    retries: int = setting(
        integer(0, 100), "integer >= 0: extra attempts per upstream on network errors", default=3
    )
    retry_backoff: float = setting(_duration(), "duration: first backoff, doubling", default=0.5)
    min_rate: int = setting(
        _rate,
        "rate: slower transfers fail (counted after read_timeout; 0 = no minimum)",
        default=1024,
    )


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """``[sync]``: metadata polling and prefetch."""

    # Short: the top relay learns of new content by polling timestamp.json (two small
    # requests per poll, about 1.2 kB: benchmarks/RESULTS.md, "Events"); a child relay
    # learns of it at once from its parent's GET /v1/events.
    interval: float = setting(
        _duration(positive=True), "duration, > 0, between metadata polls", default=10.0
    )
    jitter: float = setting(
        _duration(), "duration: at most this much random delay added per poll", default=5.0
    )
    prefetch: str = setting(
        choice(*Prefetch),
        "policy (what some group would be offered) | all | none",
        default="policy",
    )


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """``[store]``: the blob store."""

    max_bytes: int = setting(_size(), "size of the blob store quota; 0 = unlimited", default=0)
    keep_versions: int = setting(
        integer(0), "integer >= 0: newest versions of each product never evicted", default=3
    )
    scrub_interval: float = setting(
        _duration(), "duration between re-hashes of every blob; 0 = off", default=86400.0
    )
    retry_after: float = setting(
        _duration(), "duration told to clients (Retry-After) when the store is full", default=30.0
    )


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    """``[limits]``: bandwidth and concurrency."""

    upstream: int = setting(_rate, "rate: all upstream fetches together; 0 = unlimited", default=0)
    egress: int = setting(_rate, "rate: all responses together; 0 = unlimited", default=0)
    per_agent: int = setting(_rate, "rate: each agent; 0 = unlimited", default=0)
    max_transfers: int = setting(
        integer(0), "integer: concurrent blob responses; 0 = unlimited", default=1024
    )
    max_transfers_per_agent: int = setting(
        integer(0), "integer: concurrent blob responses per agent; 0 = unlimited", default=8
    )
    chunk_bytes: int = setting(_size(1), "size of each paced write, >= 1", default=64 * 1024)
    retry_after: float = setting(
        _duration(), "duration told to clients (Retry-After) past the limits", default=5.0
    )
    schedule: tuple[ScheduleEntry, ...] = setting(
        _schedule, "time-of-day rates (array of tables)", default=()
    )
    max_connections: int = setting(
        integer(0),
        "integer: open client connections (at most 3/4 of the open-file limit); 0 = that bound",
        default=10_000,
    )
    header_timeout: float = setting(
        _duration(positive=True),
        "duration from a request's first byte to the end of its headers (else 408)",
        default=10.0,
    )
    body_timeout: float = setting(
        _duration(positive=True),
        "duration from the end of a request's headers to the end of its body (else 408)",
        default=30.0,
    )
    idle_timeout: float = setting(
        _duration(positive=True),
        "duration a keep-alive connection may wait for its next request",
        default=30.0,
    )
    max_request_head: int = setting(
        _size(1024),
        "size of a request line and all its headers together (else 431)",
        default=32 * 1024,
    )
    max_header_size: int = setting(
        _size(256), "size of the request line or of one header (else 400/431)", default=8190
    )
    max_headers: int = setting(
        integer(8), "integer >= 8: headers in one request (else 431)", default=64
    )
    min_send_rate: int = setting(
        _rate, "rate a client must take while a response waits for it; 0 = off", default=1024
    )
    slow_send_window: float = setting(
        _duration(positive=True), "duration over which min_send_rate is measured", default=60.0
    )
    max_agents: int = setting(
        integer(1),
        "integer >= 1: agents in the registry; past it the one seen longest ago is dropped",
        default=100_000,
    )
    agent_expiry: float = setting(
        _duration(),
        "duration after which an agent not seen is dropped from the registry; 0 = never",
        default=90 * 86400.0,
    )


@dataclass(frozen=True, slots=True)
class DeltaSettings:
    """``[delta]``: relay-computed patches."""

    enabled: bool = setting(boolean, "boolean: compute and serve binary deltas", default=True)
    # bsdiff4 first from benchmarks/RESULTS.md (zstd's median patch is 1.42x bsdiff4's,
    # over the 1.25x the rule allows).
    formats: tuple[DeltaFormatName, ...] = setting(
        list_of(_DELTA_FORMAT, unique=True, non_empty=True),
        "preference order, each once (benchmarks/RESULTS.md decides it)",
        default=("bsdiff4", "zstd"),
    )
    bases: int = setting(
        integer(0, 64), "integer 0..64: older versions diffed against each new one", default=3
    )
    workers: int = setting(integer(1, 64), "integer 1..64: diff processes", default=1)
    max_queued: int = setting(
        integer(1, 100_000),
        "integer >= 1: pairs check-ins may queue for diffing at once (more are dropped)",
        default=32,
    )
    max_memory: int = setting(
        _size(), "size: a diff estimated to need more is skipped", default=2 * 1024**3
    )
    max_seconds: float = setting(
        _duration(positive=True), "duration, > 0: a longer diff is killed", default=300.0
    )
    max_ratio: float = setting(
        _ratio, "0 < ratio <= 1: a patch larger than this share is dropped", default=0.5
    )
    # 3, not 19: benchmarks/RESULTS.md (19 took 67 s on 26 MB).
    zstd_level: int = setting(integer(1, 22), "integer 1..22 (3: benchmarks/RESULTS.md)", default=3)


@dataclass(frozen=True)
class PolicySettings(Settings):
    """``[policy]``: the policy settings (:class:`Settings`), the mode and what agents are told.

    :func:`relay.fleet.approvals.settings_from_config` takes the :class:`Settings` part.
    """

    mode: PolicyMode = setting(
        choice("autonomous", "replica"),
        "autonomous | replica (approvals and settings from parent_url)",
        default="autonomous",
    )
    parent_url: str = setting(
        _optional_url, "replica: the parent relay's base URL (required for replica)", default=""
    )
    parent_token_file: Path = setting(
        _path, "replica: path of the file holding the parent's admin token", default=Path()
    )
    poll_seconds: int = setting(
        integer(1), "integer >= 1: seconds between check-ins, told to agents", default=3600
    )
    origin_url: str = setting(
        _optional_url, 'origin told to agents; "" = the first upstream URL', default=""
    )
    relays: tuple[str, ...] = setting(
        list_of(_url), "list of more relay URLs advertised to agents, besides this one", default=()
    )


@dataclass(frozen=True, slots=True)
class EventsSettings:
    """``[events]``: the ``GET /v1/events`` long poll (docs/PROTOCOL.md, "Events")."""

    hold: float = setting(
        _duration(positive=True),
        "duration, > 0: how long GET /v1/events is held without a change",
        default=55.0,
    )
    splay: float = setting(
        _duration(),
        "duration: the agents woken by one change are spread over it",
        default=30.0,
    )


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """``[admin]``: the admin API (off when there is no token)."""

    token_file: Path = setting(
        _path, "path of the file holding the admin bearer token", default=Path()
    )
    token: str = setting(
        string,
        "or the token itself (prefer token_file or RELAY_ADMIN__TOKEN);",
        default="",
        hidden=True,
    )
    listen: str = setting(
        _optional_listen,
        '"" = on relay.listen; HOST:PORT = /v1/admin/ and /ui/ there only',
        default="",
    )


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """``[agent]``: the reference agent."""

    id: str = setting(string, 'agent id (sent as Relay-Agent-Id); "" = the host name', default="")
    group: str = setting(string, "agent group (approval ring)", default="default")
    relays: tuple[str, ...] = setting(
        list_of(_url), "list of relay base URLs, in order of preference", default=()
    )
    origin: str = setting(
        _optional_url, "origin base URL (used only when relays_only is false)", default=""
    )
    relays_only: bool = setting(boolean, "boolean: never fall back to the origin", default=False)
    install_undefined: tuple[str, ...] = setting(
        list_of(choice(*Kind), unique=True),
        "list of kinds installed from the origin before any relay ever answered",
        default=("content",),
    )
    trusted_root: Path = setting(_path, "path to the root.json the agent ships", default=Path())
    state_dir: Path = setting(
        _path,
        "path: TUF metadata and agent state (kept across restarts)",
        default=Path("agent-state"),
    )
    install_dir: Path = setting(
        _path, "path: where products are installed", default=Path("agent-install")
    )
    install_command: str = setting(
        string, 'command line run after placing a file; "" = none', default=""
    )
    uninstall_command: str = setting(
        string,
        'command line run to remove a declined version; "" = delete the file',
        default="",
    )
    install_timeout: float = setting(_duration(positive=True), "duration, > 0", default=300.0)
    defer_days: int = setting(
        integer(0, MAX_DEFERRAL_DAYS),
        "days on-demand updates are deferred: 0 = none, else one of policy.deferral_days",
        default=0,
    )
    accept_delta: tuple[DeltaFormatName, ...] = setting(
        list_of(_DELTA_FORMAT, unique=True),
        "list of delta formats this agent applies",
        default=("zstd", "bsdiff4"),
    )
    poll_jitter: float = setting(
        _duration(), "duration: at most this much random delay added per poll", default=60.0
    )
    request_timeout: float = setting(_duration(positive=True), "duration, > 0", default=30.0)
    actions: Mapping[str, str] = setting(
        _actions, "table: post-install action name = command line", default={}
    )


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration, validated: one field per section."""

    relay: RelaySettings = field(default_factory=RelaySettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    delta: DeltaSettings = field(default_factory=DeltaSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    events: EventsSettings = field(default_factory=EventsSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    source: str = DEFAULTS  # the file path, or "built-in defaults"; for messages
    # Where each key that is not a default came from: the file, a variable, the command line.
    sources: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    def source_of(self, key: str) -> str:
        """Say where a key got its value, for error messages.

        Args:
            key: a dotted key such as ``limits.egress``.

        Returns:
            The file path, the variable name or ``command line`` that set the key; for
            a key left at its default, :attr:`source` (the file the operator would edit).
        """
        return self.sources.get(key, self.source)

    def admin_token(self) -> str:
        """Return the admin bearer token: ``admin.token``, else ``admin.token_file``.

        This reads a file: call it off the event loop.

        Returns:
            The token, stripped of surrounding whitespace; ``""`` means the admin API
            is off.

        Raises:
            ConfigError: ``admin.token_file`` is set but cannot be read.
        """
        if self.admin.token:
            return self.admin.token
        if not _is_set(self.admin.token_file):
            return ""
        try:
            return self.admin.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise ConfigError(
                "admin.token_file",
                str(self.admin.token_file),
                self.source_of("admin.token_file"),
                f"cannot be read: {reason}",
            ) from e


def _is_set(path: Path) -> bool:
    # Path("") is Path("."): an empty path in the file means "not set".
    return str(path) not in ("", ".")


# The sections, from Config's fields: the dataclasses among their types.
_SECTIONS: dict[str, type] = {
    name: hint
    for name, hint in get_type_hints(Config).items()
    if isinstance(hint, type) and is_dataclass(hint)
}


# -- loading --------------------------------------------------------------------------


def default_config() -> Config:
    """Return the built-in defaults (what an empty file gives).

    Returns:
        A :class:`Config` with every key at its default.
    """
    return Config()


def load_config(
    path: Path | None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Load and validate the configuration, layer by layer.

    Args:
        path: the TOML file given by ``--config``; ``None``: no file.
        environ: environment variables (pass ``os.environ`` explicitly); only names
            that start with ``RELAY_`` are looked at.
        overrides: dotted keys from command-line flags, such as
            ``{"upstream.urls": ["http://a"], "limits.egress": "10MB"}``; strings for
            keys that are not strings are read in the text form.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: the file is missing, unreadable or not TOML; or a section, key or
            value is unknown or malformed; or a rule across keys is broken (replica
            without a parent). The message names the key, the value and the source.
    """
    values: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    sources: dict[str, str] = {}

    def put(section: str, key: str, value: Any, source: str, *, text: bool) -> None:
        if section not in _SECTIONS:
            raise ConfigError(
                f"{section}.{key}" if key else section,
                _shown(section, key, value),
                source,
                f"unknown section (known: {', '.join(_SECTIONS)})",
            )
        values[section][key] = _parse(section, key, value, source, text=text)
        sources[f"{section}.{key}"] = source

    source = DEFAULTS
    if path is not None:
        source = str(path)
        for section, table in _read_toml(path).items():
            if section not in _SECTIONS:
                raise ConfigError(
                    section, None, source, f"unknown section (known: {', '.join(_SECTIONS)})"
                )
            if not isinstance(table, dict):
                raise ConfigError(section, table, source, f"expected a table [{section}]")
            for key, value in table.items():
                put(section, key, value, source, text=False)

    for name, value in sorted((environ or {}).items()):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        if "__" not in rest:
            _check_single_underscore(name, rest, value)
            continue
        section, _, key = rest.partition("__")
        put(section.lower(), key.lower(), value, name, text=True)

    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        put(section, key, value, COMMAND_LINE, text=isinstance(value, str))

    built = {s: _SECTIONS[s](**v) for s, v in values.items()}
    config = Config(**built, source=source, sources=MappingProxyType(sources))
    _check_rules(config)
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    """Return the JSON form of ``config``: one object per section (secrets included).

    What a relay's worker processes receive from the leader over its private socket
    (:func:`config_from_dict` reads it back).
    """
    return {
        "source": config.source,
        "sections": {name: to_dict(getattr(config, name)) for name in _SECTIONS},
    }


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Read back the JSON form :func:`config_to_dict` gives.

    Raises:
        ConfigError: a section or key is unknown or malformed.
    """
    source = str(data.get("source", DEFAULTS))
    sections = data.get("sections")
    if not isinstance(sections, Mapping):
        raise ConfigError("sections", None, source, "expected an object of sections")
    built: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        try:
            built[name] = from_dict(sections.get(name, {}), cls())
        except ValueError as e:
            raise ConfigError(name, None, source, str(e)) from None
    return Config(**built, source=source)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("--config", str(path), str(path), "no such file") from None
    except OSError as e:
        raise ConfigError("--config", str(path), str(path), f"cannot read: {e.strerror}") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        reason = f"not UTF-8 text (byte {e.start})"
        raise ConfigError("--config", None, str(path), reason) from None
    except tomllib.TOMLDecodeError as e:
        # tomllib's message ends with "(at line L, column C)".
        raise ConfigError("--config", None, str(path), f"not valid TOML: {e}") from None


def _check_single_underscore(name: str, rest: str, value: str) -> None:
    # RELAY_LIMITS_EGRESS is a typo for RELAY_LIMITS__EGRESS: ignoring it would leave the
    # operator believing the limit is set.
    if name in _NOT_CONFIG_VARIABLES:
        return
    low = rest.lower()
    for section, cls in _SECTIONS.items():
        key = low.removeprefix(f"{section}_")
        if key != low and key in keys_of(cls):
            raise ConfigError(
                f"{section}.{key}",
                _shown(section, key, value),
                name,
                f"not read: write {ENV_PREFIX}{section.upper()}__{key.upper()}"
                " (two underscores between section and key)",
            )


def _is_secret(section: str, key: str) -> bool:
    if key.endswith("_file"):
        return False
    return section == "admin" or any(word in key for word in _SECRET_WORDS)


def _shown(section: str, key: str, value: Any) -> Any:
    return _HIDDEN if _is_secret(section, key) else value


def _parse(section: str, key: str, value: Any, source: str, *, text: bool) -> Any:
    cls = _SECTIONS[section]
    dotted = f"{section}.{key}"
    parser = parser_of(cls, key)
    if parser is None:
        raise ConfigError(
            dotted,
            _shown(section, key, value),
            source,
            f"unknown key (known in [{section}]: {', '.join(keys_of(cls))})",
        )
    try:
        return parser(value, text)
    except ValueError as e:
        raise ConfigError(dotted, _shown(section, key, value), source, str(e)) from None


def _check_rules(config: Config) -> None:
    if config.policy.mode == "replica" and not config.policy.parent_url:
        raise ConfigError(
            "policy.parent_url",
            "",
            config.source_of("policy.mode"),
            'is required when policy.mode = "replica"',
        )
    allowed = deferral_choices(config.policy.deferral_days)
    if config.agent.defer_days not in allowed:
        raise ConfigError(
            "agent.defer_days",
            config.agent.defer_days,
            config.source_of("agent.defer_days"),
            f"expected one of {', '.join(map(str, allowed))} (0 or one of policy.deferral_days)",
        )


__all__ = [
    "DAYS",
    "ENV_PREFIX",
    "MAX_WORKERS",
    "AdminSettings",
    "AgentSettings",
    "Config",
    "DeltaSettings",
    "EventsSettings",
    "PolicySettings",
    "RelaySettings",
    "ScheduleEntry",
    "StoreSettings",
    "SyncSettings",
    "UpstreamSettings",
    "config_from_dict",
    "config_to_dict",
    "default_config",
    "load_config",
]
