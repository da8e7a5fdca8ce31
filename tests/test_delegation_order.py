"""Delegations are resolved in the order TUF clients use (pre-order depth-first, terminating).

Each case builds a repository whose delegation tree makes breadth-first and depth-first
search disagree, verifies it with the relay's TrustSession, and asks the stock python-tuf
client (over an in-memory fetcher, the real ``Updater``) which target it resolves: the relay
must offer exactly what the client would install.
"""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from relay.core.verify import TrustSession

PATH = "app/1.0.0/a.bin"
SER = JSONSerializer(compact=True)


class _MemoryFetcher(FetcherInterface):
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def _fetch(self, url: str):
        name = url.rsplit("/metadata/", 1)[-1]
        if name not in self.files:
            from tuf.api.exceptions import DownloadHTTPError

            raise DownloadHTTPError(f"{url} not found", 404)
        return iter([self.files[name]])


def _target(content: bytes) -> TargetFile:
    tf = TargetFile.from_data(PATH, content, ["sha256"])
    tf.unrecognized_fields["custom"] = {"product": "app", "version": "1.0.0", "kind": "content"}
    return tf


def _repo(tree: dict[str, list[tuple[str, bool]]], holders: dict[str, bytes]) -> dict[str, bytes]:
    """Metadata files of a repository.

    ``tree`` maps a role to its delegations (child name, terminating), all covering
    ``app/*/*``; ``holders`` maps a role to the content it signs for ``PATH``.
    """
    expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=1)
    names = {"targets", *tree, *holders, *(c for kids in tree.values() for c, _ in kids)}
    signers = {
        name: CryptoSigner.generate_ed25519() for name in {"root", "timestamp", "snapshot", *names}
    }
    root = Metadata(Root(expires=expires, consistent_snapshot=True))
    for role in ("root", "timestamp", "snapshot", "targets"):
        root.signed.add_key(signers[role].public_key, role)
    roles: dict[str, Metadata[Targets]] = {}
    for name in names:
        md = Metadata(Targets(version=1, expires=expires))
        if name in holders:
            md.signed.targets[PATH] = _target(holders[name])
        kids = tree.get(name, [])
        if kids:
            md.signed.delegations = Delegations(
                keys={signers[c].public_key.keyid: signers[c].public_key for c, _ in kids},
                roles={
                    c: DelegatedRole(
                        name=c,
                        keyids=[signers[c].public_key.keyid],
                        threshold=1,
                        terminating=term,
                        paths=["app/*/*"],
                    )
                    for c, term in kids
                },
            )
        md.sign(signers[name])
        roles[name] = md
    root.sign(signers["root"])
    files = {"1.root.json": root.to_bytes(SER)}
    snap = Metadata(Snapshot(version=1, expires=expires))
    for name, md in roles.items():
        files[f"1.{name}.json"] = md.to_bytes(SER)
        snap.signed.meta[f"{name}.json"] = MetaFile(version=1)
    snap.sign(signers["snapshot"])
    files["1.snapshot.json"] = snap.to_bytes(SER)
    ts = Metadata(Timestamp(version=1, expires=expires, snapshot_meta=MetaFile(version=1)))
    ts.sign(signers["timestamp"])
    files["timestamp.json"] = ts.to_bytes(SER)
    return files


def _relay_offers(files: dict[str, bytes]) -> str | None:
    session = TrustSession(files["1.root.json"])
    session.update_timestamp(files["timestamp.json"])
    session.update_snapshot(files["1.snapshot.json"])
    for role, delegator, version, _ in session.roles_to_load():
        session.update_targets(role, delegator, files[f"{version}.{role}.json"])
    target = session.result().targets.get(PATH)
    return target.sha256 if target is not None else None


def _client_resolves(files: dict[str, bytes], tmp_path) -> str | None:
    updater = Updater(
        str(tmp_path),
        "https://origin.invalid/metadata/",
        str(tmp_path),
        "https://origin.invalid/targets/",
        fetcher=_MemoryFetcher(files),
        bootstrap=files["1.root.json"],
    )
    updater.refresh()
    info = updater.get_targetinfo(PATH)
    return info.hashes["sha256"] if info is not None else None


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


CASES = {
    # targets -> A -> A1 (signs x), targets -> B (signs y): depth-first finds A1 first,
    # breadth-first would find B first.
    "depth-first-before-breadth": (
        {"targets": [("a", False), ("b", False)], "a": [("a1", False)]},
        {"a1": b"deep", "b": b"shallow"},
        b"deep",
    ),
    # A is terminating and covers the path but holds nothing below it: B is never searched.
    "terminating-ends-the-search": (
        {"targets": [("a", True), ("b", False)], "a": [("a1", False)]},
        {"b": b"after-terminating"},
        None,
    ),
    # Listed order decides between siblings that both sign the path.
    "listed-order-between-siblings": (
        {"targets": [("b", False), ("a", False)]},
        {"a": b"second", "b": b"first"},
        b"first",
    ),
    # A terminating child that holds the path wins over the later sibling.
    "terminating-child-holds-it": (
        {"targets": [("a", False), ("b", False)], "a": [("a1", True), ("a2", False)]},
        {"a1": b"term", "a2": b"never", "b": b"late"},
        b"term",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_relay_offers_what_the_tuf_client_resolves(case, tmp_path):
    tree, holders, expected = CASES[case]
    files = _repo(tree, holders)
    client = _client_resolves(files, tmp_path)
    assert client == (_sha(expected) if expected is not None else None)
    assert _relay_offers(files) == client
