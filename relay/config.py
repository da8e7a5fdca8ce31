"""Configuration: one TOML file, environment overrides, flags on top.

Rules (DESIGN §7, STYLE 16-17):

* Layers, lowest first: built-in defaults < the TOML file named by ``--config`` <
  ``RELAY_<SECTION>__<KEY>`` environment variables < command-line flags (a mapping of
  dotted keys). A higher layer replaces a key whole: lists and tables are not merged
  with the layer below, except that kinds missing from ``policy.install_undefined``
  keep their defaults.
* ``environ`` is a parameter: nothing here reads ``os.environ``, and nothing is read
  at import time. The only file read is the one ``path`` names (and
  ``admin.token_file``, when :meth:`Config.admin_token` is called).
* Everything is validated once, into frozen dataclasses (one per section, units in
  comments); the tables inside them are read-only mappings.
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
* Secrets (``admin.token``, and any key named like a token, secret or password) never
  appear in an error message or a ``repr``.
* Sizes: bytes, or ``KB``/``MB``/``GB`` (powers of 1000) or ``KiB``/``MiB``/``GiB``
  (powers of 1024); durations: seconds, or ``s``/``m``/``h``/``d``; rates: sizes per
  second. ``inf`` and ``nan`` are refused everywhere.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

from relay.core.rates import ScheduleEntry
from relay.core.units import parse_duration, parse_rate, parse_size
from relay.errors import ConfigError

ENV_PREFIX = "RELAY_"
COMMAND_LINE = "command line"
DEFAULTS = "built-in defaults"
DELTA_FORMATS = ("zstd", "bsdiff4")
KINDS = ("software", "content", "config")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DEFER_DAYS = (0, 1, 3, 7)

LogFormat = Literal["text", "json"]
PrefetchMode = Literal["policy", "all", "none"]
PolicyMode = Literal["autonomous", "replica"]
RolloutName = Literal["forced", "on-demand"]
DeltaFormatName = Literal["zstd", "bsdiff4"]

# Variables that start like a configuration variable but belong to another command:
# `relay admin` (the client) reads its bearer token from RELAY_ADMIN_TOKEN.
_NOT_CONFIG_VARIABLES = frozenset({"RELAY_ADMIN_TOKEN"})
_SECRET_WORDS = ("token", "secret", "password")
_HIDDEN = "<hidden>"


def _install_undefined_defaults() -> Mapping[str, bool]:
    return MappingProxyType({"software": False, "content": True, "config": False})


def _no_actions() -> Mapping[str, str]:
    return MappingProxyType({})


# -- sections -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """``[relay]``: the process itself."""

    listen: str = "127.0.0.1:8080"  # HOST:PORT; [::1]:8080 for IPv6; :8080 = all interfaces
    data_dir: Path = Path("relay-data")  # relative to the current directory
    log_format: LogFormat = "text"  # text | json (one object per line)
    access_log: bool = True  # one line per request
    public_url: str = ""  # URL advertised to agents; "" = derived from listen

    @property
    def metadata_dir(self) -> Path:
        """Verified TUF metadata, byte-exact: ``<data_dir>/metadata``."""
        return self.data_dir / "metadata"

    @property
    def blobs_dir(self) -> Path:
        """The content-addressed blob store: ``<data_dir>/blobs``."""
        return self.data_dir / "blobs"

    @property
    def deltas_dir(self) -> Path:
        """Computed patches: ``<data_dir>/deltas``."""
        return self.data_dir / "deltas"

    @property
    def state_dir(self) -> Path:
        """The state database (approvals, agents, audit log, counters): ``<data_dir>/state``."""
        return self.data_dir / "state"


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """``[upstream]``: where metadata and targets come from."""

    urls: tuple[str, ...] = ()  # http(s) base URLs, tried in order
    trusted_root: Path = Path()  # the pinned root.json; Path() = not set
    connect_timeout: float = 10.0  # seconds, > 0
    read_timeout: float = 30.0  # seconds, > 0: the longest gap between bytes
    retries: int = 3  # extra attempts per upstream
    retry_backoff: float = 0.5  # seconds before the first retry, doubling


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """``[sync]``: metadata polling and prefetch."""

    interval: float = 300.0  # seconds between polls, > 0
    jitter: float = 30.0  # seconds, at most, added at random to each interval
    prefetch: PrefetchMode = "policy"  # policy: what some group would be offered | all | none


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """``[store]``: the blob store."""

    max_bytes: int = 0  # bytes; 0 = unlimited
    keep_versions: int = 3  # newest versions of each product pinned
    scrub_interval: float = 86400.0  # seconds between re-hashes of every blob; 0 = off
    retry_after: float = 30.0  # seconds, told to clients when the store is full


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    """``[limits]``: bandwidth and concurrency."""

    upstream: int = 0  # bytes/s, all upstream fetches together; 0 = unlimited
    egress: int = 0  # bytes/s, all responses together; 0 = unlimited
    per_agent: int = 0  # bytes/s per agent; 0 = unlimited
    max_transfers: int = 1024  # concurrent blob responses; 0 = unlimited
    max_transfers_per_agent: int = 8  # concurrent blob responses per agent; 0 = unlimited
    chunk_bytes: int = 64 * 1024  # bytes per paced write, >= 1
    retry_after: float = 5.0  # seconds, told to clients past the limits
    schedule: tuple[ScheduleEntry, ...] = ()


@dataclass(frozen=True, slots=True)
class DeltaSettings:
    """``[delta]``: relay-computed patches."""

    enabled: bool = True
    # Preference order, no repeats; bsdiff4 first from benchmarks/RESULTS.md (zstd's
    # median patch is 1.42x bsdiff4's, over the 1.25x the rule allows).
    formats: tuple[DeltaFormatName, ...] = ("bsdiff4", "zstd")
    bases: int = 3  # older versions diffed against each new one
    workers: int = 1  # diff processes
    max_memory: int = 2 * 1024**3  # bytes a diff may need
    max_seconds: float = 300.0  # seconds, > 0: a longer diff is killed
    max_ratio: float = 0.5  # 0 < r <= 1: a patch over this share of the target is dropped
    zstd_level: int = 3  # 1..22; 3, not 19: benchmarks/RESULTS.md (19 took 67 s on 26 MB)


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """``[policy]``: approvals and rollout defaults."""

    mode: PolicyMode = "autonomous"  # replica: approvals and settings from parent_url
    parent_url: str = ""  # replica: the parent relay's base URL
    parent_token_file: Path = Path()  # replica: bearer token for the parent's admin API
    auto_approve_critical: bool = True
    install_undefined: Mapping[str, bool] = field(default_factory=_install_undefined_defaults)
    beta_groups: tuple[str, ...] = ()
    rollout_mode: RolloutName = "forced"
    deferral_days: tuple[int, ...] = (1, 3, 7)  # days an agent may defer; at least one
    relays_only: bool = False  # agents never fall back to the origin
    poll_seconds: int = 3600  # seconds between check-ins, told to agents
    origin_url: str = ""  # told to agents unless relays_only; "" = the first upstream URL
    relays: tuple[str, ...] = ()  # more relays advertised to agents, besides this one


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """``[admin]``: the admin API (off when there is no token)."""

    token_file: Path = Path()  # file holding the bearer token; Path() = not set
    token: str = field(default="", repr=False)  # the token itself (prefer token_file)


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """``[agent]``: the reference agent."""

    id: str = ""  # "" = the host name
    group: str = "default"
    relays: tuple[str, ...] = ()  # relay base URLs, in order
    origin: str = ""  # origin base URL, used only when relays_only is false
    relays_only: bool = False
    trusted_root: Path = Path()  # the root.json the agent ships; Path() = not set
    state_dir: Path = Path("agent-state")  # TUF metadata and agent state
    install_dir: Path = Path("agent-install")
    install_command: str = ""  # a command line run after placing a file; "" = none
    install_timeout: float = 300.0  # seconds, > 0
    defer_days: int = 0  # 0, 1, 3 or 7: the deferral chosen for on-demand updates
    accept_delta: tuple[DeltaFormatName, ...] = ("zstd", "bsdiff4")
    poll_jitter: float = 60.0  # seconds, at most, added at random to each poll
    request_timeout: float = 30.0  # seconds, > 0
    actions: Mapping[str, str] = field(default_factory=_no_actions)  # name -> command line


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration, validated."""

    relay: RelaySettings = field(default_factory=RelaySettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    delta: DeltaSettings = field(default_factory=DeltaSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
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


_SECTIONS: dict[str, type] = {
    "relay": RelaySettings,
    "upstream": UpstreamSettings,
    "sync": SyncSettings,
    "store": StoreSettings,
    "limits": LimitsSettings,
    "delta": DeltaSettings,
    "policy": PolicySettings,
    "admin": AdminSettings,
    "agent": AgentSettings,
}


# -- value parsers -----------------------------------------------------------------
# Each takes (value, text): ``text`` is true when a string is in the text form of an
# environment variable or a command-line flag. Each returns the typed value or raises
# ValueError with the reason; _parse turns that into a ConfigError.

Parser = Callable[[Any, bool], Any]

_INT = re.compile(r"\s*-?[0-9]+\s*")
_HHMM = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")
# HOST:PORT, or [IPv6]:PORT; an empty host listens on every interface.
_LISTEN = re.compile(r"(?:\[(?P<v6>[^\[\]]+)\]|(?P<host>[A-Za-z0-9._-]*)):(?P<port>[0-9]{1,5})")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _finite(value: Any) -> Any:
    # TOML has inf and nan; neither is a size, a rate or a duration.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def _bool(value: Any, text: bool) -> bool:
    if isinstance(value, bool):
        return value
    if text and isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE)}")
    raise ValueError("expected true or false")


def _int(minimum: int = 0, maximum: int | None = None) -> Parser:
    def parse(value: Any, text: bool) -> int:
        if text and isinstance(value, str) and _INT.fullmatch(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be {bound}")
        return value

    return parse


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


def _str(value: Any, _text: bool) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _path(value: Any, _text: bool) -> Path:
    if not isinstance(value, str | Path):
        raise ValueError("expected a path (a string)")
    if "\0" in str(value):
        raise ValueError("a path cannot contain a NUL character")
    return Path(value)


def _choice(*choices: str) -> Parser:
    def parse(value: Any, text: bool) -> str:
        if text and isinstance(value, str):
            value = value.strip()
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


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


def _list(item: Parser, *, unique: bool = False, non_empty: bool = False) -> Parser:
    def parse(value: Any, text: bool) -> tuple[Any, ...]:
        if text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            form = "a comma-separated list" if text else "a list such as [...]"
            raise ValueError(f"expected {form}")
        out: list[Any] = []
        for i, v in enumerate(value):
            try:
                parsed = item(v, text)
            except ValueError as e:
                raise ValueError(f"item {i} ({v!r}): {e}") from None
            if unique and parsed in out:
                raise ValueError(f"item {i} ({v!r}) is repeated")
            out.append(parsed)
        if non_empty and not out:
            raise ValueError("needs at least one item")
        return tuple(out)

    return parse


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


def _install_undefined(value: Any, text: bool) -> Mapping[str, bool]:
    if text and isinstance(value, str):
        # The text form lists the kinds that are on; the others are off.
        on = {k.strip() for k in value.split(",") if k.strip()}
        unknown = on - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kind {min(unknown)!r} (use {', '.join(KINDS)})")
        return MappingProxyType({k: k in on for k in KINDS})
    if not isinstance(value, Mapping):
        raise ValueError("expected a table such as {software = false, content = true}")
    out = dict(_install_undefined_defaults())
    for kind, on in value.items():
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} (use {', '.join(KINDS)})")
        if not isinstance(on, bool):
            raise ValueError(f"{kind}: expected true or false")
        out[kind] = on
    return MappingProxyType(out)


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


def _defer(value: Any, text: bool) -> int:
    n: int = _int(0)(value, text)
    if n not in DEFER_DAYS:
        raise ValueError(f"expected one of {', '.join(map(str, DEFER_DAYS))}")
    return n


_FIELDS: dict[str, dict[str, Parser]] = {
    "relay": {
        "listen": _listen,
        "data_dir": _path,
        "log_format": _choice("text", "json"),
        "access_log": _bool,
        "public_url": _optional_url,
    },
    "upstream": {
        "urls": _list(_url),
        "trusted_root": _path,
        "connect_timeout": _duration(positive=True),
        "read_timeout": _duration(positive=True),
        "retries": _int(0, 100),
        "retry_backoff": _duration(),
    },
    "sync": {
        "interval": _duration(positive=True),
        "jitter": _duration(),
        "prefetch": _choice("policy", "all", "none"),
    },
    "store": {
        "max_bytes": _size(),
        "keep_versions": _int(0),
        "scrub_interval": _duration(),
        "retry_after": _duration(),
    },
    "limits": {
        "upstream": _rate,
        "egress": _rate,
        "per_agent": _rate,
        "max_transfers": _int(0),
        "max_transfers_per_agent": _int(0),
        "chunk_bytes": _size(1),
        "retry_after": _duration(),
        "schedule": _schedule,
    },
    "delta": {
        "enabled": _bool,
        "formats": _list(_choice(*DELTA_FORMATS), unique=True, non_empty=True),
        "bases": _int(0, 64),
        "workers": _int(1, 64),
        "max_memory": _size(),
        "max_seconds": _duration(positive=True),
        "max_ratio": _ratio,
        "zstd_level": _int(1, 22),
    },
    "policy": {
        "mode": _choice("autonomous", "replica"),
        "parent_url": _optional_url,
        "parent_token_file": _path,
        "auto_approve_critical": _bool,
        "install_undefined": _install_undefined,
        "beta_groups": _list(_str, unique=True),
        "rollout_mode": _choice("forced", "on-demand"),
        "deferral_days": _list(_int(1, 365), unique=True, non_empty=True),
        "relays_only": _bool,
        "poll_seconds": _int(1),
        "origin_url": _optional_url,
        "relays": _list(_url),
    },
    "admin": {"token_file": _path, "token": _str},
    "agent": {
        "id": _str,
        "group": _str,
        "relays": _list(_url),
        "origin": _optional_url,
        "relays_only": _bool,
        "trusted_root": _path,
        "state_dir": _path,
        "install_dir": _path,
        "install_command": _str,
        "install_timeout": _duration(positive=True),
        "defer_days": _defer,
        "accept_delta": _list(_choice(*DELTA_FORMATS), unique=True),
        "poll_jitter": _duration(),
        "request_timeout": _duration(positive=True),
        "actions": _actions,
    },
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
    for section, fields in _FIELDS.items():
        key = low.removeprefix(f"{section}_")
        if key != low and key in fields:
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
    fields = _FIELDS[section]
    dotted = f"{section}.{key}"
    parser = fields.get(key)
    if parser is None:
        raise ConfigError(
            dotted,
            _shown(section, key, value),
            source,
            f"unknown key (known in [{section}]: {', '.join(fields)})",
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


__all__ = [
    "DAYS",
    "DEFER_DAYS",
    "DELTA_FORMATS",
    "ENV_PREFIX",
    "KINDS",
    "AdminSettings",
    "AgentSettings",
    "Config",
    "DeltaSettings",
    "LimitsSettings",
    "PolicySettings",
    "RelaySettings",
    "ScheduleEntry",
    "StoreSettings",
    "SyncSettings",
    "UpstreamSettings",
    "default_config",
    "load_config",
]
