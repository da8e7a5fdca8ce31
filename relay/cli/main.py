"""Command line: ``relay <command>``.

One ``_<cmd>_parser(subparsers)`` per command, a separate :func:`make_parser`,
and :func:`main` mapping domain errors to exit codes in one place.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from relay import __version__
from relay.config import load_config
from relay.core.units import parse_duration
from relay.errors import ConfigError, PublishError, RelayError
from relay.publisher.repository import Repository, format_table

if TYPE_CHECKING:
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]  # noqa: SLF001

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_INTERRUPTED = 130

_EPILOG = """\
exit codes:
  0    success
  1    the command failed (the message says why; nothing was changed)
  2    usage error (bad arguments)
  3    configuration error (names the key and the file or variable)
  130  interrupted
"""


def make_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every working subcommand."""
    parser = argparse.ArgumentParser(
        prog="relay",
        description="A verifying update relay for fleets of endpoint agents.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _publish_parser(subparsers)
    _serve_parser(subparsers)
    _agent_parser(subparsers)
    _demo_parser(subparsers)
    _admin_parser(subparsers)
    return parser


# -- admin -----------------------------------------------------------------------


def _admin_parser(subparsers: _SubParsers) -> None:
    p = subparsers.add_parser(
        "admin",
        help="approvals, settings, EULAs, agents and audit log of a relay",
        description="Call a relay's admin API. The bearer token comes from --token-file "
        "or the RELAY_ADMIN_TOKEN environment variable.",
    )
    p.add_argument("--url", default="http://127.0.0.1:8080/", help="the relay's base URL")
    p.add_argument("--token-file", type=Path, help="file holding the admin token")
    sub = p.add_subparsers(dest="admin_command", metavar="ACTION", required=True)
    sub.add_parser("updates", help="list updates and their status per group")
    for name in ("approve", "decline", "reset"):
        a = sub.add_parser(name, help=f"{name} an update")
        a.add_argument("product")
        a.add_argument("version")
        a.add_argument("--group", help="only for this group (default: every group)")
        if name == "approve":
            a.add_argument("--mode", choices=["forced", "on-demand"], default="forced")
    e = sub.add_parser("accept-eula", help="accept the EULA at a target path")
    e.add_argument("path")
    st = sub.add_parser("settings", help="show settings, or change them with --set")
    st.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="e.g. --set relays_only=true --set beta_groups='[\"pilot\"]'",
    )
    sub.add_parser("agents", help="list agents, their versions and last outcome")
    sub.add_parser("audit", help="show the audit log")
    sub.add_parser("sync", help="sync with the upstream now")
    p.set_defaults(func=_cmd_admin)


def _cmd_admin(args: argparse.Namespace) -> int:
    from relay.cli import admin as admin_cli  # noqa: PLC0415

    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as e:
            raise ConfigError(
                "--token-file",
                str(args.token_file),
                "command line",
                f"cannot be read: {e.strerror}",
            ) from None
    else:
        token = os.environ.get("RELAY_ADMIN_TOKEN", "")
    if not token:
        raise ConfigError(
            "--token-file", None, "command line", "give --token-file or set RELAY_ADMIN_TOKEN"
        )
    call = functools.partial(admin_cli.request, args.url, token)
    cmd = args.admin_command
    if cmd == "updates":
        print(admin_cli.render_updates(call("GET", "/v1/admin/updates")))
    elif cmd in ("approve", "decline", "reset"):
        status = {"approve": "approved", "decline": "declined", "reset": "undefined"}[cmd]
        body = {
            "product": args.product,
            "version": args.version,
            "status": status,
            "group": args.group,
            "mode": getattr(args, "mode", "forced"),
        }
        call("POST", "/v1/admin/approvals", body)
        print(
            f"{args.product} {args.version}: {status}"
            f"{' for ' + args.group if args.group else ' for every group'}"
        )
    elif cmd == "accept-eula":
        call("POST", "/v1/admin/eulas", {"path": args.path})
        print(f"accepted {args.path}")
    elif cmd == "settings":
        changes = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError("--set", item, "command line", "expected KEY=JSON")
            try:
                changes[key] = json.loads(value)
            except ValueError:
                changes[key] = value
        data = (
            call("PUT", "/v1/admin/settings", changes)
            if changes
            else call("GET", "/v1/admin/settings")
        )
        print(
            admin_cli.table(
                sorted((k, json.dumps(v)) for k, v in data.items()), ("SETTING", "VALUE")
            )
        )
    elif cmd == "agents":
        print(admin_cli.render_agents(call("GET", "/v1/admin/agents")))
    elif cmd == "audit":
        print(admin_cli.render_audit(call("GET", "/v1/admin/audit")))
    else:
        print(call("POST", "/v1/admin/sync")["result"])
    return EXIT_OK


# -- demo ------------------------------------------------------------------------


def _demo_parser(subparsers: _SubParsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run an origin, a relay and agents on loopback, then summarise",
        description="Publish three versions of a sample product, serve them through a relay "
        "and update N agents; print what crossed the WAN and what deltas saved.",
    )
    p.add_argument("--agents", type=int, default=20, help="number of agents (20)")
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="leave origin and relay up afterwards and print their URLs",
    )
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from relay.cli.demo import run_demo  # noqa: PLC0415

    if args.agents < 1:
        msg = "--agents must be at least 1"
        raise ConfigError("--agents", args.agents, "command line", msg)
    return asyncio.run(run_demo(args.agents, args.keep_running))


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


def _publish_parser(subparsers: _SubParsers) -> None:
    p = subparsers.add_parser(
        "publish",
        help="create and sign a TUF repository (the vendor side)",
        description="Create and sign the TUF repository that relays mirror. Serve REPO/public "
        "with any static web server; private keys stay in REPO/keys.",
        epilog="A failed command prints one line, exits 1 and leaves REPO unchanged.",
    )
    sub = p.add_subparsers(dest="publish_command", metavar="ACTION", required=True)

    init = sub.add_parser("init", help="create a repository with fresh keys")
    init.add_argument("repo", type=Path, help="repository directory (must be new or empty)")
    init.add_argument("--root-keys", type=int, default=1, metavar="N", help="root keys (1)")
    init.add_argument(
        "--root-threshold", type=int, default=1, metavar="M", help="root signatures needed (1)"
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
    init.set_defaults(func=_cmd_publish_init)

    add = sub.add_parser("add", help="add a target <product>/<version>/<file name> and re-sign")
    add.add_argument("repo", type=Path)
    add.add_argument("file", type=Path)
    add.add_argument("--product", required=True)
    add.add_argument("--version", required=True, help="SemVer 2.0, e.g. 1.4.2")
    add.add_argument("--kind", default="software", help="software | content | config")
    add.add_argument("--severity", default="normal", help="critical | normal")
    add.add_argument("--channel", default="stable", help="stable | beta")
    add.add_argument("--eula", metavar="TARGETPATH", help="target path of the licence text")
    add.add_argument(
        "--action",
        action="append",
        default=[],
        metavar="NAME",
        help="post-install action for agents (repeatable)",
    )
    add.set_defaults(func=_cmd_publish_add)

    lst = sub.add_parser("list", help="list targets")
    lst.add_argument("repo", type=Path)
    lst.set_defaults(func=_cmd_publish_list)

    rm = sub.add_parser("remove", help="remove a target and re-sign")
    rm.add_argument("repo", type=Path)
    rm.add_argument("target_path", metavar="TARGETPATH")
    rm.set_defaults(func=_cmd_publish_remove)

    ref = sub.add_parser("refresh", help="re-sign the timestamp (for a cron job)")
    ref.add_argument("repo", type=Path)
    ref.set_defaults(func=_cmd_publish_refresh)

    rot = sub.add_parser(
        "rotate", help="replace the keys of a role (signs a new root with a renewed expiry)"
    )
    rot.add_argument("repo", type=Path)
    rot.add_argument("--role", required=True, choices=["root", "targets", "snapshot", "timestamp"])
    rot.set_defaults(func=_cmd_publish_rotate)


def _cmd_publish_init(args: argparse.Namespace) -> int:
    repo = Repository.init(
        args.repo,
        root_keys=args.root_keys,
        root_threshold=args.root_threshold,
        expires=dict(args.expires),
    )
    print(f"created {repo.path}: serve {repo.public_dir}")
    print(f"root keys in {repo.keys_dir / 'root'} (keep them offline when not signing)")
    print(f"relays and agents pin {repo.metadata_dir / '1.root.json'}")
    return EXIT_OK


def _cmd_publish_add(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo)
    target = repo.add(
        args.file,
        product=args.product,
        version=args.version,
        kind=args.kind,
        severity=args.severity,
        channel=args.channel,
        eula=args.eula,
        actions=args.action,
    )
    print(f"added {target.path} ({target.length} bytes, sha256 {target.sha256})")
    return EXIT_OK


def _cmd_publish_list(args: argparse.Namespace) -> int:
    targets = Repository.open(args.repo).targets()
    print(format_table(targets) if targets else f"no targets in {args.repo}")
    return EXIT_OK


def _cmd_publish_remove(args: argparse.Namespace) -> int:
    Repository.open(args.repo).remove(args.target_path)
    print(f"removed {args.target_path}")
    return EXIT_OK


def _cmd_publish_refresh(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo)
    repo.refresh()
    expiry = repo.expiry()
    print(f"timestamp re-signed; expires {expiry['timestamp'].isoformat()}")
    # refresh signs the timestamp only: say so when another role will expire first.
    for role in ("snapshot", "targets", "root"):
        if expiry[role] <= expiry["timestamp"]:
            print(
                f"relay publish: warning: {role} metadata expires {expiry[role].isoformat()}, "
                "before this timestamp; re-sign it (add, remove or rotate)",
                file=sys.stderr,
            )
    return EXIT_OK


def _cmd_publish_rotate(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo)
    repo.rotate(args.role)
    version = json.loads(repo.root_bytes())["signed"]["version"]
    print(f"rotated the {args.role} keys; published {version}.root.json")
    return EXIT_OK


# -- serve -----------------------------------------------------------------------


def _serve_parser(subparsers: _SubParsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run a relay",
        description="Run a relay that mirrors and verifies an upstream TUF repository. "
        "Flags override --config, which overrides built-in defaults; "
        "RELAY_<SECTION>__<KEY> variables sit between the file and the flags.",
    )
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument(
        "--upstream",
        action="append",
        metavar="URL",
        help="upstream base URL (repeat for failover, in order)",
    )
    p.add_argument("--trusted-root", type=Path, metavar="FILE", help="the pinned root.json")
    p.add_argument("--data-dir", type=Path, metavar="DIR")
    p.add_argument("--listen", metavar="HOST:PORT")
    p.add_argument("--log-format", choices=["text", "json"])
    p.set_defaults(func=_cmd_serve)


def _serve_overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {}
    if args.upstream:
        overrides["upstream.urls"] = list(args.upstream)
    if args.trusted_root is not None:
        overrides["upstream.trusted_root"] = str(args.trusted_root)
    if args.data_dir is not None:
        overrides["relay.data_dir"] = str(args.data_dir)
    if args.listen is not None:
        overrides["relay.listen"] = args.listen
    if args.log_format is not None:
        overrides["relay.log_format"] = args.log_format
    return overrides


# -- agent -----------------------------------------------------------------------


def _agent_parser(subparsers: _SubParsers) -> None:
    p = subparsers.add_parser(
        "agent",
        help="run the reference update agent",
        description="Check in with a relay, update what it offers (delta or full, verified "
        "with TUF), install, and report. Flags override --config ([agent] section).",
    )
    p.add_argument("--config", type=Path, help="TOML configuration file ([agent] section)")
    p.add_argument("--relay", action="append", metavar="URL", help="relay URL (repeat, in order)")
    p.add_argument("--origin", metavar="URL", help="origin URL, used only without relays-only")
    p.add_argument(
        "--relays-only", action="store_true", default=None, help="never fall back to the origin"
    )
    p.add_argument("--trusted-root", type=Path, metavar="FILE")
    p.add_argument("--state-dir", type=Path, metavar="DIR")
    p.add_argument("--install-dir", type=Path, metavar="DIR")
    p.add_argument("--id", dest="agent_id", metavar="ID")
    p.add_argument("--group", metavar="G")
    p.add_argument(
        "--defer",
        type=int,
        choices=[1, 3, 7],
        metavar="1|3|7",
        help="defer on-demand updates by this many days",
    )
    p.add_argument("--install-command", metavar="CMD")
    p.add_argument("--once", action="store_true", help="run once and exit (else poll)")
    p.set_defaults(func=_cmd_agent)


def _agent_overrides(args: argparse.Namespace) -> dict[str, object]:
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


def _cmd_agent(args: argparse.Namespace) -> int:
    from relay.agent.updater import Agent, AgentConfig, default_agent_id  # noqa: PLC0415

    config = load_config(args.config, os.environ, _agent_overrides(args))
    a = config.agent
    if not str(a.trusted_root) or str(a.trusted_root) == ".":
        raise ConfigError(
            "agent.trusted_root",
            None,
            config.source_of("agent.trusted_root"),
            "is required (--trusted-root)",
        )
    if not a.relays and not a.origin:
        raise ConfigError(
            "agent.relays", None, config.source_of("agent.relays"), "give --relay (or --origin)"
        )
    agent = Agent(
        AgentConfig(
            agent_id=a.id or default_agent_id(),
            trusted_root=a.trusted_root,
            state_dir=a.state_dir,
            install_dir=a.install_dir,
            relays=a.relays,
            origin=a.origin,
            group=a.group,
            relays_only=a.relays_only,
            install_command=a.install_command,
            install_timeout=a.install_timeout,
            defer_days=a.defer_days,
            accept_delta=a.accept_delta,
            actions=a.actions,
            request_timeout=a.request_timeout,
        )
    )
    setup = logging.getLogger("relay")
    setup.setLevel(logging.INFO)
    while True:
        summary = agent.run_once()
        for line in summary.installed:
            print(f"installed {line}")
        for line in summary.failed:
            print(f"failed {line}", file=sys.stderr)
        if summary.error:
            print(f"relay agent: {summary.error}", file=sys.stderr)
        elif not summary.installed and not summary.failed:
            print(f"up to date (via {summary.source})")
        if args.once:
            return EXIT_OK if not summary.error and not summary.failed else EXIT_FAILURE
        poll = 3600.0
        answer = agent.state.get("relay_answer") or {}
        if isinstance(answer, dict) and isinstance(answer.get("poll_seconds"), int):
            poll = float(answer["poll_seconds"])
        import random  # noqa: PLC0415
        import time  # noqa: PLC0415

        time.sleep(poll + random.uniform(0, a.poll_jitter))


def _cmd_serve(args: argparse.Namespace) -> int:
    from relay.server.run import serve, setup_logging  # noqa: PLC0415 - heavy imports

    config = load_config(args.config, os.environ, _serve_overrides(args))
    setup_logging(config.relay.log_format, logging.INFO - 10 * min(args.verbose, 1))
    asyncio.run(serve(config))
    return EXIT_OK


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    parser = make_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        result: int = args.func(args)
    except ConfigError as e:
        print(f"relay: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except PublishError as e:
        # One line, whatever the message holds: scripts and cron mail read the first line.
        print(f"relay publish: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return EXIT_FAILURE
    except RelayError as e:
        print(f"relay: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return result


if __name__ == "__main__":
    sys.exit(main())
