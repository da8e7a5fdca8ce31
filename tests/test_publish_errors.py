"""A failed publisher command prints one line, exits non-zero, and changes nothing.

"Nothing" is checked on the whole repository directory: the list of files and
directories, every file's bytes, and every mode.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from relay.cli.main import main


def tree_state(path):
    """Every directory and file under ``path``: its mode, and a file's bytes."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(root) / name
            st = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[str(p.relative_to(path))] = (
                stat.S_IMODE(st.st_mode),
                stat.S_IFMT(st.st_mode),
                data,
            )
    return out


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "repo"
    assert main(["publish", "init", str(repo), "--root-keys", "2", "--root-threshold", "2"]) == 0
    pkg = tmp_path / "pkg.bin"
    pkg.write_bytes(b"one" * 1000)
    assert (
        main(["publish", "add", str(repo), str(pkg), "--product", "pkg", "--version", "1.0.0"]) == 0
    )
    lic = tmp_path / "licence.txt"
    lic.write_bytes(b"terms")
    assert (
        main(["publish", "add", str(repo), str(lic), "--product", "legal", "--version", "1.0.0"])
        == 0
    )
    app = tmp_path / "app.bin"
    app.write_bytes(b"app")
    argv = ["publish", "add", str(repo), str(app), "--product", "app", "--version", "1.0.0"]
    assert main([*argv, "--eula", "legal/1.0.0/licence.txt"]) == 0
    return repo


def _new_file(t, name="pkg.bin", data=b"two" * 1000):
    f = t / "new" / name
    f.parent.mkdir(exist_ok=True)
    f.write_bytes(data)
    return str(f)


def _add(r, t, *extra, version="2.0.0", file=None):
    return [
        "publish",
        "add",
        str(r),
        file or _new_file(t),
        "--product",
        "pkg",
        "--version",
        version,
        *extra,
    ]


def _remove_timestamp_key(repo):
    shutil.rmtree(repo / "keys" / "timestamp")


def _wrong_targets_key(repo):
    # The snapshot key's bytes under the targets key's name.
    (tkey,) = (repo / "keys" / "targets").glob("*.pem")
    (skey,) = (repo / "keys" / "snapshot").glob("*.pem")
    tkey.write_bytes(skey.read_bytes())


def _garbage_snapshot_key(repo):
    (skey,) = (repo / "keys" / "snapshot").glob("*.pem")
    skey.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")


def _one_root_key_offline(repo):
    # Threshold 2 of 2: one key is not enough to sign a root.
    first = sorted((repo / "keys" / "root").glob("*.pem"))[0]
    first.unlink()


# (id, prepare the repository, argv, text the one line must hold)
CASES = [
    ("bad-version", None, lambda r, t: _add(r, t, version="1.0"), "not a SemVer 2.0 version"),
    ("v-prefixed-version", None, lambda r, t: _add(r, t, version="v2.0.0"), "SemVer"),
    ("unknown-kind", None, lambda r, t: _add(r, t, "--kind", "firmware"), "kind 'firmware'"),
    ("unknown-severity", None, lambda r, t: _add(r, t, "--severity", "high"), "severity"),
    ("unknown-channel", None, lambda r, t: _add(r, t, "--channel", "nightly"), "channel"),
    ("bad-product", None, lambda r, t: [*_add(r, t), "--product", "a/b"], "product 'a/b'"),
    (
        "missing-file",
        None,
        lambda r, t: _add(r, t, file=str(t / "nope.bin")),
        "nope.bin: no such file",
    ),
    ("directory-as-file", None, lambda r, t: _add(r, t, file=str(t)), "is a directory"),
    (
        "same-version-other-bytes",
        None,
        lambda r, t: _add(r, t, version="1.0.0"),
        "pkg/1.0.0/pkg.bin is already published with other bytes",
    ),
    (
        "same-version-other-file",
        None,
        lambda r, t: _add(r, t, version="1.0.0", file=_new_file(t, "other.bin")),
        "already published as pkg/1.0.0/pkg.bin",
    ),
    (
        "eula-not-published",
        None,
        lambda r, t: _add(r, t, "--eula", "legal/9.0.0/licence.txt"),
        "--eula legal/9.0.0/licence.txt: no such target",
    ),
    (
        "missing-key",
        _remove_timestamp_key,
        lambda r, t: _add(r, t),
        "missing or wrong timestamp key",
    ),
    ("wrong-key", _wrong_targets_key, lambda r, t: _add(r, t), "wrong targets key"),
    ("garbage-key", _garbage_snapshot_key, lambda r, t: _add(r, t), "not a usable private key"),
    (
        "root-key-offline",
        _one_root_key_offline,
        lambda r, t: ["publish", "rotate", str(r), "--role", "targets"],
        "missing or wrong root key: 1 of the 2 needed",
    ),
    (
        "refresh-without-timestamp-key",
        _remove_timestamp_key,
        lambda r, t: ["publish", "refresh", str(r)],
        "timestamp key",
    ),
    (
        "threshold-above-keys",
        None,
        lambda r, t: ["publish", "init", str(r), "--root-keys", "2", "--root-threshold", "3"],
        "--root-threshold 3 must be between 1 and the number of root keys (2)",
    ),
    (
        "init-over-a-repository",
        None,
        lambda r, t: ["publish", "init", str(r)],
        "already exists and is not an empty directory",
    ),
    (
        "remove-unknown",
        None,
        lambda r, t: ["publish", "remove", str(r), "pkg/9.9.9/pkg.bin"],
        "no target 'pkg/9.9.9/pkg.bin'",
    ),
    (
        "remove-a-named-eula",
        None,
        lambda r, t: ["publish", "remove", str(r), "legal/1.0.0/licence.txt"],
        "app/1.0.0/app.bin names legal/1.0.0/licence.txt as its eula",
    ),
    (
        "missing-repository",
        None,
        lambda r, t: _add(t / "no-such-repo", t),
        "is not a repository",
    ),
    ("not-a-repository", None, lambda r, t: ["publish", "refresh", str(t)], "is not a repository"),
    ("list-not-a-repository", None, lambda r, t: ["publish", "list", str(t)], "not a repository"),
]


@pytest.mark.parametrize(("name", "prepare", "argv", "needle"), CASES, ids=[c[0] for c in CASES])
def test_failed_command_changes_nothing(repo, tmp_path, capsys, name, prepare, argv, needle):
    if prepare is not None:
        prepare(repo)
    args = argv(repo, tmp_path)
    before = tree_state(tmp_path)
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("relay publish: error: ")
    assert needle in captured.err
    assert captured.out == ""
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--root-keys", "0"], "--root-keys must be at least 1"),
        (["--root-keys", "2", "--root-threshold", "0"], "--root-threshold 0 must be between"),
        (["--root-keys", "2", "--root-threshold", "3"], "--root-threshold 3 must be between"),
        (["--expires", "mirror=1d"], "unknown role 'mirror'"),
        (["--expires", "timestamp=0s"], "timestamp period must be positive"),
    ],
)
def test_failed_init_creates_nothing(tmp_path, capsys, argv, needle):
    before = tree_state(tmp_path)
    assert main(["publish", "init", str(tmp_path / "new" / "repo"), *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert tree_state(tmp_path) == before


def test_init_into_a_non_empty_directory_refused(tmp_path, capsys):
    d = tmp_path / "existing"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    assert main(["publish", "init", str(d)]) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in d.iterdir()] == ["keep.txt"]


def test_init_into_an_empty_directory(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    assert main(["publish", "init", str(d)]) == 0
    assert (d / "public/metadata/1.root.json").is_file()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["rotate", "{repo}", "--role", "mirror"], "invalid choice: 'mirror'"),
        (["init", "{repo}", "--expires", "timestamp"], "expected ROLE=DURATION"),
        (["init", "{repo}", "--expires", "timestamp=soon"], "timestamp=soon"),
        (["init", "{repo}", "--root-keys", "many"], "invalid int value"),
        (["add", "{repo}", "{file}", "--version", "2.0.0"], "--product"),
    ],
)
def test_usage_errors_exit_2_and_change_nothing(repo, tmp_path, capsys, argv, needle):
    args = ["publish", *(a.format(repo=repo, file=_new_file(tmp_path)) for a in argv)]
    before = tree_state(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("relay publish ") and needle in err.splitlines()[-1]
    assert tree_state(tmp_path) == before


def test_same_bytes_again_is_a_no_op(repo, tmp_path, capsys):
    f = _new_file(tmp_path, "pkg.bin", b"one" * 1000)
    before = tree_state(repo)
    assert main(_add(repo, tmp_path, version="1.0.0", file=f)) == 0
    assert "added pkg/1.0.0/pkg.bin" in capsys.readouterr().out
    assert tree_state(repo) == before
