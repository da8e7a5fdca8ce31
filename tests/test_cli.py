"""The command line as an operator types it: typos, defaults, options after the action,
the admin token's variable, ``relay config check|show``, and the admin API's 404s."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import tomllib

import aiohttp
import pytest

from relay.cli.main import main, make_parser
from relay.config import load_config
from tests.support import released

TOKEN = "cli-t0ken"


@pytest.fixture
def repo(repo):
    return released(repo, b"one" * 1000, "app.bin", product="app", version="1.0.0")


@pytest.fixture
async def relay(serve_relay):
    return await serve_relay(**{"admin.token": TOKEN})


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(autouse=True)
def _no_token_variables(monkeypatch):
    for name in ("RELAY_ADMIN__TOKEN", "RELAY_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def _usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "meant"),
    [
        (["admn"], "admin"),
        (["admin", "aprove", "app", "1.0.0"], "approve"),
        (["publish", "refesh", "REPO"], "refresh"),
        (["config", "chek"], "check"),
        (["admin", "approve", "app", "1.0.0", "--mode", "on-demnd"], "on-demand"),
    ],
)
def test_a_typo_is_answered_with_the_closest_choice(argv, meant, capsys):
    err = _usage_error(argv, capsys)
    assert f"did you mean {meant}?" in err, err
    assert "invalid choice" in err


def _parsers(parser):
    yield parser
    for action in parser._actions:  # noqa: SLF001 - argparse keeps its subparsers there
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_flag_has_help_and_shows_its_default():
    for parser in _parsers(make_parser()):
        text = parser.format_help()
        for action in parser._actions:  # noqa: SLF001
            if not action.option_strings or action.dest in ("help", "version"):
                continue
            assert action.help, (parser.prog, action.option_strings)
            if not action.required:
                # The formatter appends "(default: ...)" to the help it shows.
                flag = action.option_strings[-1]
                entry = text[text.index(flag) :]
                entry = entry[: entry.index("(default") + 9] if "(default" in entry else ""
                assert entry, (parser.prog, flag)
    approve = make_parser().parse_args(["admin", "approve", "a", "1.0.0"])
    assert approve.mode == "forced"


async def test_admin_options_come_before_or_after_the_action(relay, token_file, capsys):
    for argv in (
        ["admin", "--url", relay.url, "--token-file", str(token_file), "updates"],
        ["admin", "updates", "--url", relay.url, "--token-file", str(token_file)],
        ["admin", "--url", relay.url, "updates", "--token-file", str(token_file)],
    ):
        assert await asyncio.to_thread(main, argv) == 0, argv
        assert re.search(r"^app +1\.0\.0 ", capsys.readouterr().out, re.MULTILINE)


async def test_the_admin_token_variable_is_the_servers_name(relay, monkeypatch, capsys):
    argv = ["admin", "agents", "--url", relay.url]
    assert await asyncio.to_thread(main, argv) == 3
    assert "RELAY_ADMIN__TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("RELAY_ADMIN__TOKEN", TOKEN)
    assert await asyncio.to_thread(main, argv) == 0
    assert "warning" not in capsys.readouterr().err
    # The old name still works, with one warning line naming the new one.
    monkeypatch.delenv("RELAY_ADMIN__TOKEN")
    monkeypatch.setenv("RELAY_ADMIN_TOKEN", TOKEN)
    assert await asyncio.to_thread(main, argv) == 0
    err = capsys.readouterr().err
    assert "RELAY_ADMIN_TOKEN is deprecated" in err and "RELAY_ADMIN__TOKEN" in err
    # A refused token says where it was read from.
    monkeypatch.setenv("RELAY_ADMIN_TOKEN", "wrong")
    assert await asyncio.to_thread(main, argv) == 1
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "the token was read from RELAY_ADMIN_TOKEN" in err


async def test_an_unknown_group_is_refused_with_the_known_ones(relay, token_file, capsys):
    base = ["admin", "--url", relay.url, "--token-file", str(token_file)]
    approve = [*base, "approve", "app", "1.0.0", "--group"]
    assert await asyncio.to_thread(main, [*approve, "pilot", "--new-group"]) == 0
    capsys.readouterr()
    assert await asyncio.to_thread(main, [*approve, "pilott"]) == 1
    err = capsys.readouterr().err
    assert "unknown group 'pilott' (known: default, pilot); did you mean pilot?" in err
    assert "--new-group" in err
    assert await asyncio.to_thread(main, [*approve, "pilot"]) == 0
    # A product or version typo: the closest update.
    assert await asyncio.to_thread(main, [*base, "approve", "ap", "1.0.0"]) == 1
    assert "no update ap 1.0.0; did you mean app 1.0.0?" in capsys.readouterr().err


async def _get(relay, path, method="GET", token=TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, relay.make_url(path), headers=headers) as r,
    ):
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body, r.headers


async def test_an_admin_path_typo_names_the_closest_route(relay):
    status, body, _ = await _get(relay, "/v1/admin/updats")
    assert status == 404
    assert body["did_you_mean"] == "/v1/admin/updates"
    assert "did you mean /v1/admin/updates?" in body["error"]
    assert "/v1/admin/report.csv" in body["routes"]
    status, body, headers = await _get(relay, "/v1/admin/sync")  # POST only
    assert (status, headers["Allow"]) == (405, "POST")
    status, body, _ = await _get(relay, "/v1/admin/agents/someone/else")
    assert status == 404
    # Without the token the routes are not listed.
    status, body, _ = await _get(relay, "/v1/admin/updats", token="wrong")
    assert status == 401


async def test_without_a_token_the_404_names_the_key_to_set(serve_relay):
    relay = await serve_relay()
    status, text, _ = await _get(relay, "/v1/admin/updates")
    assert status == 404
    assert "admin.token_file" in text and "RELAY_ADMIN__TOKEN" in text


def test_config_check_says_ok_or_the_one_line_error(tmp_path, monkeypatch, capsys):
    good = tmp_path / "relay.toml"
    good.write_text('[limits]\negress = "10MB"\n')
    assert main(["config", "check", "--config", str(good)]) == 0
    assert capsys.readouterr().out == "ok\n"
    monkeypatch.setenv("RELAY_LIMITS__EGRESS", "fast")
    assert main(["config", "check", "--config", str(good)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "limits.egress" in err and "RELAY_LIMITS__EGRESS" in err
    monkeypatch.delenv("RELAY_LIMITS__EGRESS")
    missing = tmp_path / "none"
    good.write_text(f'[admin]\ntoken_file = "{missing}"\n')
    assert main(["config", "check", "--config", str(good)]) == 3
    assert "admin.token_file" in capsys.readouterr().err


def test_config_show_is_toml_with_each_values_source(tmp_path, monkeypatch, capsys):
    path = tmp_path / "relay.toml"
    path.write_text(
        '[limits]\negress = "10MB"\n[[limits.schedule]]\nstart = "08:00"\nend = "18:00"\n'
        'upstream = "1MB"\n[admin]\ntoken = "s3cret-value"\n'
    )
    monkeypatch.setenv("RELAY_SYNC__INTERVAL", "60")
    monkeypatch.delenv("RELAY_RELAY__WORKERS")  # the suite's one-process default
    argv = ["config", "show", "--config", str(path), "--listen", "127.0.0.1:9999"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "s3cret-value" not in out and 'token = "<hidden>"' in out
    lines, section = {}, ""
    for line in out.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif " = " in line:
            lines[f"{section}.{line.split(' = ')[0]}"] = line
    assert lines["limits.egress"].endswith(f"# file {path}")
    assert lines["sync.interval"].endswith("# RELAY_SYNC__INTERVAL")
    assert lines["relay.listen"].endswith("# command line")
    assert lines["admin.listen"].endswith("# default")
    assert lines["relay.drain"].endswith("# default")
    assert lines["relay.workers"].startswith("workers = 0 ")  # one process per core
    # It reads back as the same configuration (the secret aside).
    shown = tomllib.loads(out)
    assert shown["limits"]["schedule"][0]["upstream"] == 1_000_000
    again = tmp_path / "again.toml"
    again.write_text(out.replace('"<hidden>"', '"s3cret-value"'))
    original = load_config(path, {"RELAY_SYNC__INTERVAL": "60"}, {"relay.listen": "127.0.0.1:9999"})
    assert dataclasses.replace(load_config(again), source=original.source) == original
