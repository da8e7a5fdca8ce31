"""The publisher: the vendor side that produces the TUF repository relays mirror.

Layout of a repository ``REPO``::

    REPO/repo.json              settings: expiry period per role (seconds); also the lock file
    REPO/keys/                  0700; private Ed25519 keys, PKCS#8 PEM, 0600, named <keyid>.pem
    REPO/keys/root/             root keys, kept apart so they can be moved offline
    REPO/keys/<role>/           targets, snapshot, timestamp keys
    REPO/keys/retired/<role>/   keys replaced by ``rotate``
    REPO/public/                the tree to serve, and nothing else (never a key)
    REPO/public/metadata/       N.root.json (every version ever signed), N.snapshot.json,
                                N.targets.json, timestamp.json (no unversioned root.json)
    REPO/public/targets/<product>/<version>/<sha256>.<name>

Rules:

* Consistent snapshots (TUF 1.0 §5.5): every file but ``timestamp.json`` is
  immutable under its versioned or hashed name. A root, once written, is never
  rewritten or deleted: clients that ship an old root walk ``N.root.json`` forward.
* A command checks everything (arguments, files, existing targets, keys) before it
  writes anything; a failure raises :class:`relay.errors.PublishError` with one line
  and leaves the repository exactly as it was.
* Writes come after all checks, through a temp file in the same directory, fsync and
  ``os.replace``, in this order: new keys, blobs, versioned metadata, then
  ``timestamp.json`` (each directory fsynced before the next step), then deletions.
  Nothing refers to a new file until ``timestamp.json`` does, so a crash at any point
  leaves the previous state published; the next command overwrites the orphans.
* Commands on one repository are serialised by an exclusive ``flock`` on ``repo.json``.
* Metadata and online keys are read once per :class:`Repository` object and re-read
  only when ``public/metadata`` changes on disk; root keys are read for each use, so
  they can live offline between root signings.
* Everything here blocks (file I/O, hashing): from asyncio, call it in a thread.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Required, TypedDict, Unpack

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from relay.core.model import Target, UpdateInfo
from relay.errors import PublishError
from relay.storage.fsio import copy_hashed, fsync_dir, hash_file, write_atomic

logger = logging.getLogger(__name__)

ROLES = ("root", "targets", "snapshot", "timestamp")
DEFAULT_EXPIRES: dict[str, float] = {  # seconds
    "root": 365 * 86400.0,
    "targets": 90 * 86400.0,
    "snapshot": 30 * 86400.0,
    "timestamp": 86400.0,
}
# The roles each role's metadata depends on: re-signed after that role's key changes.
_BELOW = {
    "root": (),
    "targets": ("snapshot", "timestamp"),
    "snapshot": ("timestamp",),
    "timestamp": (),
}
_SETTINGS = "repo.json"
_FORMAT = 1
_SERIALIZER = JSONSerializer(compact=True)
# python-tuf puts the target path into the URL unquoted (ngclient ``download_target``),
# so file names are limited to characters that need no percent-encoding (RFC 3986 §2.3).
_FILE_NAME = re.compile(r"^[A-Za-z0-9_~+-][A-Za-z0-9._~+-]{0,127}$")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass(frozen=True, slots=True)
class _Current:
    """The published metadata as read from disk; a command edits it in place under the lock."""

    root: Metadata[Root]
    timestamp: Metadata[Timestamp]
    snapshot: Metadata[Snapshot]
    targets: Metadata[Targets]


@dataclass(frozen=True, slots=True)
class _Blob:
    """A target file to write: from memory, or copied (and re-hashed) from a file."""

    dest: Path
    sha256: str
    length: int
    data: bytes | None = None
    source: Path | None = None


@dataclass(slots=True)
class _Plan:
    """Every write a command makes, decided before the first one happens."""

    keys: list[tuple[str, CryptoSigner]] = field(default_factory=list)
    blobs: list[_Blob] = field(default_factory=list)
    versioned: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp: bytes | None = None
    unlink: list[Path] = field(default_factory=list)
    retire: list[tuple[str, str]] = field(default_factory=list)  # (role, keyid)


class Repository:
    """A publisher's TUF repository on disk.

    Use :meth:`init` to create one and :meth:`open` to use an existing one. All
    methods block; they are safe to call from several processes at once (a file
    lock serialises them) but one object is not meant to be shared between threads.

    Attributes:
        path: the repository directory (``REPO``).
        public_dir: ``REPO/public``, the tree to serve.
        metadata_dir: ``REPO/public/metadata``.
        targets_dir: ``REPO/public/targets``.
        keys_dir: ``REPO/keys``, the private keys.
        expires: expiry period in seconds per role.
    """

    def __init__(self, path: Path, expires: Mapping[str, float]) -> None:
        self.path = path
        self.public_dir = path / "public"
        self.metadata_dir = self.public_dir / "metadata"
        self.targets_dir = self.public_dir / "targets"
        self.keys_dir = path / "keys"
        self.expires = dict(expires)
        self._state: _Current | None = None
        self._stamp: bytes | None = None  # timestamp.json as read with _state
        self._keys: dict[str, Signer] = {}  # online keys by keyid, never root keys

    # -- creation ---------------------------------------------------------------

    @classmethod
    def init(
        cls,
        path: Path,
        *,
        root_keys: int = 1,
        root_threshold: int = 1,
        expires: Mapping[str, float] | None = None,
    ) -> Repository:
        """Create a repository with fresh Ed25519 keys and version 1 of every role.

        Args:
            path: the repository directory; it must not exist or be empty.
            root_keys: how many root keys to make.
            root_threshold: how many root signatures a root needs.
            expires: expiry period in seconds per role, over :data:`DEFAULT_EXPIRES`.

        Returns:
            The new repository.

        Raises:
            PublishError: ``path`` is a file or a non-empty directory, the threshold is
                not between 1 and the number of root keys, or an expiry names an
                unknown role or is not a positive number. Nothing is left behind.
        """
        if root_keys < 1:
            raise PublishError(f"--root-keys must be at least 1, got {root_keys}")
        if not 1 <= root_threshold <= root_keys:
            raise PublishError(
                f"--root-threshold {root_threshold} must be between 1 and the number "
                f"of root keys ({root_keys})"
            )
        periods = dict(DEFAULT_EXPIRES)
        for role, seconds in (expires or {}).items():
            if role not in ROLES:
                raise PublishError(f"--expires: unknown role {role!r} (use {', '.join(ROLES)})")
            if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds > 0):
                raise PublishError(f"--expires: the {role} period must be positive, got {seconds}")
            periods[role] = float(seconds)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise PublishError(f"{path} already exists and is not an empty directory")
        # The first missing ancestor: what to remove if creation fails half-way.
        top = path
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        created = not path.exists()
        repo = cls(path, periods)
        try:
            repo._create(root_keys, root_threshold)
        except BaseException:
            if created:
                shutil.rmtree(top, ignore_errors=True)
            else:
                for child in path.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink()
            raise
        return repo

    def _create(self, root_keys: int, threshold: int) -> None:
        now = _now()
        root = Metadata(Root(expires=now + self._period("root"), consistent_snapshot=True))
        signers: dict[str, list[CryptoSigner]] = {}
        for role in ROLES:
            signers[role] = [
                CryptoSigner.generate_ed25519() for _ in range(root_keys if role == "root" else 1)
            ]
            for signer in signers[role]:
                root.signed.add_key(signer.public_key, role)
        root.signed.roles["root"].threshold = threshold
        _sign(root, signers["root"])
        targets = Metadata(Targets(expires=now + self._period("targets")))
        _sign(targets, signers["targets"])
        snapshot = Metadata(Snapshot(expires=now + self._period("snapshot")))
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
        _sign(snapshot, signers["snapshot"])
        timestamp = Metadata(Timestamp(expires=now + self._period("timestamp")))
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        _sign(timestamp, signers["timestamp"])
        plan = _Plan(
            keys=[(role, s) for role in ROLES for s in signers[role]],
            versioned=[
                ("1.root.json", _to_bytes(root)),
                ("1.targets.json", _to_bytes(targets)),
                ("1.snapshot.json", _to_bytes(snapshot)),
            ],
            timestamp=_to_bytes(timestamp),
        )
        self.path.mkdir(parents=True, exist_ok=True)
        _private_dir(self.keys_dir)
        settings = {"format": _FORMAT, "expires": self.expires}
        write_atomic(self.path / _SETTINGS, json.dumps(settings, indent=2).encode() + b"\n")
        self.metadata_dir.mkdir(parents=True)
        self.targets_dir.mkdir()
        with self._lock():
            self._apply(plan)
        for role in ROLES[1:]:
            self._keys.update((s.public_key.keyid, s) for s in signers[role])
        self._remember(_Current(root, timestamp, snapshot, targets))

    @classmethod
    def open(cls, path: Path) -> Repository:
        """Open an existing repository.

        Args:
            path: the directory given to :meth:`init`.

        Returns:
            The repository.

        Raises:
            PublishError: ``path`` is not a repository made by ``relay publish init``,
                or its settings file is damaged.
        """
        settings = path / _SETTINGS
        if not settings.is_file() or not (path / "public" / "metadata").is_dir():
            raise PublishError(f"{path} is not a repository (create one: relay publish init)")
        try:
            data = json.loads(settings.read_bytes())
            if data.get("format", _FORMAT) != _FORMAT:
                msg = f"format {data['format']!r} is not {_FORMAT}"
                raise ValueError(msg)
            expires = {r: float(data["expires"].get(r, DEFAULT_EXPIRES[r])) for r in ROLES}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise PublishError(f"{settings} is damaged: {e}") from None
        return cls(path, expires)

    # -- keys -------------------------------------------------------------------

    def _period(self, role: str) -> dt.timedelta:
        return dt.timedelta(seconds=self.expires[role])

    def _signers(self, role: str, root: Root) -> list[Signer]:
        """The signers of ``role`` whose keys ``root`` lists: at least its threshold.

        Raises:
            PublishError: fewer usable keys than the role's threshold.
        """
        threshold = root.roles[role].threshold
        directory = self.keys_dir / role
        found: list[Signer] = []
        problems: list[str] = []
        for keyid in root.roles[role].keyids:
            signer = self._keys.get(keyid)
            if signer is None:
                file = directory / f"{keyid}.pem"
                try:
                    signer = _load_key(file, keyid)
                except FileNotFoundError:
                    continue
                except PublishError as e:
                    problems.append(str(e))
                    continue
                if role != "root":
                    self._keys[keyid] = signer
            found.append(signer)
        if len(found) < threshold:
            detail = problems[0] if problems else f"no key file listed by root in {directory}"
            raise PublishError(
                f"missing or wrong {role} key: {len(found)} of the {threshold} needed ({detail})"
            )
        return found

    def signer(self, role: str) -> Signer:
        """A signer of ``role`` (for tools and tests that craft metadata by hand).

        Args:
            role: one of :data:`ROLES`.

        Returns:
            A signer whose key the current root lists for ``role``.

        Raises:
            PublishError: an unknown role, or no usable key.
        """
        if role not in ROLES:
            raise PublishError(f"unknown role {role!r} (use {', '.join(ROLES)})")
        return self._signers(role, self._current().root.signed)[0]

    def _signers_of(self, roles: Sequence[str], root: Root) -> dict[str, list[Signer]]:
        """:meth:`_signers` of each of ``roles``, checked before anything is signed."""
        return {role: self._signers(role, root) for role in roles}

    # -- reading ----------------------------------------------------------------

    def _remember(self, state: _Current) -> None:
        self._state = state
        self._stamp = (self.metadata_dir / "timestamp.json").read_bytes()

    def _cached(self, timestamp: bytes) -> _Current | None:
        """The cached metadata if the disk still holds it, else None.

        Every command that changes targets or snapshot signs a new timestamp, and a
        new root is a new ``N.root.json``: comparing ``timestamp.json``'s bytes (small)
        and looking for the next root is exact, unlike file times, which have the
        kernel's coarse clock granularity.
        """
        state = self._state
        if state is None or timestamp != self._stamp:
            return None
        if (self.metadata_dir / f"{state.root.signed.version + 1}.root.json").exists():
            return None
        return state

    def _root_versions(self) -> list[int]:
        versions = []
        for f in self.metadata_dir.glob("*.root.json"):
            head = f.name.split(".", 1)[0]
            if head.isascii() and head.isdigit():
                versions.append(int(head))
        return sorted(versions)

    def _current(self) -> _Current:
        """The published metadata (cached while ``timestamp.json`` and the root stay).

        Raises:
            PublishError: the metadata is missing or cannot be parsed.
        """
        try:
            ts_bytes = (self.metadata_dir / "timestamp.json").read_bytes()
        except OSError as e:
            raise PublishError(f"repository metadata cannot be read: {e}") from None
        cached = self._cached(ts_bytes)
        if cached is not None:
            return cached
        try:
            versions = self._root_versions()
            if not versions:
                raise PublishError(f"{self.metadata_dir} has no root metadata")
            root = Metadata[Root].from_file(str(self.metadata_dir / f"{versions[-1]}.root.json"))
            timestamp = Metadata[Timestamp].from_bytes(ts_bytes)
            snap_v = timestamp.signed.snapshot_meta.version
            snapshot = Metadata[Snapshot].from_file(
                str(self.metadata_dir / f"{snap_v}.snapshot.json")
            )
            targets_v = snapshot.signed.meta["targets.json"].version
            targets = Metadata[Targets].from_file(
                str(self.metadata_dir / f"{targets_v}.targets.json")
            )
        except (OSError, DeserializationError, KeyError) as e:
            raise PublishError(f"repository metadata cannot be read: {e}") from None
        state = _Current(root, timestamp, snapshot, targets)
        self._state, self._stamp = state, ts_bytes
        return state

    def root_bytes(self, version: int | None = None) -> bytes:
        """The bytes of ``N.root.json``, exactly as published.

        Args:
            version: the root version; the newest when None.

        Returns:
            The file's bytes.

        Raises:
            PublishError: no such root version.
        """
        n = self._current().root.signed.version if version is None else version
        try:
            return (self.metadata_dir / f"{n}.root.json").read_bytes()
        except OSError:
            raise PublishError(f"no root version {n} in {self.metadata_dir}") from None

    def targets(self) -> list[Target]:
        """Every target, sorted by product, then SemVer precedence, then path.

        Returns:
            The targets of the current targets metadata.

        Raises:
            PublishError: the metadata cannot be read.
        """
        out = []
        for tf in self._current().targets.signed.targets.values():
            try:
                out.append(Target.from_targetfile(tf))
            except ValueError:
                continue  # not one of ours (hand-made); list what we understand
        out.sort(key=lambda t: (t.product, t.info.semver, t.path))
        return out

    def expiry(self) -> dict[str, dt.datetime]:
        """When each role's current metadata expires.

        Returns:
            Expiry time (UTC) per role.

        Raises:
            PublishError: the metadata cannot be read.
        """
        cur = self._current()
        return {
            "root": cur.root.signed.expires,
            "targets": cur.targets.signed.expires,
            "snapshot": cur.snapshot.signed.expires,
            "timestamp": cur.timestamp.signed.expires,
        }

    # -- commands ---------------------------------------------------------------

    def add(
        self, file: Path, *, name: str | None = None, **fields: Unpack[ReleaseFields]
    ) -> Target:
        """Add ``file`` as target ``<product>/<version>/<name>`` and re-sign.

        The file is streamed (hashed, then copied and hashed again), never held in
        memory whole. Adding the same target with the same bytes and fields again
        changes nothing.

        Args:
            file: the file to publish.
            name: file name in the target path (default: ``file``'s name).
            **fields: the release's fields (:class:`ReleaseFields`; ``product`` and
                ``version`` are required).

        Returns:
            The published target.

        Raises:
            PublishError: a bad field or file name, a missing or unreadable file, the
                same product and version already published with other content, an
                ``eula`` that is not a published target, the file changing while it is
                copied, or a missing or wrong key.
        """
        info = _info(fields)
        name = _check_name(file.name if name is None else name)
        sha, length = _hash_file(file)
        return self._add(info, name, sha, length, None, file)

    def add_bytes(self, data: bytes, name: str, **fields: Unpack[ReleaseFields]) -> Target:
        """Add ``data`` as target ``<product>/<version>/<name>`` and re-sign.

        Args:
            data: the file's content.
            name: file name in the target path.
            **fields: as :meth:`add`.

        Returns:
            The published target.

        Raises:
            PublishError: as :meth:`add`.
        """
        info = _info(fields)
        name = _check_name(name)
        return self._add(info, name, hashlib.sha256(data).hexdigest(), len(data), data, None)

    def _add(
        self,
        info: UpdateInfo,
        name: str,
        sha: str,
        length: int,
        data: bytes | None,
        source: Path | None,
    ) -> Target:
        path = f"{info.product}/{info.version}/{name}"
        tf = TargetFile(length, {"sha256": sha}, path, {"custom": info.to_dict()})
        dest = self.targets_dir / info.product / info.version / f"{sha}.{name}"
        blob = _Blob(dest, sha, length, data, source)
        with self._transaction() as cur:
            existing = cur.targets.signed.targets
            if info.eula is not None and (info.eula not in existing or info.eula == path):
                raise PublishError(
                    f"--eula {info.eula}: no such target; publish the licence text first"
                )
            same = existing.get(path)
            if same is not None:
                if same.hashes == tf.hashes and same.length == length and same.custom == tf.custom:
                    if not blob.dest.is_file():  # repair a deleted blob; metadata is unchanged
                        self._apply(_Plan(blobs=[blob]))
                    return Target.from_targetfile(same)
                what = "other bytes" if same.hashes != tf.hashes else "other fields"
                raise PublishError(
                    f"{path} is already published with {what}; publish a new version instead"
                )
            for other_path, other in existing.items():
                if _same_release(other, info):
                    raise PublishError(
                        f"{info.product} {info.version} is already published as {other_path}; "
                        "one file per product and version (publish a new version instead)"
                    )
            signers = self._signers_of(("targets", *_BELOW["targets"]), cur.root.signed)
            # Every check passed: from here on, only signing and writing.
            existing[path] = tf
            plan = _Plan(blobs=[blob])
            self._resign_targets(cur, signers, plan)
            self._publish(cur, plan)
        return Target.from_targetfile(tf)

    def remove(self, target_path: str) -> None:
        """Remove a target from the metadata, re-sign, then delete its blob.

        Args:
            target_path: ``<product>/<version>/<name>``.

        Raises:
            PublishError: no such target, another target names it as its ``eula``, or
                a missing or wrong key.
        """
        with self._transaction() as cur:
            existing = cur.targets.signed.targets
            tf = existing.get(target_path)
            if tf is None:
                raise PublishError(f"no target {target_path!r} (see: relay publish list)")
            for other_path, other in existing.items():
                if isinstance(other.custom, dict) and other.custom.get("eula") == target_path:
                    raise PublishError(
                        f"{other_path} names {target_path} as its eula; remove {other_path} first"
                    )
            signers = self._signers_of(("targets", *_BELOW["targets"]), cur.root.signed)
            del existing[target_path]
            directory, _, name = target_path.rpartition("/")
            plan = _Plan(unlink=[self.targets_dir / directory / f"{tf.hashes['sha256']}.{name}"])
            self._resign_targets(cur, signers, plan)
            self._publish(cur, plan)

    def refresh(self) -> None:
        """Re-sign ``timestamp.json`` with a new version and expiry (for a cron job).

        Raises:
            PublishError: a missing or wrong timestamp key.
        """
        with self._transaction() as cur:
            signers = self._signers_of(("timestamp",), cur.root.signed)
            plan = _Plan()
            self._resign_timestamp(cur, signers, plan)
            self._publish(cur, plan)

    def rotate(self, role: str) -> None:
        """Replace the keys of ``role`` with as many fresh ones.

        A new root version lists the new keys. It is signed by the current root keys
        (at least their threshold) and, when root itself rotates, by every new root
        key too, so a client holding the old root accepts it and the new root is
        valid on its own. When another role rotates, that role and the roles below
        it are then re-signed (targets: targets, snapshot and timestamp; snapshot:
        snapshot and timestamp; timestamp: timestamp). The old key of the rotated role
        is not needed (rotation is the cure for a lost key); it moves to
        ``keys/retired/<role>/``.

        Args:
            role: one of :data:`ROLES`.

        Raises:
            PublishError: an unknown role, or missing or wrong keys (root keys, and
                the keys of the roles below ``role``).
        """
        if role not in ROLES:
            raise PublishError(f"unknown role {role!r} (use {', '.join(ROLES)})")
        with self._transaction() as cur:
            root = cur.root
            old_root_signers = self._signers("root", root.signed)
            signers = self._signers_of(_BELOW[role], root.signed)
            # Every check passed: from here on, only signing and writing.
            old_keyids = list(root.signed.roles[role].keyids)
            fresh = [CryptoSigner.generate_ed25519() for _ in old_keyids]
            for keyid in old_keyids:
                root.signed.revoke_key(keyid, role)
            for new in fresh:
                root.signed.add_key(new.public_key, role)
            data = self._resign(root, [*old_root_signers, *(fresh if role == "root" else [])])
            plan = _Plan(
                keys=[(role, s) for s in fresh],
                versioned=[(f"{root.signed.version}.root.json", data)],
                retire=[(role, k) for k in old_keyids],
            )
            signers[role] = list(fresh)
            if role == "targets":
                self._resign_targets(cur, signers, plan)
            elif role == "snapshot":
                self._resign_snapshot(cur, signers, plan)
            elif role == "timestamp":
                self._resign_timestamp(cur, signers, plan)
            self._apply(plan)
            for keyid in old_keyids:
                self._keys.pop(keyid, None)
            if role != "root":
                self._keys.update((s.public_key.keyid, s) for s in fresh)
            self._remember(cur)

    # -- signing ----------------------------------------------------------------

    def _resign(self, md: Metadata[Any], signers: Sequence[Signer]) -> bytes:
        """Sign the next version of ``md`` with a renewed expiry; return its bytes."""
        md.signed.version += 1
        md.signed.expires = _now() + self._period(md.signed.type)
        _sign(md, signers)
        return _to_bytes(md)

    def _resign_versioned(
        self, md: Metadata[Any], signers: Mapping[str, Sequence[Signer]], plan: _Plan
    ) -> MetaFile:
        """Re-sign ``md`` into ``plan`` as ``N.<role>.json``; return the entry naming it."""
        data = self._resign(md, signers[md.signed.type])
        plan.versioned.append((f"{md.signed.version}.{md.signed.type}.json", data))
        return MetaFile(version=md.signed.version)

    def _resign_targets(
        self, cur: _Current, signers: Mapping[str, Sequence[Signer]], plan: _Plan
    ) -> None:
        cur.snapshot.signed.meta["targets.json"] = self._resign_versioned(
            cur.targets, signers, plan
        )
        self._resign_snapshot(cur, signers, plan)

    def _resign_snapshot(
        self, cur: _Current, signers: Mapping[str, Sequence[Signer]], plan: _Plan
    ) -> None:
        cur.timestamp.signed.snapshot_meta = self._resign_versioned(cur.snapshot, signers, plan)
        self._resign_timestamp(cur, signers, plan)

    def _resign_timestamp(
        self, cur: _Current, signers: Mapping[str, Sequence[Signer]], plan: _Plan
    ) -> None:
        plan.timestamp = self._resign(cur.timestamp, signers["timestamp"])

    # -- writing ----------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        try:
            fd = os.open(self.path / _SETTINGS, os.O_RDONLY)
        except OSError as e:
            raise PublishError(f"{self.path} is not a repository: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[_Current]:
        """Hold the repository lock and give the current metadata to edit in place.

        On any failure the cached metadata (perhaps edited) is dropped.
        """
        with self._lock():
            try:
                yield self._current()
            except BaseException:
                self._state = None
                self._stamp = None
                raise

    def _publish(self, cur: _Current, plan: _Plan) -> None:
        """Carry out ``plan`` (:meth:`_apply`), then cache ``cur`` as published."""
        self._apply(plan)
        self._remember(cur)

    def _apply(self, plan: _Plan) -> None:
        """Carry out ``plan`` in the order the module docstring gives.

        Raises:
            PublishError: an I/O error before ``timestamp.json`` was replaced; what
                this call wrote is removed again (but never a root or a key it names).
        """
        for name, data in plan.versioned:
            path = self.metadata_dir / name
            if name.endswith(".root.json") and path.exists() and path.read_bytes() != data:
                raise PublishError(f"{path} exists with other content; a root is never rewritten")
        written: list[Path] = []
        made: list[Path] = []
        synced: set[Path] = set()
        root_written = False
        try:
            for role, signer in plan.keys:
                file = self.keys_dir / role / f"{signer.public_key.keyid}.pem"
                made += _private_dir(file.parent)
                write_atomic(file, signer.private_bytes, 0o600)
                written.append(file)
                synced.add(file.parent)
            for blob in plan.blobs:
                made += _makedirs(blob.dest.parent)
                fresh = not blob.dest.exists()
                if blob.source is not None:
                    _copy_verified(blob.source, blob.dest, blob.sha256, blob.length)
                else:
                    write_atomic(blob.dest, blob.data or b"")
                if fresh:
                    written.append(blob.dest)
                synced.add(blob.dest.parent)
            for directory in [*synced, *(d.parent for d in made)]:
                fsync_dir(directory)
            for name, data in plan.versioned:
                write_atomic(self.metadata_dir / name, data)
                written.append(self.metadata_dir / name)
                root_written = root_written or name.endswith(".root.json")
            if plan.versioned:
                fsync_dir(self.metadata_dir)
            if plan.timestamp is not None:
                write_atomic(self.metadata_dir / "timestamp.json", plan.timestamp)
        except BaseException as e:
            for path in reversed(written):
                if root_written and (path.name.endswith(".root.json") or path.suffix == ".pem"):
                    continue
                with contextlib.suppress(OSError):
                    path.unlink()
            for directory in reversed(made):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            if isinstance(e, OSError):
                where = f" {e.filename}" if e.filename else ""
                after = (
                    "; the new root is already published, run the command again to finish"
                    if root_written
                    else ""
                )
                raise PublishError(f"cannot write{where}: {e.strerror}{after}") from e
            raise
        # Published. What follows only makes it durable and tidies up: logged, not raised.
        if plan.timestamp is not None:
            try:
                fsync_dir(self.metadata_dir)
            except OSError as e:
                logger.warning("published, but %s was not synced: %s", self.metadata_dir, e)
        for path in plan.unlink:
            try:
                path.unlink(missing_ok=True)
                for directory in (path.parent, path.parent.parent):
                    if directory != self.targets_dir and not any(directory.iterdir()):
                        directory.rmdir()
            except OSError as e:
                logger.warning("published, but %s was not deleted: %s", path, e.strerror)
        for role, keyid in plan.retire:
            old = self.keys_dir / role / f"{keyid}.pem"
            try:
                if old.exists():
                    _private_dir(self.keys_dir / "retired" / role)
                    old.replace(self.keys_dir / "retired" / role / old.name)
            except OSError as e:
                logger.warning("published, but %s was not retired: %s", old, e.strerror)


# -- helpers ---------------------------------------------------------------------


def _sign(md: Metadata[Any], signers: Sequence[Signer]) -> None:
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)


def _to_bytes(md: Metadata[Any]) -> bytes:
    try:
        return md.to_bytes(_SERIALIZER)
    except (UnsignedMetadataError, ValueError) as e:
        raise PublishError(f"cannot serialise {md.signed.type} metadata: {e}") from None


class ReleaseFields(TypedDict, total=False):
    """What a target says of its release (its ``custom`` object), as keyword arguments.

    ``product`` and ``version`` are required; the others default to a normal, stable
    software release without EULA or actions.
    """

    product: Required[str]  # [A-Za-z0-9._-], 1-64 characters
    version: Required[str]  # SemVer 2.0
    kind: str  # software | content | config
    severity: str  # critical | normal
    channel: str  # stable | beta
    eula: str | None  # target path of the licence text (already published)
    actions: tuple[str, ...] | list[str]  # post-install actions for agents


def _info(fields: ReleaseFields) -> UpdateInfo:
    try:
        return UpdateInfo(**fields)
    except ValueError as e:
        raise PublishError(str(e)) from None


def _check_name(name: str) -> str:
    if not _FILE_NAME.match(name):
        raise PublishError(
            f"file name {name!r} cannot be used in a target path: use 1-128 letters, digits "
            "or '._~+-', not starting with '.' (or give another name)"
        )
    return name


def _same_release(other: TargetFile, info: UpdateInfo) -> bool:
    """Whether ``other`` is the same product and SemVer version (build metadata ignored).

    SemVer 2.0 forbids leading zeros, so two valid versions have equal precedence
    exactly when their texts before ``+`` are equal (spec items 2, 9-11): no parsing
    per existing target, which keeps ``add`` cheap on large repositories.
    """
    custom = other.custom if isinstance(other.custom, dict) else {}
    theirs = custom.get("version")
    return (
        custom.get("product") == info.product
        and isinstance(theirs, str)
        and theirs.partition("+")[0] == info.version.partition("+")[0]
    )


def _load_key(file: Path, keyid: str) -> Signer:
    """Load a PEM private key and check that it is the key ``keyid``.

    Raises:
        FileNotFoundError: no such file.
        PublishError: unreadable, not a key, or another key than ``keyid``.
    """
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise PublishError(f"{file} cannot be read: {e.strerror}") from None
    try:
        signer = CryptoSigner(load_pem_private_key(data, password=None))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PublishError(f"{file} is not a usable private key") from None
    if signer.public_key.keyid != keyid:
        raise PublishError(f"{file} holds another key than its name says (wrong key)")
    return signer


def _hash_file(file: Path) -> tuple[str, int]:
    """The sha256 and length of ``file`` (:func:`relay.storage.fsio.hash_file`).

    Raises:
        PublishError: missing, not a regular file, or unreadable.
    """
    try:
        if file.is_dir():
            raise PublishError(f"{file}: is a directory, not a file")
        if file.exists() and not file.is_file():
            raise PublishError(f"{file}: not a regular file")  # a FIFO would block
        return hash_file(file)
    except FileNotFoundError:
        raise PublishError(f"{file}: no such file") from None
    except OSError as e:
        raise PublishError(f"{file}: cannot be read: {e.strerror}") from None


def _copy_verified(source: Path, dest: Path, sha: str, length: int) -> None:
    """Copy ``source`` to ``dest`` atomically, checking it still has ``sha`` and ``length``.

    Raises:
        PublishError: the file changed since it was hashed.
        OSError: reading or writing failed.
    """
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        digest, copied = copy_hashed(source, tmp)
        if copied != length or digest != sha:
            raise PublishError(f"{source} changed while it was being added; try again")
        tmp.replace(dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _makedirs(path: Path) -> list[Path]:
    """Create ``path`` and missing parents; return the ones created, outermost first."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
    return list(reversed(missing))


def _private_dir(path: Path) -> list[Path]:
    """Like :func:`_makedirs`, each created directory 0700 whatever the umask."""
    made = _makedirs(path)
    for d in made:
        os.chmod(d, 0o700)  # noqa: PTH101 - the umask may have masked mkdir's mode
    return made


def format_table(targets: Sequence[Target]) -> str:
    """A readable table of targets for ``relay publish list``.

    Args:
        targets: the targets, in the order to show them.

    Returns:
        The table, one line per target under a header, without a final newline.
    """
    header = ("PATH", "VERSION", "KIND", "SEVERITY", "CHANNEL", "LENGTH", "SHA256")
    rows = [
        (
            t.path,
            t.version,
            str(t.info.kind),
            str(t.info.severity),
            str(t.info.channel),
            str(t.length),
            t.sha256[:12],
        )
        for t in targets
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


__all__ = ["DEFAULT_EXPIRES", "ROLES", "ReleaseFields", "Repository", "format_table"]
