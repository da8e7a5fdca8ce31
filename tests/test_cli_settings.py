"""Saved admin settings against the configured ``[policy]`` values: per key, a saved
value overrides the configuration, every other key follows it (at start and on reload)."""

from __future__ import annotations

import asyncio
import logging
import signal

import pytest

from relay.cli.main import main
from relay.config import load_config
from relay.core.policy import Settings
from relay.fleet.approvals import PolicyStore, settings_from_config
from relay.server.compose import apply_settings
from relay.storage.kv import KV
from tests.support import free_port, relay_config, relay_state, start_relay_process

TOKEN = "settings-t0ken"


async def test_saved_keys_override_the_configuration_and_others_follow_it(
    tmp_path, serve_relay, origin, root_file, caplog, capsys
):
    relay = await serve_relay(**{"admin.token": TOKEN, "policy.poll_seconds": 60})
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    admin = ["admin", "settings", "--url", relay.url, "--token-file", str(token_file)]
    assert await asyncio.to_thread(main, [*admin, "--set", "relays_only=true"]) == 0
    capsys.readouterr()
    policy = relay_state(relay).policy
    assert policy.saved == {"relays_only": True}

    def reloaded(**policy_keys):
        keys = {f"policy.{k}": v for k, v in policy_keys.items()}
        return relay_config(tmp_path, [origin.url], root_file, **{"admin.token": TOKEN, **keys})

    # The file changes two keys on reload: the unsaved one follows, the saved one stays.
    caplog.set_level(logging.INFO, logger="relay.server.compose")
    await apply_settings(relay.app, reloaded(relays_only=False, beta_groups=["lab"]))
    assert policy.settings.relays_only is True
    assert policy.settings.beta_groups == ("lab",)
    lines = [r.getMessage() for r in caplog.records if "overrides" in r.getMessage()]
    assert lines == [
        (
            "policy.relays_only = true (saved through the admin API) overrides false "
            "(command line); `relay admin settings --unset relays_only` follows the "
            "configuration again"
        )
    ]
    # --unset forgets the saved value: the key follows the configuration again.
    assert await asyncio.to_thread(main, [*admin, "--unset", "relays_only"]) == 0
    assert policy.settings.relays_only is False and policy.saved == {}
    caplog.clear()
    await apply_settings(relay.app, reloaded(relays_only=True))
    assert policy.settings.relays_only is True
    assert not [r for r in caplog.records if "overrides" in r.getMessage()]
    # An unknown key to forget is a 400, as an unknown key to set.
    assert await asyncio.to_thread(main, [*admin, "--unset", "relay_only"]) == 1
    assert "relay_only: unknown setting" in capsys.readouterr().err


@pytest.mark.parametrize("legacy", [True, False])
async def test_saved_keys_survive_a_restart(tmp_path, legacy):
    configured = settings_from_config(load_config(None, {}).policy)
    kv = await asyncio.to_thread(KV, tmp_path / "state")
    try:
        if legacy:
            # A database from before saved keys were tracked holds every key: the keys
            # that differ from the configuration count as saved.
            changed = Settings.from_dict({"relays_only": True}, base=configured)
            await kv.set("policy:settings", changed.to_dict())
        else:
            store = PolicyStore(kv, configured)
            await store.save_settings({"relays_only": True}, {"action": "settings"})
        store = PolicyStore(kv, configured)
        await store.load()
        assert store.saved == {"relays_only": True}
        assert store.overrides() == [("relays_only", True, False)]
        # A configuration that now says the same thing overrides nothing.
        assert not store.set_defaults(Settings.from_dict({"relays_only": True}, base=configured))
        assert store.overrides() == []
        assert store.set_defaults(Settings.from_dict({"beta_groups": ["x"]}, base=configured))
        assert store.settings.relays_only is True and store.settings.beta_groups == ("x",)
    finally:
        await asyncio.to_thread(kv.close)


async def test_a_relay_logs_each_override_on_sighup_and_at_start(tmp_path, origin, root_file):
    config = tmp_path / "relay.toml"
    config.write_text("[policy]\nrelays_only = false\n")
    env = {"RELAY_ADMIN__TOKEN": TOKEN}
    args = ["--config", str(config), "--upstream", origin.url, "--trusted-root", str(root_file)]
    args += ["--data-dir", str(tmp_path / "data")]
    line = f"policy.relays_only = true (saved through the admin API) overrides false ({config})"

    async def run(then):
        port = free_port()
        proc = await start_relay_process(args, port, env=env)
        try:
            seen = await then(proc, f"http://127.0.0.1:{port}/")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0
        return seen + err.decode()

    async def save_then_reload(proc, url):
        argv = ["admin", "settings", "--set", "relays_only=true", "--url", url]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RELAY_ADMIN__TOKEN", TOKEN)
            assert await asyncio.to_thread(main, argv) == 0
        proc.send_signal(signal.SIGHUP)
        seen = ""
        while "SIGHUP: configuration re-read" not in seen:  # the reload's own line, after
            seen += (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
        return seen

    async def nothing(_proc, _url):
        return ""

    first = await run(save_then_reload)
    assert first.count(line) == 1  # on SIGHUP, not at the first start (nothing saved yet)
    second = await run(nothing)
    assert second.count(line) == 1  # at start
