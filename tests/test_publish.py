"""The publisher's repository: layout, keys, targets, signing order, rotation, locking."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import stat
import threading

import pytest
from tuf.api.metadata import Metadata

from relay.cli.main import main
from relay.errors import PublishError
from relay.publisher import repository as publish
from relay.publisher.repository import DEFAULT_EXPIRES, Repository, format_table


def _signed(path):
    return json.loads(path.read_bytes())["signed"]


def _current(repo, role):
    """The current ``signed`` object of a role, following timestamp -> snapshot -> targets."""
    md = repo.metadata_dir
    ts = _signed(md / "timestamp.json")
    if role == "timestamp":
        return ts
    snap = _signed(md / f"{ts['meta']['snapshot.json']['version']}.snapshot.json")
    if role == "snapshot":
        return snap
    return _signed(md / f"{snap['meta']['targets.json']['version']}.targets.json")


def _expires(signed) -> dt.datetime:
    return dt.datetime.fromisoformat(signed["expires"])


def _assert_keys_private(repo_path):
    keys = repo_path / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    pems = []
    for p in keys.rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
        if p.is_file():
            pems.append(p)
    assert pems
    for f in (repo_path / "public").rglob("*"):
        assert f.suffix != ".pem", f
        if f.is_file():
            assert b"PRIVATE KEY" not in f.read_bytes(), f


@pytest.fixture
def repo(tmp_path):
    return Repository.init(tmp_path / "repo")


# -- layout and keys ---------------------------------------------------------------


def test_init_layout_keys_and_default_expiry(tmp_path):
    assert main(["publish", "init", str(tmp_path / "r"), "--root-keys", "3"]) == 0
    r = tmp_path / "r"
    assert sorted(p.name for p in r.iterdir()) == ["keys", "public", "repo.json"]
    assert sorted(p.name for p in (r / "public").iterdir()) == ["metadata", "targets"]
    assert sorted(p.name for p in (r / "public/metadata").iterdir()) == [
        "1.root.json",
        "1.snapshot.json",
        "1.targets.json",
        "timestamp.json",
    ]
    assert len(list((r / "keys/root").glob("*.pem"))) == 3
    for role in ("targets", "snapshot", "timestamp"):
        assert len(list((r / "keys" / role).glob("*.pem"))) == 1
    _assert_keys_private(r)
    root = _signed(r / "public/metadata/1.root.json")
    assert root["consistent_snapshot"] is True
    assert root["roles"]["root"]["threshold"] == 1
    assert len(root["roles"]["root"]["keyids"]) == 3
    # Key files are named by the key id the root lists.
    assert {p.stem for p in (r / "keys/root").glob("*.pem")} == set(root["roles"]["root"]["keyids"])
    repo = Repository.open(r)
    now = dt.datetime.now(dt.UTC)
    for role, seconds in DEFAULT_EXPIRES.items():
        expires = repo.expiry()[role]
        assert abs((expires - now).total_seconds() - seconds) < 300, role


def test_keys_stay_private_after_rotations(repo):
    for role in ("root", "targets", "snapshot", "timestamp"):
        repo.rotate(role)
    _assert_keys_private(repo.path)
    for role in ("root", "targets", "snapshot", "timestamp"):
        assert len(list((repo.keys_dir / "retired" / role).glob("*.pem"))) == 1
        assert len(list((repo.keys_dir / role).glob("*.pem"))) == 1


def test_keys_private_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        r = Repository.init(tmp_path / "r")
        r.rotate("timestamp")
    finally:
        os.umask(old)
    _assert_keys_private(r.path)


def test_configured_expiry_is_kept_for_later_signings(tmp_path):
    argv = ["publish", "init", str(tmp_path / "r"), "--expires", "timestamp=2h"]
    assert main([*argv, "--expires", "targets=10d"]) == 0
    settings = json.loads((tmp_path / "r/repo.json").read_bytes())
    assert settings["expires"]["timestamp"] == 7200
    assert settings["expires"]["targets"] == 10 * 86400
    assert settings["expires"]["snapshot"] == DEFAULT_EXPIRES["snapshot"]
    repo = Repository.open(tmp_path / "r")  # a later command reads the periods back
    repo.add_bytes(b"a" * 10, "a.bin", product="a", version="1.0.0")
    repo.refresh()
    now = dt.datetime.now(dt.UTC)
    assert abs((_expires(_current(repo, "timestamp")) - now).total_seconds() - 7200) < 300
    assert abs((_expires(_current(repo, "targets")) - now).total_seconds() - 864000) < 300


# -- adding and listing ------------------------------------------------------------


def test_add_writes_blob_and_custom_fields(repo, tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # several read chunks
    f = tmp_path / "agent-setup.bin"
    f.write_bytes(data)
    t = repo.add(f, product="agent", version="1.2.3", severity="critical", actions=["scan-now"])
    sha = hashlib.sha256(data).hexdigest()
    assert (t.path, t.length, t.sha256) == ("agent/1.2.3/agent-setup.bin", len(data), sha)
    assert (repo.public_dir / "targets/agent/1.2.3" / f"{sha}.agent-setup.bin").read_bytes() == data
    assert t.url_path == f"agent/1.2.3/{sha}.agent-setup.bin"
    entry = _current(repo, "targets")["targets"][t.path]
    assert entry["length"] == len(data)
    assert entry["hashes"] == {"sha256": sha}
    assert entry["custom"] == {
        "product": "agent",
        "version": "1.2.3",
        "kind": "software",
        "severity": "critical",
        "channel": "stable",
        "actions": ["scan-now"],
    }
    assert repo.targets() == [t]
    # No temp file is left next to the blob.
    assert [p.name for p in (repo.public_dir / "targets/agent/1.2.3").iterdir()] == [
        f"{sha}.agent-setup.bin"
    ]


def test_add_signs_targets_snapshot_and_timestamp_in_a_chain(repo):
    before = {r: _current(repo, r)["version"] for r in ("targets", "snapshot", "timestamp")}
    repo.add_bytes(b"one", "one.bin", product="one", version="1.0.0")
    after = {r: _current(repo, r)["version"] for r in ("targets", "snapshot", "timestamp")}
    assert after == {r: v + 1 for r, v in before.items()}
    root = Metadata.from_bytes(repo.root_bytes())
    md = repo.metadata_dir
    ts = Metadata.from_bytes((md / "timestamp.json").read_bytes())
    snap = Metadata.from_bytes((md / f"{after['snapshot']}.snapshot.json").read_bytes())
    targets = Metadata.from_bytes((md / f"{after['targets']}.targets.json").read_bytes())
    for role, m in (("timestamp", ts), ("snapshot", snap), ("targets", targets)):
        root.signed.verify_delegate(role, m.signed_bytes, m.signatures)


def test_targets_sorted_by_product_then_semver(repo):
    for product, version in [
        ("b", "1.0.0"),
        ("a", "1.10.0"),
        ("a", "1.9.0"),
        ("a", "1.10.0-rc.1"),
        ("a", "1.10.0-beta.2"),
        ("a", "1.10.0-beta.11"),
    ]:
        repo.add_bytes(f"{product}{version}".encode(), "f.bin", product=product, version=version)
    assert [(t.product, t.version) for t in repo.targets()] == [
        ("a", "1.9.0"),
        ("a", "1.10.0-beta.2"),
        ("a", "1.10.0-beta.11"),
        ("a", "1.10.0-rc.1"),
        ("a", "1.10.0"),
        ("b", "1.0.0"),
    ]


def test_same_bytes_again_is_a_no_op_and_repairs_a_deleted_blob(repo, tmp_path):
    t = repo.add_bytes(b"same", "s.bin", product="s", version="1.0.0")
    blob = repo.public_dir / "targets" / t.url_path
    files = {p: p.read_bytes() for p in repo.path.rglob("*") if p.is_file()}
    assert repo.add_bytes(b"same", "s.bin", product="s", version="1.0.0") == t
    assert {p: p.read_bytes() for p in repo.path.rglob("*") if p.is_file()} == files
    blob.unlink()
    again = Repository.open(repo.path)
    assert again.add_bytes(b"same", "s.bin", product="s", version="1.0.0") == t
    assert blob.read_bytes() == b"same"
    assert {p: p.read_bytes() for p in repo.path.rglob("*") if p.is_file()} == files


def test_one_file_per_product_and_version(repo):
    repo.add_bytes(b"x", "x.bin", product="p", version="1.0.0+build.1")
    with pytest.raises(PublishError, match="already published as p/1.0.0"):
        repo.add_bytes(b"y", "y.bin", product="p", version="1.0.0")  # same precedence
    with pytest.raises(PublishError, match="other fields"):
        repo.add_bytes(b"x", "x.bin", product="p", version="1.0.0+build.1", severity="critical")
    repo.add_bytes(b"x", "x.bin", product="p", version="1.0.0-rc.1")  # another version
    repo.add_bytes(b"x", "x.bin", product="q", version="1.0.0")  # another product


@pytest.mark.parametrize("name", ["../x", ".hidden", "a b", "a/b", "x?y", "é.bin", "", "a" * 129])
def test_unusable_file_names_refused(repo, name):
    with pytest.raises(PublishError, match="file name"):
        repo.add_bytes(b"x", name, product="p", version="1.0.0")
    assert repo.targets() == []


def test_eula_must_be_a_published_target(repo):
    with pytest.raises(PublishError, match="publish the licence text first"):
        repo.add_bytes(b"app", "app.bin", product="app", version="1.0.0", eula="legal/1.0.0/l.txt")
    repo.add_bytes(b"licence", "l.txt", product="legal", version="1.0.0", kind="config")
    t = repo.add_bytes(b"app", "app.bin", product="app", version="1.0.0", eula="legal/1.0.0/l.txt")
    assert t.info.eula == "legal/1.0.0/l.txt"
    with pytest.raises(PublishError, match="names legal/1.0.0/l.txt as its eula"):
        repo.remove("legal/1.0.0/l.txt")
    repo.remove(t.path)
    repo.remove("legal/1.0.0/l.txt")
    assert repo.targets() == []


def test_list_command(repo, capsys):
    assert main(["publish", "list", str(repo.path)]) == 0
    assert capsys.readouterr().out.startswith("no targets")
    repo.add_bytes(b"z" * 1234, "z.bin", product="zeta", version="2.0.0", kind="content")
    assert main(["publish", "list", str(repo.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    sha = hashlib.sha256(b"z" * 1234).hexdigest()
    assert lines[1].split() == [
        "zeta/2.0.0/z.bin",
        "2.0.0",
        "content",
        "normal",
        "stable",
        "1234",
        sha[:12],
    ]
    assert format_table(repo.targets()) == "\n".join(lines)


# -- remove, refresh, roots ----------------------------------------------------------


def test_remove_drops_metadata_entry_then_blob_and_empty_directories(repo):
    keep = repo.add_bytes(b"keep", "k.bin", product="p", version="1.0.0")
    gone = repo.add_bytes(b"gone", "g.bin", product="p", version="2.0.0")
    repo.remove(gone.path)
    assert gone.path not in _current(repo, "targets")["targets"]
    assert keep.path in _current(repo, "targets")["targets"]
    assert not (repo.targets_dir / "p/2.0.0").exists()
    assert (repo.targets_dir / keep.url_path).read_bytes() == b"keep"
    repo.remove(keep.path)
    assert list(repo.targets_dir.iterdir()) == []


def test_remove_keeps_the_blob_when_the_metadata_cannot_be_written(repo, monkeypatch):
    """Deleting comes after publishing: a failure to publish leaves the blob served."""
    t = repo.add_bytes(b"blob", "b.bin", product="b", version="1.0.0")
    before = {p: p.read_bytes() for p in repo.path.rglob("*") if p.is_file()}
    real = publish.write_atomic

    def full_disk(path, data, mode=0o644):
        if path.name == "timestamp.json":
            raise OSError(28, "No space left on device", str(path))
        real(path, data, mode)

    monkeypatch.setattr(publish, "write_atomic", full_disk)
    with pytest.raises(PublishError, match="No space left on device"):
        repo.remove(t.path)
    # What the failed command wrote was taken back; the blob is still there.
    assert {p: p.read_bytes() for p in repo.path.rglob("*") if p.is_file()} == before
    monkeypatch.setattr(publish, "write_atomic", real)
    repo.remove(t.path)  # the same object recovers (its cache was dropped)
    assert repo.targets() == []


def test_writes_happen_in_order_timestamp_last(repo, monkeypatch):
    order = []
    real_write, real_copy = publish.write_atomic, publish._copy_verified

    def write(path, data, mode=0o644):
        order.append(path.name)
        real_write(path, data, mode)

    def copy(source, dest, sha, length):
        order.append(dest.name)
        real_copy(source, dest, sha, length)

    monkeypatch.setattr(publish, "write_atomic", write)
    monkeypatch.setattr(publish, "_copy_verified", copy)
    repo.add_bytes(b"mem", "m.bin", product="m", version="1.0.0")
    assert order == [
        f"{hashlib.sha256(b'mem').hexdigest()}.m.bin",
        "2.targets.json",
        "2.snapshot.json",
        "timestamp.json",
    ]
    order.clear()
    repo.rotate("targets")
    assert order[0].endswith(".pem")  # the new key is stored before anything names it
    assert order[1:] == ["2.root.json", "3.targets.json", "3.snapshot.json", "timestamp.json"]


def test_orphans_of_an_interrupted_command_are_replaced(repo):
    """Versioned files that timestamp.json never named are overwritten by the next command."""
    (repo.metadata_dir / "2.targets.json").write_bytes(b"half-written")
    (repo.metadata_dir / "2.snapshot.json").write_bytes(b"{}")
    repo.add_bytes(b"a", "a.bin", product="a", version="1.0.0")
    assert _current(repo, "targets")["version"] == 2
    assert "a/1.0.0/a.bin" in _current(repo, "targets")["targets"]


def test_a_damaged_newest_root_stops_commands_and_is_left_alone(repo):
    (repo.metadata_dir / "2.root.json").write_bytes(b"not ours")  # newest root on disk
    with pytest.raises(PublishError, match="cannot be read"):
        repo.rotate("timestamp")
    assert (repo.metadata_dir / "2.root.json").read_bytes() == b"not ours"


def test_refresh_bumps_only_the_timestamp(repo):
    snap = _current(repo, "snapshot")
    ts = _current(repo, "timestamp")
    repo.refresh()
    assert _current(repo, "snapshot") == snap
    assert _current(repo, "timestamp")["version"] == ts["version"] + 1
    assert main(["publish", "refresh", str(repo.path)]) == 0
    assert _current(repo, "timestamp")["version"] == ts["version"] + 2


def test_refresh_warns_when_another_role_expires_first(tmp_path, capsys):
    r = tmp_path / "r"
    assert main(["publish", "init", str(r), "--expires", "snapshot=1h"]) == 0
    capsys.readouterr()
    assert main(["publish", "refresh", str(r)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: snapshot metadata expires" in err
    assert main(["publish", "init", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    assert main(["publish", "refresh", str(tmp_path / "ok")]) == 0
    assert capsys.readouterr().err == ""


def test_root_bytes(repo):
    assert (
        repo.root_bytes() == repo.root_bytes(1) == (repo.metadata_dir / "1.root.json").read_bytes()
    )
    repo.rotate("snapshot")
    assert json.loads(repo.root_bytes())["signed"]["version"] == 2
    assert repo.root_bytes(1) != repo.root_bytes(2)
    with pytest.raises(PublishError, match="no root version 7"):
        repo.root_bytes(7)


def test_rotate_lists_new_key_and_resigns_below(repo):
    old_root = _signed(repo.metadata_dir / "1.root.json")
    versions = {r: _current(repo, r)["version"] for r in ("targets", "snapshot", "timestamp")}
    repo.rotate("snapshot")
    new_root = _signed(repo.metadata_dir / "2.root.json")
    assert new_root["roles"]["snapshot"]["keyids"] != old_root["roles"]["snapshot"]["keyids"]
    for role in ("root", "targets", "timestamp"):
        assert new_root["roles"][role] == old_root["roles"][role]
    assert _current(repo, "targets")["version"] == versions["targets"]
    assert _current(repo, "snapshot")["version"] == versions["snapshot"] + 1
    assert _current(repo, "timestamp")["version"] == versions["timestamp"] + 1
    root = Metadata.from_bytes(repo.root_bytes())
    snap = Metadata.from_bytes(
        (repo.metadata_dir / f"{versions['snapshot'] + 1}.snapshot.json").read_bytes()
    )
    root.signed.verify_delegate("snapshot", snap.signed_bytes, snap.signatures)


def test_root_rotation_needs_only_root_keys(repo):
    for role in ("targets", "snapshot", "timestamp"):
        for f in (repo.keys_dir / role).glob("*.pem"):
            f.unlink()
    ts = (repo.metadata_dir / "timestamp.json").read_bytes()
    Repository.open(repo.path).rotate("root")
    assert (repo.metadata_dir / "2.root.json").is_file()
    assert (repo.metadata_dir / "timestamp.json").read_bytes() == ts


# -- several writers -----------------------------------------------------------------


def test_two_objects_on_one_repository_see_each_other(repo):
    other = Repository.open(repo.path)
    repo.add_bytes(b"1", "f.bin", product="p", version="1.0.0")
    other.add_bytes(b"2", "f.bin", product="p", version="2.0.0")
    repo.add_bytes(b"3", "f.bin", product="p", version="3.0.0")
    assert [t.version for t in other.targets()] == ["1.0.0", "2.0.0", "3.0.0"]
    other.rotate("root")  # a new root and nothing else
    repo.rotate("root")
    assert json.loads(other.root_bytes())["signed"]["version"] == 3


def test_concurrent_writers_lose_no_update(repo):
    errors = []

    def writer(product):
        try:
            r = Repository.open(repo.path)
            for i in range(15):
                r.add_bytes(f"{product}{i}".encode(), "f.bin", product=product, version=f"1.0.{i}")
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(p,)) for p in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(Repository.open(repo.path).targets()) == 45
    assert _current(repo, "targets")["version"] == 46


def test_a_file_changed_while_copied_is_refused(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"now")
    dest = tmp_path / "out" / "dest"
    dest.parent.mkdir()
    with pytest.raises(PublishError, match="changed while"):
        publish._copy_verified(src, dest, hashlib.sha256(b"before").hexdigest(), 6)
    assert list(dest.parent.iterdir()) == []
