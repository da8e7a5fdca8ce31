"""Configuration: defaults, layers, text forms, and errors naming key, value and source."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from relay.config import Config, PolicySettings, default_config, load_config
from relay.core.policy import RolloutMode, Settings
from relay.core.schema import doc_of
from relay.errors import ConfigError
from relay.fleet.approvals import settings_from_config

EXAMPLE = Path(__file__).parent.parent / "config" / "relay.example.toml"
SECTIONS = (
    "relay",
    "upstream",
    "sync",
    "store",
    "limits",
    "delta",
    "policy",
    "events",
    "admin",
    "agent",
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text + "\n", encoding="utf-8")
    return path


def get(config: Config, dotted: str) -> object:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


# -- defaults and the example file ----------------------------------------------------


def test_example_file_loads_to_exactly_the_defaults():
    loaded = load_config(EXAMPLE)
    assert loaded.source == str(EXAMPLE)
    assert dataclasses.replace(loaded, source="built-in defaults") == default_config()


def test_example_file_sets_every_key_and_nothing_else():
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert tuple(raw) == SECTIONS
    for section in SECTIONS:
        fields = [f.name for f in dataclasses.fields(getattr(default_config(), section))]
        assert sorted(raw[section]) == sorted(fields), section


def test_example_file_comments_every_key():
    # A key added to the file without a word on its unit or meaning fails here.
    keys = 0
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.startswith(("#", "[", " ")) or "=" not in line:
            continue
        keys += 1
        assert len(line.partition(" # ")[2].strip()) > 5, line
    fields = sum(len(dataclasses.fields(getattr(default_config(), s))) for s in SECTIONS)
    assert keys == fields - 1  # agent.actions is the [agent.actions] header


def test_example_file_comments_are_the_declared_docs():
    # Each key's comment starts with the doc its field declares: one text, kept in step.
    section = ""
    checked = 0
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.startswith("["):
            section = line.split("]")[0].strip("[")
            if "." not in section:
                continue
            section, _, key = section.partition(".")  # [agent.actions]
        elif line.startswith(("#", " ")) or "=" not in line:
            continue
        else:
            key = line.partition("=")[0].strip()
        comment = line.partition(" # ")[2].strip()
        cls = type(getattr(default_config(), section))
        assert comment.startswith(doc_of(cls, key)), (section, key)
        checked += 1
    assert checked == sum(len(dataclasses.fields(getattr(default_config(), s))) for s in SECTIONS)


def test_defaults_and_derived_directories():
    c = load_config(None, environ={})
    assert c == default_config()
    assert c.source == "built-in defaults"
    assert c.relay.data_dir == Path("relay-data")
    assert c.relay.metadata_dir == Path("relay-data/metadata")
    assert c.relay.blobs_dir == Path("relay-data/blobs")
    assert c.relay.deltas_dir == Path("relay-data/deltas")
    assert c.relay.state_dir == Path("relay-data/state")
    assert c.policy.install_undefined == {"software": False, "content": True, "config": False}


def test_environment_is_read_only_when_passed(monkeypatch):
    monkeypatch.setenv("RELAY_LIMITS__EGRESS", "10MB")
    assert load_config(None).limits.egress == 0
    assert load_config(None, environ={"RELAY_LIMITS__EGRESS": "10MB"}).limits.egress == 10**7


def test_config_is_frozen_all_the_way_down():
    c = load_config(None, environ={"RELAY_POLICY__INSTALL_UNDEFINED": "software"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.limits.egress = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.policy.install_undefined["config"] = True  # type: ignore[index]
    with pytest.raises(TypeError):
        c.agent.actions["x"] = "y"  # type: ignore[index]


# -- layers -----------------------------------------------------------------------------

FILE = '[limits]\negress = "10MB"\nper_agent = "1MiB"\n[sync]\ninterval = "2m"'


@pytest.mark.parametrize(
    ("environ", "overrides", "key", "expected", "source"),
    [
        ({}, {}, "limits.upstream", 0, "FILE"),  # default; the file is the pointer
        ({}, {}, "limits.egress", 10_000_000, "FILE"),
        ({"RELAY_LIMITS__EGRESS": "2KiB"}, {}, "limits.egress", 2048, "RELAY_LIMITS__EGRESS"),
        (
            {"RELAY_LIMITS__EGRESS": "2KiB"},
            {"limits.egress": 5},
            "limits.egress",
            5,
            "command line",
        ),
        ({}, {"sync.interval": "1h"}, "sync.interval", 3600.0, "command line"),
        ({"RELAY_SYNC__JITTER": "0"}, {}, "sync.jitter", 0.0, "RELAY_SYNC__JITTER"),
        ({"OTHER": "x", "PATH": "/bin"}, {}, "limits.per_agent", 1_048_576, "FILE"),
    ],
)
def test_layers_defaults_then_file_then_env_then_command_line(
    tmp_path, environ, overrides, key, expected, source
):
    cfg = write(tmp_path, FILE)
    c = load_config(cfg, environ=environ, overrides=overrides)
    assert get(c, key) == expected
    assert c.source_of(key) == (str(cfg) if source == "FILE" else source)
    assert c.source == str(cfg)


def test_a_higher_layer_replaces_a_list_whole(tmp_path):
    cfg = write(tmp_path, '[upstream]\nurls = ["http://a.example/", "http://b.example/"]')
    c = load_config(cfg, environ={"RELAY_UPSTREAM__URLS": "http://c.example/"})
    assert c.upstream.urls == ("http://c.example/",)


# -- text forms (environment, string flags) --------------------------------------------


@pytest.mark.parametrize(
    ("variable", "text", "key", "expected"),
    [
        ("RELAY_UPSTREAM__URLS", "http://a.example/, https://b.example/", "upstream.urls",
         ("http://a.example/", "https://b.example/")),
        ("RELAY_UPSTREAM__URLS", "", "upstream.urls", ()),
        ("RELAY_RELAY__ACCESS_LOG", "false", "relay.access_log", False),
        ("RELAY_RELAY__ACCESS_LOG", "0", "relay.access_log", False),
        ("RELAY_RELAY__ACCESS_LOG", "no", "relay.access_log", False),
        ("RELAY_POLICY__RELAYS_ONLY", "TRUE", "policy.relays_only", True),
        ("RELAY_POLICY__RELAYS_ONLY", "1", "policy.relays_only", True),
        ("RELAY_POLICY__RELAYS_ONLY", "yes", "policy.relays_only", True),
        ("RELAY_POLICY__INSTALL_UNDEFINED", "content,config", "policy.install_undefined",
         {"software": False, "content": True, "config": True}),
        ("RELAY_POLICY__INSTALL_UNDEFINED", "", "policy.install_undefined",
         {"software": False, "content": False, "config": False}),
        ("RELAY_POLICY__DEFERRAL_DAYS", "2,5", "policy.deferral_days", (2, 5)),
        ("RELAY_POLICY__BETA_GROUPS", "pilot,it", "policy.beta_groups", ("pilot", "it")),
        ("RELAY_UPSTREAM__RETRIES", " 7 ", "upstream.retries", 7),
        ("RELAY_DELTA__MAX_RATIO", "0.25", "delta.max_ratio", 0.25),
        ("RELAY_DELTA__FORMATS", "zstd", "delta.formats", ("zstd",)),
        ("RELAY_STORE__MAX_BYTES", "1GB", "store.max_bytes", 10**9),
        ("RELAY_STORE__MAX_BYTES", "1GiB", "store.max_bytes", 1024**3),
        ("RELAY_LIMITS__UPSTREAM", "2MB/s", "limits.upstream", 2_000_000),
        ("RELAY_STORE__SCRUB_INTERVAL", "1d", "store.scrub_interval", 86400.0),
        ("RELAY_STORE__SCRUB_INTERVAL", "90", "store.scrub_interval", 90.0),
        ("RELAY_RELAY__LISTEN", "[::1]:0", "relay.listen", "[::1]:0"),
        ("RELAY_RELAY__LOG_FORMAT", "json", "relay.log_format", "json"),
        ("RELAY_ADMIN__TOKEN_FILE", "/etc/relay/token", "admin.token_file",
         Path("/etc/relay/token")),
        ("RELAY_AGENT__DEFER_DAYS", "3", "agent.defer_days", 3),
        ("relay_limits__egress", "1", "limits.egress", 0),  # not RELAY_: not ours
        ("RELAY_ADMIN_TOKEN", "s3cret", "admin.token", ""),  # the `relay admin` client's
    ],
)  # fmt: skip
def test_environment_text_forms(variable, text, key, expected):
    assert get(load_config(None, environ={variable: text}), key) == expected


def test_string_flags_use_the_text_form_and_typed_flags_pass_as_is():
    c = load_config(
        None,
        environ={},
        overrides={
            "upstream.retries": "5",
            "relay.access_log": "off",
            "agent.relays": ["http://r1.example/", "http://r2.example/"],
            "agent.defer_days": 7,
            "agent.actions": {"scan-now": "scan --now"},
            "policy.install_undefined": {"software": True},
        },
    )
    assert c.upstream.retries == 5
    assert c.relay.access_log is False
    assert c.agent.relays == ("http://r1.example/", "http://r2.example/")
    assert c.agent.defer_days == 7
    assert c.agent.actions == {"scan-now": "scan --now"}
    assert c.policy.install_undefined == {"software": True, "content": True, "config": False}


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:8080", "0.0.0.0:0", ":8080", "relay.example:65535", "[::1]:8080",
               "[::]:80", "[fe80::1%eth0]:8080"],
)  # fmt: skip
def test_listen_addresses_accepted(listen):
    assert load_config(None, environ={"RELAY_RELAY__LISTEN": listen}).relay.listen == listen


def test_tables_from_the_file(tmp_path):
    cfg = write(
        tmp_path,
        "[policy]\ninstall_undefined = { software = true }\n"
        '[agent.actions]\nscan-now = "scanner --now"\n'
        '[[limits.schedule]]\nstart = "22:00"\nend = "06:00"\ndays = ["mon"]\negress = "1MB"\n'
        '[[limits.schedule]]\nstart = "08:00"\nend = "08:00"\nper_agent = 1000',
    )
    c = load_config(cfg)
    assert c.policy.install_undefined == {"software": True, "content": True, "config": False}
    assert c.agent.actions == {"scan-now": "scanner --now"}
    night, all_day = c.limits.schedule
    assert (night.start, night.end, night.days) == ("22:00", "06:00", ("mon",))
    assert (night.egress, night.upstream, night.per_agent) == (1_000_000, None, None)
    assert (all_day.days, all_day.per_agent, all_day.egress) == ((), 1000, None)


def test_policy_section_extends_the_core_settings(tmp_path):
    # The settings an administrator may change are declared once, in the core; the
    # [policy] section adds the relay's own keys, and the relay starts from that part.
    assert issubclass(PolicySettings, Settings)
    cfg = write(
        tmp_path,
        '[policy]\nrollout_mode = "on-demand"\ndeferral_days = [7, 2]\n'
        'beta_groups = ["pilot", "it"]\npoll_seconds = 60\ninstall_undefined = { config = true }',
    )
    settings = settings_from_config(load_config(cfg).policy)
    assert type(settings) is Settings
    assert settings == Settings(
        install_undefined={"config": True},
        beta_groups=("pilot", "it"),
        rollout_mode=RolloutMode.ON_DEMAND,
        deferral_days=(2, 7),
    )
    assert "poll_seconds" not in settings.to_dict()
    assert settings_from_config(default_config().policy) == Settings()


@pytest.mark.parametrize(
    ("environ", "overrides", "defer_days"),
    [
        ({}, {"agent.defer_days": 3}, 3),
        ({"RELAY_POLICY__DEFERRAL_DAYS": "2,5"}, {"agent.defer_days": 5}, 5),
        ({"RELAY_POLICY__DEFERRAL_DAYS": "14", "RELAY_AGENT__DEFER_DAYS": "14"}, {}, 14),
        ({"RELAY_POLICY__DEFERRAL_DAYS": "2"}, {}, 0),
    ],
)
def test_agent_defer_days_is_none_or_one_of_the_deferral_days(environ, overrides, defer_days):
    assert load_config(None, environ, overrides).agent.defer_days == defer_days


@pytest.mark.parametrize(
    ("environ", "overrides", "source"),
    [
        ({}, {"agent.defer_days": 2}, "command line"),
        ({"RELAY_POLICY__DEFERRAL_DAYS": "2,5"}, {"agent.defer_days": 3}, "command line"),
        ({"RELAY_AGENT__DEFER_DAYS": "400"}, {}, "RELAY_AGENT__DEFER_DAYS"),
    ],
)
def test_agent_defer_days_outside_the_rule_names_key_value_and_source(environ, overrides, source):
    with pytest.raises(ConfigError) as info:
        load_config(None, environ, overrides)
    assert (info.value.key, info.value.source) == ("agent.defer_days", source)
    assert str(info.value).startswith(f"{source}: agent.defer_days = ")


def test_replica_with_a_parent_is_accepted(tmp_path):
    cfg = write(tmp_path, '[policy]\nmode = "replica"\nparent_url = "https://parent.example/"')
    assert load_config(cfg).policy.mode == "replica"


# -- errors from the file -------------------------------------------------------------

# (TOML text, key named in the error, value shown in the message; None: not shown)
BAD_FILE_VALUES = [
    # sizes, rates, durations
    ('[store]\nmax_bytes = "10 parsecs"', "store.max_bytes", "10 parsecs"),
    ("[store]\nmax_bytes = -5", "store.max_bytes", -5),
    ("[store]\nmax_bytes = inf", "store.max_bytes", float("inf")),
    ("[store]\nmax_bytes = true", "store.max_bytes", True),
    ("[limits]\nchunk_bytes = 0", "limits.chunk_bytes", 0),
    ('[limits]\negress = "fast"', "limits.egress", "fast"),
    ('[limits]\nper_agent = "1MB/h"', "limits.per_agent", "1MB/h"),
    ('[sync]\ninterval = "5 fortnights"', "sync.interval", "5 fortnights"),
    ('[sync]\ninterval = "-1s"', "sync.interval", "-1s"),
    ("[sync]\ninterval = 0", "sync.interval", 0),
    ("[upstream]\nread_timeout = 0", "upstream.read_timeout", 0),
    ("[delta]\nmax_seconds = nan", "delta.max_seconds", None),  # nan != nan: shown, not compared
    # enums
    ('[sync]\nprefetch = "some"', "sync.prefetch", "some"),
    ('[relay]\nlog_format = "xml"', "relay.log_format", "xml"),
    ('[policy]\nrollout_mode = "later"', "policy.rollout_mode", "later"),
    ('[policy]\nmode = "child"', "policy.mode", "child"),
    ("[relay]\nlog_format = 1", "relay.log_format", 1),
    # URLs
    ('[upstream]\nurls = ["ftp://x.example/"]', "upstream.urls", ["ftp://x.example/"]),
    ('[upstream]\nurls = ["http://"]', "upstream.urls", ["http://"]),
    ('[upstream]\nurls = ["x.example"]', "upstream.urls", ["x.example"]),
    ('[upstream]\nurls = ["http://x.example:99999/"]', "upstream.urls",
     ["http://x.example:99999/"]),
    ('[upstream]\nurls = ["http://x.example/?a=1"]', "upstream.urls", ["http://x.example/?a=1"]),
    ('[upstream]\nurls = ["http://x .example/"]', "upstream.urls", ["http://x .example/"]),
    ('[policy]\nparent_url = "parent"', "policy.parent_url", "parent"),
    ('[relay]\npublic_url = "//relay"', "relay.public_url", "//relay"),
    ('[agent]\norigin = "file:///srv"', "agent.origin", "file:///srv"),
    # listen addresses
    ('[relay]\nlisten = "localhost"', "relay.listen", "localhost"),
    ('[relay]\nlisten = "127.0.0.1:99999"', "relay.listen", "127.0.0.1:99999"),
    ('[relay]\nlisten = "127.0.0.1:http"', "relay.listen", "127.0.0.1:http"),
    ('[relay]\nlisten = "::1:8080"', "relay.listen", "::1:8080"),
    ('[relay]\nlisten = "[nope]:8080"', "relay.listen", "[nope]:8080"),
    ('[relay]\nlisten = "[::1]"', "relay.listen", "[::1]"),
    ('[relay]\nlisten = "bad host:80"', "relay.listen", "bad host:80"),
    ("[relay]\nlisten = 8080", "relay.listen", 8080),
    # lists of the wrong type, or with wrong items
    ('[upstream]\nurls = "http://x.example/"', "upstream.urls", "http://x.example/"),
    ('[policy]\ndeferral_days = ["1"]', "policy.deferral_days", ["1"]),
    ("[policy]\ndeferral_days = []", "policy.deferral_days", []),
    ("[policy]\ndeferral_days = [0]", "policy.deferral_days", [0]),
    ('[policy]\nbeta_groups = "pilot"', "policy.beta_groups", "pilot"),
    ('[delta]\nformats = ["xdelta"]', "delta.formats", ["xdelta"]),
    ('[delta]\nformats = ["zstd", "zstd"]', "delta.formats", ["zstd", "zstd"]),
    ("[delta]\nformats = []", "delta.formats", []),
    ('[agent]\naccept_delta = "zstd"', "agent.accept_delta", "zstd"),
    # integers, ratios, booleans, paths
    ("[upstream]\nretries = -1", "upstream.retries", -1),
    ("[upstream]\nretries = 1.5", "upstream.retries", 1.5),
    ("[delta]\nzstd_level = 23", "delta.zstd_level", 23),
    ("[delta]\nworkers = 0", "delta.workers", 0),
    ("[delta]\nmax_ratio = 2.0", "delta.max_ratio", 2.0),
    ("[delta]\nmax_ratio = 0", "delta.max_ratio", 0),
    ("[policy]\npoll_seconds = 0", "policy.poll_seconds", 0),
    ("[agent]\ndefer_days = 2", "agent.defer_days", 2),
    ('[relay]\naccess_log = "yes"', "relay.access_log", "yes"),  # text form is env-only
    ("[relay]\ndata_dir = 5", "relay.data_dir", 5),
    # tables
    ("[policy]\ninstall_undefined = { firmware = true }", "policy.install_undefined",
     {"firmware": True}),
    ('[policy]\ninstall_undefined = { content = "yes" }', "policy.install_undefined",
     {"content": "yes"}),
    ('[policy]\ninstall_undefined = "content"', "policy.install_undefined", "content"),
    ('[agent]\nactions = { scan = ["scan"] }', "agent.actions", {"scan": ["scan"]}),
    ('[[limits.schedule]]\nstart = "25:00"\nend = "18:00"', "limits.schedule", None),
    ('[[limits.schedule]]\nstart = "8:00"\nend = "18:00"', "limits.schedule", None),
    ('[[limits.schedule]]\nstart = "08:00"', "limits.schedule", None),
    ('[[limits.schedule]]\nstart = "08:00"\nend = "18:00"\ndays = ["monday"]',
     "limits.schedule", None),
    ('[[limits.schedule]]\nstart = "08:00"\nend = "18:00"\negres = "1MB"', "limits.schedule", None),
    ('[[limits.schedule]]\nstart = "08:00"\nend = "18:00"\negress = "lots"',
     "limits.schedule", None),
    ('[limits]\nschedule = "08:00-18:00"', "limits.schedule", "08:00-18:00"),
    # unknown keys and sections, and a section that is not a table
    ("[relay]\nbogus = 1", "relay.bogus", 1),
    ("[relay.sub]\nlisten = 1", "relay.sub", {"listen": 1}),
    ("[relays]\nlisten = 1", "relays", None),
    ("listen = 1", "listen", None),
    # rules across keys
    ('[policy]\nmode = "replica"', "policy.parent_url", ""),
]  # fmt: skip


@pytest.mark.parametrize(("toml", "key", "value"), BAD_FILE_VALUES)
def test_bad_value_in_the_file_names_key_value_and_file(tmp_path, toml, key, value):
    cfg = write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    err = info.value
    assert (err.key, err.source) == (key, str(cfg))
    message = str(err)
    assert message.startswith(f"{cfg}: {key}")
    if value is not None:
        assert repr(value) in message
    assert err.reason and err.reason in message


def test_unknown_key_and_section_list_what_is_known(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key \(known in \[limits\]: upstream, egress"):
        load_config(write(tmp_path, "[limits]\negres = 1"))
    with pytest.raises(ConfigError, match=r"relays: unknown section \(known: relay, upstream"):
        load_config(write(tmp_path, "[relays]\nlisten = 1"))


def test_toml_syntax_error_names_the_file_and_the_line(tmp_path):
    cfg = write(tmp_path, '[relay]\nlisten = "127.0.0.1:8080"\naccess_log = tru')
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert info.value.source == str(cfg)
    assert str(cfg) in str(info.value) and "not valid TOML" in str(info.value)
    assert "line 3" in str(info.value)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p / "missing.toml", "no such file"),
        (lambda p: p, "cannot read"),  # a directory
        (lambda p: (p / "latin1.toml", (p / "latin1.toml").write_bytes(b"# \xe9\n"))[0],
         "not UTF-8"),
    ],
)  # fmt: skip
def test_unreadable_config_file_names_the_path(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.key, info.value.source) == ("--config", str(path))
    assert str(path) in str(info.value) and reason in str(info.value)


# -- errors from the environment and the command line ------------------------------


@pytest.mark.parametrize(
    ("variable", "text", "key", "reason"),
    [
        ("RELAY_LIMITS__EGRESS", "lots", "limits.egress", "expected a size"),
        ("RELAY_SYNC__INTERVAL", "soon", "sync.interval", "expected a duration"),
        ("RELAY_SYNC__PREFETCH", "some", "sync.prefetch", "expected one of policy, all, none"),
        ("RELAY_RELAY__ACCESS_LOG", "maybe", "relay.access_log", "expected one of 1, true"),
        ("RELAY_UPSTREAM__RETRIES", "three", "upstream.retries", "expected an integer"),
        ("RELAY_UPSTREAM__URLS", "http://a.example/,ftp://b", "upstream.urls", "item 1"),
        ("RELAY_RELAY__LISTEN", "8080", "relay.listen", "expected HOST:PORT"),
        ("RELAY_RELAY__LISTEN", "0.0.0.0:\u00b2", "relay.listen", "expected HOST:PORT"),
        ("RELAY_DELTA__MAX_RATIO", "nan", "delta.max_ratio", "more than 0 and at most 1"),
        ("RELAY_POLICY__INSTALL_UNDEFINED", "firmware", "policy.install_undefined",
         "unknown kind 'firmware'"),
        ("RELAY_LIMITS__NOPE", "1", "limits.nope", "unknown key"),
        ("RELAY_LIMIT__EGRESS", "1", "limit.egress", "unknown section"),
        ("RELAY_LIMITS__SCHEDULE", "08:00-18:00", "limits.schedule",
         "set it in the configuration file"),
        ("RELAY_AGENT__ACTIONS", "scan", "agent.actions", "set it in the configuration file"),
        ("RELAY_LIMITS_EGRESS", "10MB", "limits.egress", "write RELAY_LIMITS__EGRESS"),
        ("RELAY_RELAY_LISTEN", ":80", "relay.listen", "write RELAY_RELAY__LISTEN"),
        ("RELAY_POLICY__MODE", "replica", "policy.parent_url", "is required when"),
    ],
)  # fmt: skip
def test_bad_variable_names_key_value_and_variable(variable, text, key, reason):
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={variable: text})
    err = info.value
    assert (err.key, err.source) == (key, variable)
    message = str(err)
    assert message.startswith(f"{variable}: {key}")
    assert reason in message
    if key != "policy.parent_url":
        assert repr(text) in message


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"limits.egress": "lots"}, "limits.egress"),
        ({"limits.egress": [1]}, "limits.egress"),
        ({"upstream.urls": "ftp://x"}, "upstream.urls"),
        ({"nosuch.key": 1}, "nosuch.key"),
        ({"limits": 1}, "limits."),
    ],
)
def test_bad_flag_names_key_value_and_the_command_line(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={}, overrides=overrides)
    assert (info.value.key, info.value.source) == (key, "command line")
    assert repr(next(iter(overrides.values()))) in str(info.value)


# -- secrets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "overrides", "toml"),
    [
        ({"RELAY_ADMIN__TOKEN": "s3cret", "RELAY_ADMIN__TOKENS": "s3cret"}, {}, ""),
        ({"RELAY_ADMIN_TOKN": "s3cret", "RELAY_ADMIN__TOKN": "s3cret"}, {}, ""),
        ({"RELAY_ADMN__TOKEN": "s3cret"}, {}, ""),
        ({"RELAY_POLICY__PARENT_PASSWORD": "s3cret"}, {}, ""),
        ({}, {"admin.tokn": "s3cret"}, ""),
        ({}, {"policy.parent_token": "s3cret"}, ""),
        ({}, {}, '[admin]\ntoken = ["s3cret"]'),
        ({}, {}, '[admin]\ntokne = "s3cret"'),
    ],
)
def test_secret_values_never_appear_in_errors(tmp_path, environ, overrides, toml):
    path = write(tmp_path, toml) if toml else None
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ, overrides=overrides)
    assert "s3cret" not in str(info.value) and "s3cret" not in repr(info.value.value)
    assert "<hidden>" in str(info.value)


def test_admin_token_from_variable_or_file_is_never_in_repr(tmp_path):
    c = load_config(None, environ={"RELAY_ADMIN__TOKEN": "s3cret"})
    assert "s3cret" not in repr(c) and "s3cret" not in str(c.admin)
    assert c.admin_token() == "s3cret"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    c = load_config(None, environ={"RELAY_ADMIN__TOKEN_FILE": str(token_file)})
    assert c.admin_token() == "from-file"
    assert load_config(None, environ={}).admin_token() == ""


def test_unreadable_token_file_names_key_path_and_source(tmp_path):
    missing = tmp_path / "nope"
    c = load_config(None, environ={"RELAY_ADMIN__TOKEN_FILE": str(missing)})
    with pytest.raises(ConfigError) as info:
        c.admin_token()
    assert (info.value.key, info.value.source) == ("admin.token_file", "RELAY_ADMIN__TOKEN_FILE")
    assert str(missing) in str(info.value) and "cannot be read" in str(info.value)
