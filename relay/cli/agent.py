"""``relay agent``: run the reference agent once, or in its loop (events between check-ins)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from relay.agent.updater import Agent, AgentConfig, RunSummary
from relay.cli.exitcodes import ExitCode
from relay.config import load_config
from relay.errors import ConfigError
from relay.storage.fsio import ensure_directory


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    pairs = {
        "agent.relays": args.relay,
        "agent.origin": args.origin,
        "agent.relays_only": args.relays_only,
        "agent.trusted_root": str(args.trusted_root) if args.trusted_root else None,
        "agent.state_dir": str(args.state_dir) if args.state_dir else None,
        "agent.install_dir": str(args.install_dir) if args.install_dir else None,
        "agent.id": args.agent_id,
        "agent.group": args.group,
        "agent.defer_days": args.defer,
        "agent.install_command": args.install_command,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    """Run the agent; with ``--once``, one run and its exit code.

    Raises:
        ConfigError: no trusted root, no relay and no origin, or an invalid key.
        StartupError: the state or install directory is a file or not writable.
    """
    config = load_config(args.config, os.environ, _overrides(args))
    settings = config.agent
    if not str(settings.trusted_root) or str(settings.trusted_root) == ".":
        raise ConfigError(
            "agent.trusted_root",
            None,
            config.source_of("agent.trusted_root"),
            "is required (--trusted-root)",
        )
    if not settings.relays and not settings.origin:
        raise ConfigError(
            "agent.relays", None, config.source_of("agent.relays"), "give --relay (or --origin)"
        )
    ensure_directory(settings.state_dir, "agent.state_dir (--state-dir)")
    ensure_directory(settings.install_dir, "agent.install_dir (--install-dir)")
    agent = Agent(AgentConfig.from_settings(settings))
    logging.getLogger("relay").setLevel(logging.INFO)
    while True:
        summary = agent.run_once()
        _print(summary)
        if args.once:
            return ExitCode.FAILURE if summary.error or summary.failed else ExitCode.OK
        # Between runs: hold the relay's events, wake for a held-back offer's slot.
        agent.wait(agent.next_wait(summary))


def _print(summary: RunSummary) -> None:
    for line in summary.installed:
        print(f"installed {line}", flush=True)
    for line in summary.uninstalled:
        print(f"uninstalled {line}", flush=True)
    for line in summary.waiting:
        print(f"waiting {line}", flush=True)
    for line in summary.failed:
        print(f"failed {line}", file=sys.stderr, flush=True)
    if summary.error:
        print(f"relay agent: {summary.error}", file=sys.stderr, flush=True)
    elif not (summary.installed or summary.uninstalled or summary.failed or summary.waiting):
        print(f"up to date (via {summary.source})", flush=True)
