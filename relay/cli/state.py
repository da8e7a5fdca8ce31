"""``relay state check [--repair]``: check the state database; move a damaged one aside."""

from __future__ import annotations

import argparse
import os
import sys
import time

from relay.cli.exitcodes import ExitCode
from relay.config import load_config
from relay.server.run import DataDirLock
from relay.storage.kv import check_state, repair_state, shows_earlier_use


def run(args: argparse.Namespace) -> int:
    """Check ``<data_dir>/state``; with ``--repair``, start an empty one if it is damaged.

    Stop the relay first: ``--repair`` takes the data directory's lock, so it refuses
    while a relay runs there.

    Raises:
        ConfigError: a key of the file, a variable or a flag is invalid.
        DataDirLockedError: ``--repair`` while a relay uses the data directory.
        OSError: the database cannot be moved or made.
    """
    overrides = {"relay.data_dir": str(args.data_dir)} if args.data_dir else {}
    relay = load_config(args.config, os.environ, overrides).relay
    used = shows_earlier_use(relay.metadata_dir, relay.blobs_dir)
    problem = check_state(relay.state_dir, used=used)
    if problem is None:
        print(f"{relay.state_dir}: ok")
        return ExitCode.OK
    print(f"{relay.state_dir}: {problem}", file=sys.stderr)
    if not args.repair:
        print(
            "The relay serves verified content but refuses policy changes meanwhile. Either\n"
            f"  stop the relay and restore {relay.state_dir} from a backup, or\n"
            "  run `relay state check --repair` to move it aside and start an empty one\n"
            "  (approvals, settings, the agent registry and the audit log start over).",
            file=sys.stderr,
        )
        return ExitCode.FAILURE
    lock = DataDirLock(relay.data_dir)
    lock.acquire()  # a running relay holds it: stop it first
    try:
        aside = repair_state(relay.state_dir, time.time())
    finally:
        lock.release()
    print(
        f"moved the damaged database to {aside} and started an empty one: approvals, "
        "settings, the agent registry and the audit log start over. To keep them instead, "
        f"stop the relay and restore {relay.state_dir} from a backup."
    )
    return ExitCode.OK
