"""TrustSession: the one wrapper of python-tuf's private TrustedMetadataSet.

These tests pin the behaviour relay relies on, so a python-tuf upgrade that changes
it fails here first.
"""

from __future__ import annotations

import datetime as dt
import os

import pytest
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from relay.core.verify import TimestampOutcome, TrustSession, root_version
from relay.errors import MetadataRejectedError
from tests.support import released


@pytest.fixture
def repo(repo):
    return released(repo, os.urandom(1000), "a.bin", product="a", version="1.0.0")


def _md(repo, name):
    return (repo.metadata_dir / name).read_bytes()


def _session(repo, previous=None):
    s = TrustSession(repo.root_bytes(1))
    v = 2
    while (repo.metadata_dir / f"{v}.root.json").exists():
        s.update_root(_md(repo, f"{v}.root.json"))
        v += 1
    if previous is not None:
        s.load_trusted_timestamp(previous.files["timestamp.json"])
    return s


def _full(repo, previous=None):
    s = _session(repo, previous)
    outcome = s.update_timestamp(_md(repo, "timestamp.json"))
    if outcome is TimestampOutcome.UNCHANGED:
        return outcome, previous
    s.update_snapshot(_md(repo, f"{s.snapshot_version}.snapshot.json"))
    for role, delegator, version, _ in s.roles_to_load():
        s.update_targets(role, delegator, _md(repo, f"{version}.{role}.json"))
    return outcome, s.result(previous)


def test_verified_generation_is_byte_exact(repo):
    outcome, verified = _full(repo)
    assert outcome is TimestampOutcome.NEW
    assert verified.files["timestamp.json"] == _md(repo, "timestamp.json")
    assert set(verified.targets) == {"a/1.0.0/a.bin"}
    t = verified.targets["a/1.0.0/a.bin"]
    assert verified.target_for_url(t.url_path) == t
    assert verified.target_for_url("a/1.0.0/" + "0" * 64 + ".a.bin") is None
    assert verified.expires > dt.datetime.now(dt.UTC)


def test_same_timestamp_is_unchanged_and_older_is_a_rollback(repo):
    _, first = _full(repo)
    outcome, _ = _full(repo, first)
    assert outcome is TimestampOutcome.UNCHANGED
    old_ts = _md(repo, "timestamp.json")
    repo.refresh()
    _, second = _full(repo, first)
    s = _session(repo, second)
    with pytest.raises(MetadataRejectedError) as info:
        s.update_timestamp(old_ts)
    assert info.value.role == "timestamp"
    assert "BadVersionNumberError" in str(info.value)


def test_targets_version_must_match_snapshot(repo):
    _, first = _full(repo)
    old_targets_name = next(n for n in first.files if n.endswith(".targets.json"))
    repo.add_bytes(b"x" * 10, "b.bin", product="b", version="1.0.0")
    s = _session(repo, first)
    s.update_timestamp(_md(repo, "timestamp.json"))
    s.update_snapshot(_md(repo, f"{s.snapshot_version}.snapshot.json"))
    ((role, delegator, _, _),) = list(s.roles_to_load())
    with pytest.raises(MetadataRejectedError, match="targets"):
        s.update_targets(role, delegator, first.files[old_targets_name])


def test_expired_and_forged(repo):
    md = Metadata.from_bytes(_md(repo, "timestamp.json"))
    md.signed.expires = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=5)
    md.signed.version += 1
    md.signatures.clear()
    md.sign(repo.signer("timestamp"))
    s = _session(repo)
    with pytest.raises(MetadataRejectedError, match="Expired"):
        s.update_timestamp(md.to_bytes(JSONSerializer()))
    md.signatures.clear()
    md.sign(repo.signer("targets"))  # the wrong role's key
    with pytest.raises(MetadataRejectedError, match="timestamp"):
        _session(repo).update_timestamp(md.to_bytes(JSONSerializer()))


def test_root_chain_and_bad_root(repo):
    repo.rotate("root")
    s = TrustSession(repo.root_bytes(1))
    assert s.next_root_version == 2
    s.update_root(repo.root_bytes(2))
    assert s.root.version == 2
    assert root_version(repo.root_bytes(2)) == 2
    with pytest.raises(MetadataRejectedError):
        TrustSession(b"{}")
    with pytest.raises(MetadataRejectedError):
        TrustSession(repo.root_bytes(1)).update_root(repo.root_bytes(1))
