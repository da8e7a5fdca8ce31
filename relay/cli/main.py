"""Command line: ``relay <command>``.

One ``_<cmd>_parser(parser)`` per command adds its arguments, :func:`make_parser`
builds the whole parser from the table of commands, and :func:`main` maps domain
errors to exit codes in one place.

Each command runs from its own module, ``relay.cli.<command>`` (its ``run(args)``),
imported once the command is known: ``relay --help`` and a mistyped command never
load the server, the publisher or the agent.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from relay import __version__
from relay.cli.exitcodes import ExitCode
from relay.core.fleet import FleetState
from relay.core.hints import did_you_mean
from relay.core.units import parse_duration
from relay.errors import ConfigError, PublishError, RelayError, StartupError

_EPILOG = """\
exit codes:
  0    success
  1    the command failed (the message says why; nothing was changed)
  2    usage error (bad arguments), or a start-up mistake (port in use, address not
       on this host, data directory locked, not a directory or not writable, trusted
       root missing or not a TUF root): one line, a traceback only with -v
  3    configuration error (names the key and the file or variable)
  130  interrupted (`relay serve` stops cleanly on SIGINT or SIGTERM and exits 0)
"""


# -- the parser --------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option's default after its help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "(default" in text
            or action.default is argparse.SUPPRESS
            or action.required
            or not action.option_strings
        ):
            return text
        if action.nargs == 0:  # a switch
            shown = "on" if action.default else "off"
        elif action.default in (None, [], ()):
            shown = "not set"
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})"


class _Parser(argparse.ArgumentParser):
    """An argument parser that shows defaults and suggests the choice a typo meant."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - argparse's
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def _check_value(self, action: argparse.Action, value: Any) -> None:  # noqa: ANN401
        choices = action.choices
        if choices is not None and value not in choices:
            names = [str(c) for c in choices]
            msg = f"invalid choice: {value!r} (choose from {', '.join(names)})"
            raise argparse.ArgumentError(action, msg + did_you_mean(str(value), names))


# -- admin -----------------------------------------------------------------------

ADMIN_URL = "http://127.0.0.1:8080/"


def _admin_options(p: argparse.ArgumentParser, *, default: Any) -> None:  # noqa: ANN401
    # Before the action (their defaults) or after it (SUPPRESS: given values only, so an
    # action does not reset what was given before it).
    p.add_argument(
        "--url",
        default=ADMIN_URL if default is None else default,
        help=f"the relay's admin base URL (default: {ADMIN_URL})",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        default=default,
        help="file holding the admin token (default: the RELAY_ADMIN__TOKEN variable)",
    )


def _admin_parser(p: argparse.ArgumentParser) -> None:
    _admin_options(p, default=None)
    shared = _Parser(add_help=False)
    _admin_options(shared, default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="admin_command", metavar="ACTION", required=True)

    def action(name: str, summary: str) -> argparse.ArgumentParser:
        made: argparse.ArgumentParser = sub.add_parser(
            name, help=summary, description=summary, parents=[shared]
        )
        return made

    action("updates", "list updates and their status per group")
    for name in ("approve", "decline", "reset"):
        a = action(name, f"{name} an update")
        a.add_argument("product", help="the product, as published")
        a.add_argument("version", help="its version")
        a.add_argument("--group", help="only for this group (default: every group)")
        a.add_argument(
            "--new-group",
            action="store_true",
            help="the --group is new: no agent has reported it yet (else it must be known)",
        )
        if name == "approve":
            a.add_argument(
                "--mode",
                choices=["forced", "on-demand"],
                default="forced",
                help="forced: installed at the next check-in; on-demand: agents may defer",
            )
    e = action("accept-eula", "accept the EULA at a target path")
    e.add_argument("path", help="the EULA's target path")
    st = action("settings", "show settings, or change them with --set")
    st.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="e.g. --set relays_only=true --set beta_groups='[\"pilot\"]'; a saved "
        "setting overrides the configuration's [policy] value",
    )
    st.add_argument(
        "--unset",
        action="append",
        default=[],
        metavar="KEY",
        help="forget a saved setting: it follows the configuration again",
    )
    gs = action("groups", "show a group's agent settings (schedule, events...), or change them")
    gs.add_argument("group", help="the agent group, e.g. default")
    gs.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="e.g. --set poll_seconds=600 --set schedule="
        '\'[{"days": ["sat"], "start": "02:00", "window": "2h"}]\' '
        '--set actions=\'{"after_install": ["scan-now"]}\'',
    )
    action("agents", "list agents, their versions and last outcome")
    rp = action("report", "the fleet report: one row per agent and product, with state and reason")
    rp.add_argument("--csv", action="store_true", help="print RFC 4180 CSV, as the API sends it")
    rp.add_argument("--state", choices=[str(s) for s in FleetState], help="only this state")
    rp.add_argument("--group", help="only this group")
    rp.add_argument("--product", help="only this product")
    action("versions", "agents per product, version and group, and by state")
    action("audit", "show the audit log")
    action("sync", "sync with the upstream now (and wait for it)")


# -- demo ------------------------------------------------------------------------


def _demo_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agents", type=int, default=20, help="number of agents")
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="leave origin and relay up afterwards and print their URLs",
    )


# -- publish ---------------------------------------------------------------------


def _expires_arg(text: str) -> tuple[str, float]:
    role, sep, duration = text.partition("=")
    if not sep:
        msg = f"expected ROLE=DURATION (e.g. timestamp=1d), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    try:
        return role, parse_duration(duration)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text}: {e}") from None


def _publish_parser(p: argparse.ArgumentParser) -> None:
    p.epilog = "A failed command prints one line, exits 1 and leaves REPO unchanged."
    sub = p.add_subparsers(dest="publish_command", metavar="ACTION", required=True)

    init = sub.add_parser("init", help="create a repository with fresh keys")
    init.add_argument("repo", type=Path, help="repository directory (must be new or empty)")
    init.add_argument("--root-keys", type=int, default=1, metavar="N", help="root keys")
    init.add_argument(
        "--root-threshold", type=int, default=1, metavar="M", help="root signatures needed"
    )
    init.add_argument(
        "--expires",
        type=_expires_arg,
        action="append",
        default=[],
        metavar="ROLE=DURATION",
        help="expiry period of a role, e.g. timestamp=1d (root 365d, targets 90d, "
        "snapshot 30d, timestamp 1d); kept in REPO for later signings",
    )

    add = sub.add_parser("add", help="add a target <product>/<version>/<file name> and re-sign")
    add.add_argument("repo", type=Path, help="repository directory")
    add.add_argument("file", type=Path, help="the file to publish")
    add.add_argument("--product", required=True, help="product name")
    add.add_argument("--version", required=True, help="SemVer 2.0, e.g. 1.4.2")
    add.add_argument("--kind", default="software", help="software | content | config")
    add.add_argument("--severity", default="normal", help="critical | normal")
    add.add_argument("--channel", default="stable", help="stable | beta")
    add.add_argument("--eula", metavar="TARGETPATH", help="target path of the licence text")
    add.add_argument(
        "--action",
        dest="actions",
        action="append",
        default=[],
        metavar="NAME",
        help="post-install action for agents (repeatable)",
    )

    lst = sub.add_parser("list", help="list targets")
    lst.add_argument("repo", type=Path, help="repository directory")

    rm = sub.add_parser("remove", help="remove a target and re-sign")
    rm.add_argument("repo", type=Path, help="repository directory")
    rm.add_argument("target_path", metavar="TARGETPATH", help="<product>/<version>/<file name>")

    ref = sub.add_parser("refresh", help="re-sign the timestamp (for a cron job)")
    ref.add_argument("repo", type=Path, help="repository directory")

    rot = sub.add_parser(
        "rotate", help="replace the keys of a role (signs a new root with a renewed expiry)"
    )
    rot.add_argument("repo", type=Path, help="repository directory")
    rot.add_argument(
        "--role",
        required=True,
        choices=["root", "targets", "snapshot", "timestamp"],
        help="the role whose keys are replaced",
    )


# -- serve -----------------------------------------------------------------------


def _serve_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML configuration file")
    _serve_flags(p)


def _serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--upstream",
        action="append",
        metavar="URL",
        help="upstream base URL (repeat for failover, in order)",
    )
    p.add_argument("--trusted-root", type=Path, metavar="FILE", help="the pinned root.json")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="relay.data_dir")
    p.add_argument("--listen", metavar="HOST:PORT", help="relay.listen")
    p.add_argument("--log-format", choices=["text", "json"], help="relay.log_format")
    p.add_argument(
        "--admin-token-file",
        type=Path,
        metavar="FILE",
        help="admin.token_file: the admin bearer token (without one the admin API is off)",
    )


# -- config ----------------------------------------------------------------------


def _config_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    for name, summary in (
        ("check", 'load and validate the configuration: print "ok" or the error (exit 3)'),
        ("show", "print the configuration in force as TOML, with where each value came from"),
    ):
        a = sub.add_parser(name, help=summary, description=summary)
        a.add_argument(
            "--config", type=Path, help="TOML configuration file (default: built-in defaults)"
        )
        _serve_flags(a)  # the flags of `relay serve`, to check a command line too


# -- export ----------------------------------------------------------------------


def _export_parser(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Exit 1 when the metadata does not verify or a stored blob does not match its "
        "signed hash: OUT is then left as it was."
    )
    p.add_argument("out", type=Path, metavar="OUT", help="the tree to write (created if missing)")
    p.add_argument("--config", type=Path, help="the relay's TOML configuration file")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="the relay's data directory")
    p.add_argument(
        "--trusted-root",
        type=Path,
        metavar="FILE",
        help="the pinned root.json (default: upstream.trusted_root, else the oldest stored root)",
    )
    p.add_argument(
        "--check-kept", action="store_true", help="hash the targets already in OUT again"
    )
    p.add_argument(
        "--copy",
        action="store_true",
        help="copy targets instead of hard-linking them from the store (same filesystem)",
    )


# -- state -----------------------------------------------------------------------


def _state_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="state_command", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="check the state database (SQLite integrity)")
    check.add_argument("--config", type=Path, help="TOML configuration file")
    check.add_argument("--data-dir", type=Path, metavar="DIR", help="relay.data_dir")
    check.add_argument(
        "--repair",
        action="store_true",
        help="move a damaged database aside and start an empty one (stop the relay first)",
    )


# -- agent -----------------------------------------------------------------------


def _agent_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML configuration file ([agent] section)")
    p.add_argument("--relay", action="append", metavar="URL", help="relay URL (repeat, in order)")
    p.add_argument("--origin", metavar="URL", help="origin URL, used only without relays-only")
    p.add_argument(
        "--relays-only", action="store_true", default=None, help="never fall back to the origin"
    )
    p.add_argument("--trusted-root", type=Path, metavar="FILE", help="agent.trusted_root")
    p.add_argument("--state-dir", type=Path, metavar="DIR", help="agent.state_dir")
    p.add_argument("--install-dir", type=Path, metavar="DIR", help="agent.install_dir")
    p.add_argument("--id", dest="agent_id", metavar="ID", help="agent.id")
    p.add_argument("--group", metavar="G", help="agent.group")
    p.add_argument(
        "--defer",
        type=int,
        metavar="DAYS",
        help="defer on-demand updates by this many days: one of policy.deferral_days",
    )
    p.add_argument("--install-command", metavar="CMD", help="agent.install_command")
    p.add_argument("--once", action="store_true", help="run once and exit (else poll)")


# -- all commands ----------------------------------------------------------------

# name: (adds its arguments, its line in ``relay --help``, its ``relay <name> --help`` text)
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], str, str]] = {
    "publish": (
        _publish_parser,
        "create and sign a TUF repository (the vendor side)",
        (
            "Create and sign the TUF repository that relays mirror. Serve REPO/public "
            "with any static web server; private keys stay in REPO/keys."
        ),
    ),
    "serve": (
        _serve_parser,
        "run a relay",
        (
            "Run a relay that mirrors and verifies an upstream TUF repository. "
            "Flags override --config, which overrides built-in defaults; "
            "RELAY_<SECTION>__<KEY> variables sit between the file and the flags."
        ),
    ),
    "export": (
        _export_parser,
        "write a relay's verified data as a static tree for any web server",
        (
            "Write OUT/metadata and OUT/targets/<dir>/<sha256>.<name> from the relay's data "
            "directory, verified again and hash-checked, so that a plain web server (or a CDN "
            "origin) can serve stock TUF clients. Incremental; timestamp.json is written last."
        ),
    ),
    "config": (
        _config_parser,
        "check a relay's configuration, or show it with the source of each value",
        (
            "Load the configuration as `relay serve` would (the file, RELAY_<SECTION>__<KEY> "
            "variables, then the flags) and check it, or print it with where each value "
            "came from. Secrets are hidden."
        ),
    ),
    "agent": (
        _agent_parser,
        "run the reference update agent",
        (
            "Check in with a relay, update what it offers (delta or full, verified "
            "with TUF), install, and report. Flags override --config ([agent] section)."
        ),
    ),
    "demo": (
        _demo_parser,
        "run an origin, a relay and agents on loopback, then summarise",
        (
            "Publish three versions of a sample product, serve them through a relay "
            "and update N agents; print what crossed the WAN and what deltas saved."
        ),
    ),
    "state": (
        _state_parser,
        "check the state database, or move a damaged one aside",
        (
            "Check <data_dir>/state (approvals, settings, agents, audit log): SQLite's "
            "integrity check, and an empty database where the data directory was used "
            "before. Exit 1 when damaged; --repair moves it aside and starts an empty one."
        ),
    ),
    "admin": (
        _admin_parser,
        "approvals, settings, EULAs, agents and audit log of a relay",
        (
            "Call a relay's admin API. The bearer token comes from --token-file or the "
            "RELAY_ADMIN__TOKEN environment variable (the one relay serve reads). "
            "Options may come before or after the action."
        ),
    ),
}


def make_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every working subcommand."""
    parser = _Parser(
        prog="relay",
        description="A verifying update relay for fleets of endpoint agents.",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add_arguments, summary, description) in _COMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=summary, description=description))
    return parser


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    parser = make_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        command = importlib.import_module(f"relay.cli.{args.command}")
        result: int = command.run(args)
    except ConfigError as e:
        print(f"relay: configuration error: {e}", file=sys.stderr)
        return ExitCode.CONFIG
    except StartupError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"relay: cannot start: {e}", file=sys.stderr)
        return ExitCode.STARTUP
    except PublishError as e:
        # One line, whatever the message holds: scripts and cron mail read the first line.
        print(f"relay publish: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return ExitCode.FAILURE
    except RelayError as e:
        print(f"relay: error: {e}", file=sys.stderr)
        return ExitCode.FAILURE
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    return result


if __name__ == "__main__":
    sys.exit(main())
