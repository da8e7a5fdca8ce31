"""Configuration layers, validation, and messages that name key, value and source."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from relay.config import default_config, load_config
from relay.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "config" / "relay.example.toml"


def test_example_file_documents_the_defaults():
    loaded = load_config(EXAMPLE)
    assert dataclasses.replace(loaded, source="built-in defaults") == default_config()
    text = EXAMPLE.read_text()
    for section in (
        "relay",
        "upstream",
        "sync",
        "store",
        "limits",
        "delta",
        "policy",
        "admin",
        "agent",
    ):
        fields = dataclasses.fields(getattr(default_config(), section))
        for f in fields:
            assert f"\n{f.name} = " in text or f"[{section}.{f.name}]" in text, (
                f"{section}.{f.name} undocumented"
            )


def test_layers_file_then_env_then_flags(tmp_path):
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[limits]\negress = "10MB"\nper_agent = "1MiB"\n[sync]\ninterval = "2m"\n')
    c = load_config(
        cfg,
        environ={"RELAY_LIMITS__PER_AGENT": "2KiB", "OTHER": "x"},
        overrides={"sync.interval": "1h"},
    )
    assert c.limits.egress == 10_000_000
    assert c.limits.per_agent == 2048
    assert c.sync.interval == 3600.0
    assert c.source == str(cfg)


def test_env_lists_and_booleans():
    c = load_config(
        None,
        environ={
            "RELAY_UPSTREAM__URLS": "http://a.example/,https://b.example/",
            "RELAY_RELAY__ACCESS_LOG": "false",
            "RELAY_POLICY__INSTALL_UNDEFINED": "content,config",
        },
    )
    assert c.upstream.urls == ("http://a.example/", "https://b.example/")
    assert c.relay.access_log is False
    assert c.policy.install_undefined == {"software": False, "content": True, "config": True}


@pytest.mark.parametrize(
    ("toml", "key", "value"),
    [
        ('[limits]\negress = "10 parsecs"', "limits.egress", "10 parsecs"),
        ("[store]\nmax_bytes = -5", "store.max_bytes", -5),
        ('[sync]\ninterval = "5 fortnights"', "sync.interval", "5 fortnights"),
        ('[sync]\nprefetch = "some"', "sync.prefetch", "some"),
        ('[upstream]\nurls = ["ftp://x"]', "upstream.urls", ["ftp://x"]),
        ('[upstream]\nurls = "http://x"', "upstream.urls", "http://x"),
        ('[relay]\nlisten = "localhost"', "relay.listen", "localhost"),
        ('[relay]\nlisten = "127.0.0.1:99999"', "relay.listen", "127.0.0.1:99999"),
        ("[relay]\nbogus = 1", "relay.bogus", 1),
        ("[delta]\nmax_ratio = 2.0", "delta.max_ratio", 2.0),
        ('[delta]\nformats = ["xdelta"]', "delta.formats", ["xdelta"]),
        ('[limits]\nschedule = [{start = "25:00", end = "18:00"}]', "limits.schedule", None),
        ("[agent]\ndefer_days = 2", "agent.defer_days", 2),
        ('[policy]\nmode = "replica"', "policy.parent_url", ""),
    ],
)
def test_bad_value_names_key_value_and_file(tmp_path, toml, key, value):
    cfg = tmp_path / "relay.toml"
    cfg.write_text(toml + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    err = info.value
    assert err.key == key
    assert err.source == str(cfg)
    message = str(err)
    assert str(cfg) in message and key in message
    if value is not None:
        assert repr(value) in message


def test_unknown_section_and_bad_toml_name_the_file(tmp_path):
    cfg = tmp_path / "relay.toml"
    cfg.write_text("[relays]\nlisten = 1\n")
    with pytest.raises(ConfigError, match="relays: unknown section"):
        load_config(cfg)
    cfg.write_text("[relay\n")
    with pytest.raises(ConfigError, match=r"relay\.toml.*not valid TOML.*line 1"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")


def test_env_errors_name_the_variable():
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"RELAY_LIMITS__EGRESS": "lots"})
    assert info.value.source == "RELAY_LIMITS__EGRESS"
    assert "limits.egress" in str(info.value) and "'lots'" in str(info.value)
    with pytest.raises(ConfigError, match="RELAY_LIMITS__NOPE.*limits.nope.*unknown key"):
        load_config(None, environ={"RELAY_LIMITS__NOPE": "1"})
    with pytest.raises(ConfigError, match="set it in the configuration file"):
        load_config(None, environ={"RELAY_LIMITS__SCHEDULE": "x"})


def test_admin_token_is_never_shown(tmp_path):
    c = load_config(None, environ={"RELAY_ADMIN__TOKEN": "s3cret"})
    assert "s3cret" not in repr(c)
    assert c.admin_token() == "s3cret"
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"RELAY_ADMIN__TOKEN": "s3cret", "RELAY_ADMIN__TOKENS": "x"})
    assert "s3cret" not in str(info.value)


def test_schedule_parsed(tmp_path):
    cfg = tmp_path / "relay.toml"
    cfg.write_text(
        '[[limits.schedule]]\nstart = "22:00"\nend = "06:00"\ndays = ["mon"]\negress = "1MB"\n'
    )
    (entry,) = load_config(cfg).limits.schedule
    assert (entry.start, entry.end, entry.days, entry.egress, entry.upstream) == (
        "22:00",
        "06:00",
        ("mon",),
        1_000_000,
        None,
    )


def test_each_key_remembers_where_it_came_from(tmp_path):
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[limits]\negress = "10MB"\n')
    c = load_config(
        cfg, environ={"RELAY_SYNC__INTERVAL": "1m"}, overrides={"upstream.trusted_root": "/r.json"}
    )
    assert c.source_of("limits.egress") == str(cfg)
    assert c.source_of("sync.interval") == "RELAY_SYNC__INTERVAL"
    assert c.source_of("upstream.trusted_root") == "command line"
    assert c.source_of("store.max_bytes") == str(cfg)  # a default: the file is the best pointer
