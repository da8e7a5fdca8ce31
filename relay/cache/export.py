"""Static export: a relay's verified data as a tree that any static web server can serve.

The tree is what a stock TUF client (consistent snapshots, hash-prefixed target names)
asks for, byte-exact::

    OUT/metadata/N.root.json, timestamp.json, N.snapshot.json, N.targets.json, N.<role>.json
    OUT/targets/<dir>/<sha256>.<name>

Rules:

* The stored metadata is verified again from the pinned root before anything is written
  (signatures, versions, hashes, lengths; expiry as of the time the relay verified it).
* Every target is hash-checked while it is exported: a hard link into the store when
  the output is on the same filesystem (the link is hashed), else a copy hashed as it
  is written. A blob whose bytes do not match the signed sha256 and length stops the
  run with :class:`relay.errors.ExportError`.
* One run is atomic for clients: new targets are staged in ``OUT/.export-staging`` and
  moved into place only once all of them checked; then versioned metadata; then
  ``timestamp.json``, the file clients start from. A run refused by a check leaves
  ``OUT`` as it was (its staged files are deleted); one that fails writing (disk full)
  may leave new files that nothing references yet, and clients see the tree as before.
* Incremental: a target already in ``OUT`` with its signed length is kept (its name
  holds its sha256; ``check_kept`` hashes it again), metadata with the same bytes is
  kept. Nothing is deleted: clients holding older metadata still find their files.
* Targets the store does not hold (never requested, evicted) are left out and listed.

Everything here blocks: call it from a thread when on an event loop.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from relay.cache.mirror import MetadataDir, reverify_stored
from relay.cache.store import FsBlobStore
from relay.core.model import Target
from relay.core.verify import VerifiedMetadata, root_version
from relay.errors import ExportError, MetadataRejectedError
from relay.storage.fsio import copy_hashed, fsync_dir, hash_file, write_atomic

STAGING = ".export-staging"
"""The directory under ``OUT`` where a run stages its new targets."""


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What one export run did.

    Attributes:
        linked: new targets hard-linked from the store.
        copied: new targets copied from the store.
        kept: targets already in the tree.
        missing: target paths the store does not hold (not exported).
        metadata_written: metadata files written (``timestamp.json`` included).
        metadata_kept: metadata files already in the tree with the same bytes.
        timestamp_version: the version of the exported ``timestamp.json``.
        expires: the earliest expiry of the exported timestamp, snapshot and targets.
    """

    linked: int
    copied: int
    kept: int
    missing: tuple[str, ...]
    metadata_written: int
    metadata_kept: int
    timestamp_version: int
    expires: dt.datetime


def _pinned_root(files: dict[str, bytes], trusted_root: bytes | None) -> bytes:
    if trusted_root is not None:
        return trusted_root
    roots = sorted(
        (n for n in files if n.endswith(".root.json") and n.split(".", 1)[0].isdigit()),
        key=lambda n: int(n.split(".", 1)[0]),
    )
    if not roots:
        msg = "no root metadata in the data directory and no trusted root given"
        raise ExportError(msg)
    return files[roots[0]]


def _inside(base: Path, relative: str) -> Path:
    """``base / relative`` for a signed relative path; refuses one that would leave ``base``."""
    parts = PurePosixPath(relative).parts
    if not parts or relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
        msg = f"refusing to export {relative!r}: not a plain relative path"
        raise ExportError(msg)
    return base.joinpath(*parts)


_STORED = (
    "the stored blob {}",
    "delete the blob (the relay fetches it again) or let its scrub quarantine it",
)
_KEPT = "the exported file {}", "delete it"


def _check(
    target: Target, sha256: str, length: int, source: Path, what: tuple[str, str] = _STORED
) -> None:
    if (sha256, length) != (target.sha256, target.length):
        msg = (
            f"{target.path}: {what[0].format(source)} has sha256 {sha256} and {length} bytes; "
            f"the metadata signed sha256 {target.sha256} and {target.length} bytes. Nothing was "
            f"exported: {what[1]}, then export again"
        )
        raise ExportError(msg)


def _hard_link(source: Path, dest: Path) -> bool:
    try:
        dest.hardlink_to(source)
    except OSError:  # no hard links on this filesystem, or a link limit: copy instead
        return False
    return True


def _stage(target: Target, source: Path, staged: Path, *, link: bool) -> bool:
    """Put ``source`` at ``staged`` (linked or copied) and check it; True if linked.

    Raises:
        ExportError: the bytes do not match the signed sha256 and length.
    """
    staged.parent.mkdir(parents=True, exist_ok=True)
    if link and _hard_link(source, staged):
        _check(target, *hash_file(staged), source)
        return True
    _check(target, *copy_hashed(source, staged), source)
    return False


def _load_verified(metadata_dir: Path, trusted_root: bytes | None) -> VerifiedMetadata:
    try:
        files, state = MetadataDir(metadata_dir).read()
    except FileNotFoundError:
        files, state = {}, {}
    except OSError as e:
        msg = f"cannot read the relay's metadata in {metadata_dir}: {e.strerror}"
        raise ExportError(msg) from e
    if "timestamp.json" not in files:
        msg = f"no verified metadata in {metadata_dir}: has the relay synced once?"
        raise ExportError(msg)
    verified_at = state.get("verified_at")
    reference = (
        dt.datetime.fromtimestamp(float(verified_at), dt.UTC)
        if isinstance(verified_at, int | float)
        else None
    )
    pinned = _pinned_root(files, trusted_root)
    try:
        root_version(pinned)
        verified = reverify_stored(pinned, files, reference)
    except (MetadataRejectedError, ValueError) as e:
        msg = f"the metadata in {metadata_dir} does not verify: {e}"
        raise ExportError(msg) from e
    if verified is None:
        msg = f"the metadata in {metadata_dir} is incomplete (a file was pruned while reading?)"
        raise ExportError(msg)
    return verified


def export_static(
    metadata_dir: Path,
    blobs_dir: Path,
    out: Path,
    *,
    trusted_root: bytes | None = None,
    check_kept: bool = False,
    link: bool = True,
) -> ExportReport:
    """Write (or bring up to date) a static TUF repository tree from a relay's data.

    Safe beside a running relay: the data directory is only read.

    Args:
        metadata_dir: the relay's verified metadata (``<data_dir>/metadata``).
        blobs_dir: the relay's blob store (``<data_dir>/blobs``).
        out: the tree to write; created if missing.
        trusted_root: the pinned root's bytes; ``None``: the oldest root stored in
            ``metadata_dir`` anchors the check (the chain of roots and every
            signature after it are still verified).
        check_kept: hash the targets already in ``out`` again.
        link: hard-link targets from the store when on the same filesystem; ``False``:
            always copy (``out`` then shares no inode with the store).

    Returns:
        What the run did.

    Raises:
        ExportError: the metadata does not verify or is missing, a stored blob does not
            match its signed hash or length, a path is unsafe, or ``out`` cannot be
            written. ``out`` is then as it was before the run.
    """
    verified = _load_verified(metadata_dir, trusted_root)
    store = FsBlobStore(blobs_dir)
    targets_dir = out / "targets"
    staging = out / STAGING
    created_out = not out.exists()
    linked = copied = kept = 0
    missing: list[str] = []
    moves: list[tuple[Path, Path]] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
        staging.mkdir()
        same_fs = link and blobs_dir.exists() and blobs_dir.stat().st_dev == out.stat().st_dev
        seen: set[str] = set()
        for target in verified.targets.values():
            if target.url_path in seen:
                continue
            seen.add(target.url_path)
            dest = _inside(targets_dir, target.url_path)
            if dest.is_file() and dest.stat().st_size == target.length:
                if check_kept:
                    _check(target, *hash_file(dest), dest, _KEPT)
                kept += 1
                continue
            source = store.path(target.sha256)
            if not source.is_file():
                missing.append(target.path)
                continue
            staged = _inside(staging, target.url_path)
            if _stage(target, source, staged, link=same_fs):
                linked += 1
            else:
                copied += 1
            moves.append((staged, dest))
        for staged, dest in moves:
            dest.parent.mkdir(parents=True, exist_ok=True)
            staged.replace(dest)
        for directory in {dest.parent for _, dest in moves}:
            fsync_dir(directory)
        written, same = _write_metadata(out / "metadata", dict(verified.files))
    except OSError as e:
        msg = f"cannot write the export to {out}: {e}"
        raise ExportError(msg) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created_out and not any(out.iterdir()):
            out.rmdir()
    return ExportReport(
        linked=linked,
        copied=copied,
        kept=kept,
        missing=tuple(sorted(missing)),
        metadata_written=written,
        metadata_kept=same,
        timestamp_version=verified.timestamp_version,
        expires=verified.expires,
    )


def _write_metadata(directory: Path, files: dict[str, bytes]) -> tuple[int, int]:
    """Write changed files, ``timestamp.json`` last; returns (written, kept)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = same = 0
    for name in sorted(files, key=lambda n: n == "timestamp.json"):
        dest = _inside(directory, name)
        if dest.is_file() and dest.read_bytes() == files[name]:
            same += 1
            continue
        if name == "timestamp.json":
            fsync_dir(directory)  # every file it names is durable before it
        write_atomic(dest, files[name])
        written += 1
    fsync_dir(directory)
    return written, same
