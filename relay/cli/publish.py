"""``relay publish``: the vendor's repository from the command line."""

from __future__ import annotations

import argparse
import json
import sys

from relay.cli.exitcodes import ExitCode
from relay.publisher.repository import ReleaseFields, Repository, format_table


def _init(args: argparse.Namespace) -> None:
    repo = Repository.init(
        args.repo,
        root_keys=args.root_keys,
        root_threshold=args.root_threshold,
        expires=dict(args.expires),
    )
    print(f"created {repo.path}: serve {repo.public_dir}")
    print(f"root keys in {repo.keys_dir / 'root'} (keep them offline when not signing)")
    print(f"relays and agents pin {repo.metadata_dir / '1.root.json'}")


def _add(args: argparse.Namespace) -> None:
    fields = {key: getattr(args, key) for key in ReleaseFields.__annotations__}
    target = Repository.open(args.repo).add(args.file, **fields)
    print(f"added {target.path} ({target.length} bytes, sha256 {target.sha256})")


def _list(args: argparse.Namespace) -> None:
    targets = Repository.open(args.repo).targets()
    print(format_table(targets) if targets else f"no targets in {args.repo}")


def _remove(args: argparse.Namespace) -> None:
    Repository.open(args.repo).remove(args.target_path)
    print(f"removed {args.target_path}")


def _refresh(args: argparse.Namespace) -> None:
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


def _rotate(args: argparse.Namespace) -> None:
    repo = Repository.open(args.repo)
    repo.rotate(args.role)
    version = json.loads(repo.root_bytes())["signed"]["version"]
    print(f"rotated the {args.role} keys; published {version}.root.json")


_ACTIONS = {
    "init": _init,
    "add": _add,
    "list": _list,
    "remove": _remove,
    "refresh": _refresh,
    "rotate": _rotate,
}


def run(args: argparse.Namespace) -> int:
    """Run ``relay publish <action>``.

    Raises:
        PublishError: the action failed; the repository is unchanged.
    """
    _ACTIONS[args.publish_command](args)
    return ExitCode.OK
