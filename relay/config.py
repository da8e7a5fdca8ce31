"""Configuration: one TOML file, environment overrides, flags on top.

Rules (DESIGN §7, STYLE 16-17):

* Layers, lowest first: built-in defaults < the TOML file named by ``--config`` <
  ``RELAY_<SECTION>__<KEY>`` environment variables < command-line flags (passed in
  as a mapping of dotted keys).
* ``environ`` is a parameter; nothing here reads ``os.environ`` or any file on its
  own, and nothing is read at import time.
* Everything is validated once into frozen dataclasses, one per section, with
  units in comments. An unknown section or key, or a bad value, raises
  :class:`relay.errors.ConfigError` naming the key, the value and the file or
  variable it came from.
* Sizes: bytes or ``KB``/``MB``/``GB``/``KiB``/``MiB``/``GiB``; durations: seconds or
  ``s``/``m``/``h``/``d``; rates: sizes per second.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from relay._internal.units import parse_duration, parse_rate, parse_size
from relay.errors import ConfigError

ENV_PREFIX = "RELAY_"
DELTA_FORMATS = ("zstd", "bsdiff4")
KINDS = ("software", "content", "config")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


# -- sections -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """``[relay]``: the process itself."""

    listen: str = "127.0.0.1:8080"  # HOST:PORT
    data_dir: Path = Path("relay-data")  # metadata/, blobs/, deltas/, state/ live here
    log_format: str = "text"  # text | json
    access_log: bool = True  # one line per request
    public_url: str = ""  # URL advertised to agents; "" = http://<listen>/

    @property
    def metadata_dir(self) -> Path:
        """Verified metadata, byte-exact."""
        return self.data_dir / "metadata"

    @property
    def blobs_dir(self) -> Path:
        """The content-addressed blob store."""
        return self.data_dir / "blobs"

    @property
    def deltas_dir(self) -> Path:
        """Computed patches."""
        return self.data_dir / "deltas"

    @property
    def state_dir(self) -> Path:
        """diskcache: agents, approvals, settings, audit log."""
        return self.data_dir / "state"


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """``[upstream]``: where metadata and targets come from."""

    urls: tuple[str, ...] = ()  # tried in order
    trusted_root: Path = Path()  # the pinned root.json
    connect_timeout: float = 10.0  # seconds
    read_timeout: float = 30.0  # seconds: the longest gap between bytes
    retries: int = 3  # extra attempts per upstream
    retry_backoff: float = 0.5  # seconds, doubling


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """``[sync]``: metadata polling and prefetch."""

    interval: float = 300.0  # seconds
    jitter: float = 30.0  # seconds, added at random to each interval
    prefetch: str = "policy"  # policy (what would be offered) | all | none


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """``[store]``: the blob store."""

    max_bytes: int = 0  # bytes; 0 = unlimited
    keep_versions: int = 3  # newest versions of each product pinned
    scrub_interval: float = 86400.0  # seconds; 0 = off
    retry_after: float = 30.0  # seconds, told to clients when the store is full


@dataclass(frozen=True, slots=True)
class ScheduleEntry:
    """A time-of-day window with its own rates (bytes/s; ``None`` = the base rate)."""

    start: str  # HH:MM
    end: str  # HH:MM (before start: the window wraps midnight)
    days: tuple[str, ...] = ()  # mon..sun; empty = every day
    upstream: int | None = None
    egress: int | None = None
    per_agent: int | None = None


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    """``[limits]``: bandwidth and concurrency."""

    upstream: int = 0  # bytes/s, all upstream fetches together; 0 = unlimited
    egress: int = 0  # bytes/s, all responses together
    per_agent: int = 0  # bytes/s per agent
    max_transfers: int = 1024  # concurrent blob responses; 0 = unlimited
    max_transfers_per_agent: int = 8
    chunk_bytes: int = 64 * 1024  # bytes per paced write
    retry_after: float = 5.0  # seconds, told to clients past the limits
    schedule: tuple[ScheduleEntry, ...] = ()


@dataclass(frozen=True, slots=True)
class DeltaSettings:
    """``[delta]``: relay-computed patches."""

    enabled: bool = True
    # Preference order; bsdiff4 first from benchmarks/RESULTS.md (zstd's median patch is
    # 1.42x bsdiff4's, over the 1.25x the rule allows, although it diffs 80x faster).
    formats: tuple[str, ...] = ("bsdiff4", "zstd")
    bases: int = 3  # older versions diffed against each new one
    workers: int = 1  # diff processes
    max_memory: int = 2 * 1024**3  # bytes a diff may need
    max_seconds: float = 300.0  # a longer diff is killed
    max_ratio: float = 0.5  # a patch larger than this share of the target is dropped
    zstd_level: int = 3


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """``[policy]``: approvals and rollout defaults."""

    mode: str = "autonomous"  # autonomous | replica
    parent_url: str = ""  # replica: the parent relay
    parent_token_file: Path = Path()  # replica: bearer token for the parent's admin API
    auto_approve_critical: bool = True
    install_undefined: Mapping[str, bool] = field(
        default_factory=lambda: {"software": False, "content": True, "config": False}
    )
    beta_groups: tuple[str, ...] = ()
    rollout_mode: str = "forced"  # forced | on-demand
    deferral_days: tuple[int, ...] = (1, 3, 7)
    relays_only: bool = False
    poll_seconds: int = 3600  # told to agents
    origin_url: str = ""  # told to agents unless relays_only; "" = the first upstream
    relays: tuple[str, ...] = ()  # more relays advertised to agents


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """``[admin]``: the admin API (off without a token)."""

    token_file: Path = Path()
    token: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """``[agent]``: the reference agent."""

    id: str = ""
    group: str = "default"
    relays: tuple[str, ...] = ()
    origin: str = ""
    relays_only: bool = False
    trusted_root: Path = Path()
    state_dir: Path = Path("agent-state")
    install_dir: Path = Path("agent-install")
    install_command: str = ""
    install_timeout: float = 300.0  # seconds
    defer_days: int = 0  # 0, 1, 3 or 7
    accept_delta: tuple[str, ...] = ("zstd", "bsdiff4")
    poll_jitter: float = 60.0  # seconds
    request_timeout: float = 30.0  # seconds
    actions: Mapping[str, str] = field(default_factory=dict)  # action name -> command


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    relay: RelaySettings = field(default_factory=RelaySettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    delta: DeltaSettings = field(default_factory=DeltaSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    source: str = "built-in defaults"
    # Where each key that is not a default came from: the file, a variable, the command line.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def source_of(self, key: str) -> str:
        """Where ``key`` (``section.name``) got its value, for error messages."""
        return self.sources.get(key, self.source)

    def admin_token(self) -> str:
        """The admin bearer token ("" = admin API off).

        Raises:
            ConfigError: ``admin.token_file`` is set but cannot be read.
        """
        if self.admin.token:
            return self.admin.token
        if str(self.admin.token_file) in ("", "."):
            return ""
        try:
            return self.admin.token_file.read_text().strip()
        except OSError as e:
            raise ConfigError(
                "admin.token_file",
                str(self.admin.token_file),
                self.source_of("admin.token_file"),
                f"cannot be read: {e.strerror}",
            ) from e


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

Parser = Callable[[Any, bool], Any]  # (value, from_env) -> typed value


def _bool(value: Any, from_env: bool) -> bool:
    if isinstance(value, bool):
        return value
    if from_env and isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
    raise ValueError("expected true or false")


def _int(minimum: int = 0, maximum: int | None = None) -> Parser:
    def parse(value: Any, from_env: bool) -> int:
        if from_env and isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be {bound}")
        return value

    return parse


def _float_between(low: float, high: float) -> Parser:
    def parse(value: Any, from_env: bool) -> float:
        if from_env and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError("expected a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("expected a number")
        if not low < value <= high:
            raise ValueError(f"must be > {low} and <= {high}")
        return float(value)

    return parse


def _size(value: Any, _env: bool) -> int:
    return parse_size(value)


def _rate(value: Any, _env: bool) -> int:
    return parse_rate(value)


def _duration(value: Any, _env: bool) -> float:
    return parse_duration(value)


def _str(value: Any, _env: bool) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _path(value: Any, _env: bool) -> Path:
    if not isinstance(value, str | Path):
        raise ValueError("expected a path")
    return Path(value)


def _choice(*choices: str) -> Parser:
    def parse(value: Any, _env: bool) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return str(value)

    return parse


def _url(value: Any, _env: bool) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a URL")
    if value == "":
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("expected an http:// or https:// URL")
    return value


def _list(item: Parser) -> Parser:
    def parse(value: Any, from_env: bool) -> tuple[Any, ...]:
        if from_env and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ValueError("expected a list")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v, from_env))
            except ValueError as e:
                raise ValueError(f"item {i} ({v!r}): {e}") from None
        return tuple(out)

    return parse


def _listen(value: Any, _env: bool) -> str:
    if not isinstance(value, str):
        raise ValueError("expected HOST:PORT")
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT with a port from 0 to 65535")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError("an IPv6 host is written [::1]:8080")
    return value


def _install_undefined(value: Any, from_env: bool) -> Mapping[str, bool]:
    if from_env and isinstance(value, str):
        kinds = {k.strip() for k in value.split(",") if k.strip()}
        unknown = kinds - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kind {min(unknown)!r} (use {', '.join(KINDS)})")
        return {k: k in kinds for k in KINDS}
    if not isinstance(value, dict):
        raise ValueError("expected a table such as {software = false, content = true}")
    out = dict(PolicySettings().install_undefined)
    for kind, on in value.items():
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} (use {', '.join(KINDS)})")
        if not isinstance(on, bool):
            raise ValueError(f"{kind}: expected true or false")
        out[kind] = on
    return out


def _actions(value: Any, from_env: bool) -> Mapping[str, str]:
    if from_env:
        raise ValueError("a table: set it in the configuration file")
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("expected a table of action name = command line")
    return dict(value)


def _hhmm(value: Any) -> str:
    if not isinstance(value, str) or not _HHMM.match(value):
        raise ValueError("expected HH:MM (24-hour)")
    return value


def _schedule(value: Any, from_env: bool) -> tuple[ScheduleEntry, ...]:
    if from_env:
        raise ValueError("an array of tables: set it in the configuration file")
    if not isinstance(value, list):
        raise ValueError("expected an array of tables [[limits.schedule]]")
    entries = []
    for i, raw in enumerate(value):
        if not isinstance(raw, dict):
            raise ValueError(f"entry {i}: expected a table")
        unknown = set(raw) - {"start", "end", "days", "upstream", "egress", "per_agent"}
        if unknown:
            raise ValueError(f"entry {i}: unknown key {min(unknown)!r}")
        try:
            days = _days(raw.get("days", ()))
            rates = {k: parse_rate(raw[k]) for k in ("upstream", "egress", "per_agent") if k in raw}
            entries.append(
                ScheduleEntry(
                    start=_hhmm(raw.get("start")), end=_hhmm(raw.get("end")), days=days, **rates
                )
            )
        except ValueError as e:
            raise ValueError(f"entry {i}: {e}") from None
    return tuple(entries)


def _days(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError("days: expected a list such as ['mon', 'tue']")
    bad = [d for d in value if d not in DAYS]
    if bad:
        raise ValueError(f"unknown day {bad[0]!r} (use {', '.join(DAYS)})")
    return tuple(value)


def _defer(value: Any, from_env: bool) -> int:
    n = _int(0)(value, from_env)
    if n not in (0, 1, 3, 7):
        raise ValueError("expected 0, 1, 3 or 7")
    return int(n)


_FIELDS: dict[str, dict[str, Parser]] = {
    "relay": {
        "listen": _listen,
        "data_dir": _path,
        "log_format": _choice("text", "json"),
        "access_log": _bool,
        "public_url": _url,
    },
    "upstream": {
        "urls": _list(_url),
        "trusted_root": _path,
        "connect_timeout": _duration,
        "read_timeout": _duration,
        "retries": _int(0, 100),
        "retry_backoff": _duration,
    },
    "sync": {
        "interval": _duration,
        "jitter": _duration,
        "prefetch": _choice("all", "none", "policy"),
    },
    "store": {
        "max_bytes": _size,
        "keep_versions": _int(0),
        "scrub_interval": _duration,
        "retry_after": _duration,
    },
    "limits": {
        "upstream": _rate,
        "egress": _rate,
        "per_agent": _rate,
        "max_transfers": _int(0),
        "max_transfers_per_agent": _int(0),
        "chunk_bytes": _size,
        "retry_after": _duration,
        "schedule": _schedule,
    },
    "delta": {
        "enabled": _bool,
        "formats": _list(_choice(*DELTA_FORMATS)),
        "bases": _int(0, 64),
        "workers": _int(1, 64),
        "max_memory": _size,
        "max_seconds": _duration,
        "max_ratio": _float_between(0.0, 1.0),
        "zstd_level": _int(1, 22),
    },
    "policy": {
        "mode": _choice("autonomous", "replica"),
        "parent_url": _url,
        "parent_token_file": _path,
        "auto_approve_critical": _bool,
        "install_undefined": _install_undefined,
        "beta_groups": _list(_str),
        "rollout_mode": _choice("forced", "on-demand"),
        "deferral_days": _list(_int(1, 365)),
        "relays_only": _bool,
        "poll_seconds": _int(1),
        "origin_url": _url,
        "relays": _list(_url),
    },
    "admin": {"token_file": _path, "token": _str},
    "agent": {
        "id": _str,
        "group": _str,
        "relays": _list(_url),
        "origin": _url,
        "relays_only": _bool,
        "trusted_root": _path,
        "state_dir": _path,
        "install_dir": _path,
        "install_command": _str,
        "install_timeout": _duration,
        "defer_days": _defer,
        "accept_delta": _list(_choice(*DELTA_FORMATS)),
        "poll_jitter": _duration,
        "request_timeout": _duration,
        "actions": _actions,
    },
}


# -- loading --------------------------------------------------------------------------


def default_config() -> Config:
    """The built-in defaults."""
    return Config()


def _shown(key: str, value: Any) -> Any:
    return "<hidden>" if key == "admin.token" else value


def load_config(
    path: Path | None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Load and validate the configuration.

    Args:
        path: the TOML file given by ``--config`` (``None``: defaults only).
        environ: environment variables; only ``RELAY_<SECTION>__<KEY>`` are read.
        overrides: dotted keys from command-line flags (``{"upstream.urls": [...]}``).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: the file is missing or not TOML, or a section, key or value is
            unknown or malformed; the message names the key, the value and the source.
    """
    values: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    sources: dict[str, str] = {}
    source = "built-in defaults"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("--config", str(path), str(path), "no such file") from None
        except OSError as e:
            raise ConfigError(
                "--config", str(path), str(path), f"cannot read: {e.strerror}"
            ) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError("--config", None, str(path), f"not valid TOML: {e}") from None
        for section, table in raw.items():
            if section not in _SECTIONS:
                raise ConfigError(
                    section,
                    None,
                    str(path),
                    f"unknown section (known: {', '.join(_SECTIONS)})",
                )
            if not isinstance(table, dict):
                raise ConfigError(section, table, str(path), "expected a table [section]")
            for key, value in table.items():
                values[section][key] = _parse(section, key, value, str(path), from_env=False)
                sources[f"{section}.{key}"] = str(path)
    for name, value in sorted((environ or {}).items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        section, key = section.lower(), key.lower()
        if section not in _SECTIONS:
            raise ConfigError(
                f"{section}.{key}",
                value,
                name,
                f"unknown section (known: {', '.join(_SECTIONS)})",
            )
        values[section][key] = _parse(section, key, value, name, from_env=True)
        sources[f"{section}.{key}"] = name
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in _SECTIONS:
            raise ConfigError(dotted, value, "command line", "unknown section")
        values[section][key] = _parse(section, key, value, "command line", from_env=False)
        sources[dotted] = "command line"
    built = {s: _SECTIONS[s](**v) for s, v in values.items()}
    config = Config(**built, source=source, sources=sources)
    _check_rules(config)
    return config


def _parse(section: str, key: str, value: Any, source: str, *, from_env: bool) -> Any:
    fields = _FIELDS[section]
    dotted = f"{section}.{key}"
    parser = fields.get(key)
    if parser is None:
        raise ConfigError(
            dotted,
            _shown(dotted, value),
            source,
            f"unknown key (known in [{section}]: {', '.join(fields)})",
        )
    try:
        return parser(value, from_env)
    except ValueError as e:
        raise ConfigError(dotted, _shown(dotted, value), source, str(e)) from None


def _check_rules(config: Config) -> None:
    if config.policy.mode == "replica" and not config.policy.parent_url:
        raise ConfigError(
            "policy.parent_url",
            "",
            config.source_of("policy.mode"),
            'is required when policy.mode = "replica"',
        )


def with_overrides(config: Config, section: str, **changes: Any) -> Config:
    """Return ``config`` with fields of one section replaced (already-typed values)."""
    current = getattr(config, section)
    return dataclasses.replace(config, **{section: dataclasses.replace(current, **changes)})
