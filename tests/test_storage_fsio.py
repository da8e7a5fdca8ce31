"""fsio: streamed hashing and durable writes."""

from __future__ import annotations

import hashlib
import os

import pytest

from relay.storage.fsio import HASH_BLOCK, hash_file, write_atomic


@pytest.mark.parametrize("size", [0, 1, HASH_BLOCK - 1, HASH_BLOCK, 2 * HASH_BLOCK + 17])
def test_hash_file_gives_sha256_and_length_across_blocks(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert hash_file(path) == (hashlib.sha256(data).hexdigest(), size)


def test_hash_file_of_a_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        hash_file(tmp_path / "nope")


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "f.json"
    write_atomic(path, b"one")
    write_atomic(path, b"two", 0o600)
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["f.json"]
