"""A failed publisher command prints one line, exits non-zero, and changes nothing."""

from __future__ import annotations

import shutil

import pytest

from relay.cli import main
from tests.support import snapshot_tree


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "repo"
    assert main(["publish", "init", str(repo)]) == 0
    pkg = tmp_path / "pkg.bin"
    pkg.write_bytes(b"one" * 1000)
    assert (
        main(["publish", "add", str(repo), str(pkg), "--product", "pkg", "--version", "1.0.0"]) == 0
    )
    return repo


def _other_file(tmp_path):
    f = tmp_path / "pkg.bin"
    f.write_bytes(b"two" * 1000)
    return str(f)


def _remove_timestamp_key(repo):
    shutil.rmtree(repo / "keys" / "timestamp")


def _wrong_targets_key(repo):
    # Replace the targets key with the snapshot key's bytes under the targets key's name.
    (tkey,) = (repo / "keys" / "targets").glob("*.pem")
    (skey,) = (repo / "keys" / "snapshot").glob("*.pem")
    tkey.write_bytes(skey.read_bytes())


CASES = [
    (
        "bad-version",
        None,
        lambda r, t: [
            "publish",
            "add",
            str(r),
            _other_file(t),
            "--product",
            "pkg",
            "--version",
            "1.0",
        ],
        "SemVer",
    ),
    (
        "unknown-kind",
        None,
        lambda r, t: [
            "publish",
            "add",
            str(r),
            _other_file(t),
            "--product",
            "pkg",
            "--version",
            "2.0.0",
            "--kind",
            "firmware",
        ],
        "kind",
    ),
    (
        "missing-file",
        None,
        lambda r, t: [
            "publish",
            "add",
            str(r),
            str(t / "nope.bin"),
            "--product",
            "pkg",
            "--version",
            "2.0.0",
        ],
        "no such file",
    ),
    (
        "same-version-other-bytes",
        None,
        lambda r, t: [
            "publish",
            "add",
            str(r),
            _other_file(t),
            "--product",
            "pkg",
            "--version",
            "1.0.0",
        ],
        "already published",
    ),
    (
        "missing-key",
        _remove_timestamp_key,
        lambda r, t: [
            "publish",
            "add",
            str(r),
            _other_file(t),
            "--product",
            "pkg",
            "--version",
            "2.0.0",
        ],
        "timestamp key",
    ),
    (
        "wrong-key",
        _wrong_targets_key,
        lambda r, t: [
            "publish",
            "add",
            str(r),
            _other_file(t),
            "--product",
            "pkg",
            "--version",
            "2.0.0",
        ],
        "targets",
    ),
    (
        "threshold-above-keys",
        None,
        lambda r, t: ["publish", "init", str(r), "--root-keys", "2", "--root-threshold", "3"],
        "threshold",
    ),
    (
        "remove-unknown",
        None,
        lambda r, t: ["publish", "remove", str(r), "pkg/9.9.9/pkg.bin"],
        "no target",
    ),
    ("not-a-repo", None, lambda r, t: ["publish", "refresh", str(t)], "not a repository"),
    (
        "rotate-unknown-role",
        None,
        lambda r, t: ["publish", "rotate", str(r), "--role", "mirror"],
        "invalid choice",
    ),
]


@pytest.mark.parametrize(("name", "prepare", "argv", "needle"), CASES, ids=[c[0] for c in CASES])
def test_failed_command_changes_nothing(repo, tmp_path, capsys, name, prepare, argv, needle):
    if prepare is not None:
        prepare(repo)
    before = snapshot_tree(repo)
    capsys.readouterr()
    try:
        code = main(argv(repo, tmp_path))
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code != 0
    assert needle in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 or lines[0].startswith("usage:"), err
    assert snapshot_tree(repo) == before


def test_init_into_non_empty_directory_refused(tmp_path, capsys):
    d = tmp_path / "existing"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    assert main(["publish", "init", str(d)]) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in d.iterdir()] == ["keep.txt"]


def test_same_bytes_again_is_a_no_op(repo, tmp_path):
    f = tmp_path / "pkg.bin"
    f.write_bytes(b"one" * 1000)
    before = snapshot_tree(repo)
    assert (
        main(["publish", "add", str(repo), str(f), "--product", "pkg", "--version", "1.0.0"]) == 0
    )
    assert snapshot_tree(repo) == before
