"""The publisher: the vendor side that produces the TUF repository relays mirror.

Layout of a repository ``REPO``::

    REPO/repo.json              settings (expiry period per role)
    REPO/keys/                  0700; private Ed25519 keys (PKCS#8 PEM, 0600)
    REPO/keys/root/             root keys, kept apart so they can be moved offline
    REPO/keys/<role>/           targets, snapshot, timestamp keys
    REPO/keys/retired/          keys replaced by ``rotate``
    REPO/public/                the tree to serve, and nothing else
    REPO/public/metadata/       N.root.json (every version), N.snapshot.json,
                                N.targets.json, timestamp.json
    REPO/public/targets/<product>/<version>/<sha256>.<name>

Rules:

* Consistent snapshots (TUF 1.0 §5.5): every file but ``timestamp.json`` is
  immutable under its versioned or hashed name.
* A command validates everything (arguments, files, keys, versions) before it
  writes anything; a failure raises :class:`relay.errors.PublishError` with one
  line and leaves the repository exactly as it was.
* Writes go through a temp file in the same directory, fsync and ``os.replace``:
  blobs first, versioned metadata next, ``timestamp.json`` last, so a server
  never points at a file that is not there yet.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from tuf.api.serialization.json import JSONSerializer

from relay._internal.fsio import write_atomic
from relay._internal.semver import Version
from relay.errors import PublishError
from relay.model import Target, UpdateInfo, check_product

ROLES = ("root", "targets", "snapshot", "timestamp")
DEFAULT_EXPIRES: dict[str, float] = {
    "root": 365 * 86400.0,
    "targets": 90 * 86400.0,
    "snapshot": 30 * 86400.0,
    "timestamp": 86400.0,
}
_SETTINGS = "repo.json"
_SERIALIZER = JSONSerializer(compact=True)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass(frozen=True, slots=True)
class _Current:
    root: Metadata[Root]
    timestamp: Metadata[Timestamp]
    snapshot: Metadata[Snapshot]
    targets: Metadata[Targets]


class Repository:
    """A publisher's TUF repository on disk.

    Use :meth:`init` to create one and :meth:`open` to use an existing one.
    """

    def __init__(self, path: Path, expires: Mapping[str, float]) -> None:
        self.path = path
        self.expires = dict(expires)
        self._signers: dict[str, list[Signer]] = {}

    # -- paths ------------------------------------------------------------------

    @property
    def public_dir(self) -> Path:
        """The tree to serve."""
        return self.path / "public"

    @property
    def metadata_dir(self) -> Path:
        """``public/metadata``."""
        return self.public_dir / "metadata"

    @property
    def targets_dir(self) -> Path:
        """``public/targets``."""
        return self.public_dir / "targets"

    @property
    def keys_dir(self) -> Path:
        """Private keys (never under ``public/``)."""
        return self.path / "keys"

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

        Raises:
            PublishError: ``path`` is a non-empty directory, the threshold is not
                between 1 and the number of root keys, or an expiry names an unknown role.
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
            if seconds <= 0:
                raise PublishError(f"--expires: {role} period must be positive")
            periods[role] = float(seconds)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise PublishError(f"{path} already exists and is not an empty directory")
        created = not path.exists()
        try:
            repo = cls(path, periods)
            repo._create(root_keys, root_threshold)
        except BaseException:
            # A half-made repository is removed, so the command left nothing behind.
            if created:
                shutil.rmtree(path, ignore_errors=True)
            else:
                for child in path.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink()
            raise
        return repo

    def _create(self, root_keys: int, threshold: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.keys_dir.mkdir(mode=0o700)
        os.chmod(self.keys_dir, 0o700)  # noqa: PTH101 - umask may have masked mkdir's mode
        now = _now()
        root = Metadata(Root(expires=now + self._period("root"), consistent_snapshot=True))
        signers: dict[str, list[Signer]] = {}
        for role in ROLES:
            count = root_keys if role == "root" else 1
            signers[role] = []
            for _ in range(count):
                signer = CryptoSigner.generate_ed25519()
                root.signed.add_key(signer.public_key, role)
                self._save_key(role, signer)
                signers[role].append(signer)
        root.signed.roles["root"].threshold = threshold
        self._signers = signers
        for root_signer in signers["root"]:
            root.sign(root_signer, append=True)
        targets = Metadata(Targets(expires=now + self._period("targets")))
        snapshot = Metadata(Snapshot(expires=now + self._period("snapshot")))
        timestamp = Metadata(Timestamp(expires=now + self._period("timestamp")))
        self._sign(targets, "targets")
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
        self._sign(snapshot, "snapshot")
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        self._sign(timestamp, "timestamp")
        write_atomic(self.path / _SETTINGS, json.dumps({"expires": self.expires}).encode())
        self._write(
            [("1.root.json", root), ("1.targets.json", targets), ("1.snapshot.json", snapshot)],
            timestamp,
        )

    @classmethod
    def open(cls, path: Path) -> Repository:
        """Open an existing repository.

        Raises:
            PublishError: ``path`` is not a repository made by ``relay publish init``.
        """
        settings = path / _SETTINGS
        if not settings.is_file() or not (path / "public" / "metadata").is_dir():
            raise PublishError(f"{path} is not a repository (run: relay publish init {path})")
        try:
            data = json.loads(settings.read_bytes())
            expires = {r: float(data["expires"].get(r, DEFAULT_EXPIRES[r])) for r in ROLES}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PublishError(f"{settings} is damaged: {e}") from None
        return cls(path, expires)

    # -- keys -------------------------------------------------------------------

    def _period(self, role: str) -> dt.timedelta:
        return dt.timedelta(seconds=self.expires[role])

    def _save_key(self, role: str, signer: CryptoSigner) -> None:
        directory = self.keys_dir / role
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)  # noqa: PTH101
        write_atomic(directory / f"{signer.public_key.keyid}.pem", signer.private_bytes, 0o600)

    def _load_signers(self, role: str, root: Root) -> list[Signer]:
        """The signers of ``role`` whose keys ``root`` lists (at least a threshold).

        Raises:
            PublishError: fewer usable keys than the role's threshold.
        """
        wanted = set(root.roles[role].keyids)
        threshold = root.roles[role].threshold
        signers: list[Signer] = []
        directory = self.keys_dir / role
        if directory.is_dir():
            for file in sorted(directory.glob("*.pem")):
                if file.stem not in wanted:
                    continue
                try:
                    private = load_pem_private_key(file.read_bytes(), password=None)
                    signer = CryptoSigner(private)
                except (ValueError, TypeError, OSError) as e:
                    raise PublishError(f"key {file} cannot be loaded: {e}") from None
                if signer.public_key.keyid != file.stem:
                    raise PublishError(f"key {file} does not match its name (wrong key)")
                signers.append(signer)
        if len(signers) < threshold:
            raise PublishError(
                f"missing or wrong {role} key: found {len(signers)} of the {threshold} "
                f"needed in {directory}"
            )
        return signers

    def signer(self, role: str) -> Signer:
        """A signer of ``role`` (for tools and tests that craft metadata).

        Raises:
            PublishError: no usable key.
        """
        return self._load_signers(role, self._current().root.signed)[0]

    def _sign(self, md: Metadata[Any], role: str) -> None:
        md.signatures.clear()
        for signer in self._signers[role]:
            md.sign(signer, append=True)

    # -- reading ----------------------------------------------------------------

    def _root_versions(self) -> list[int]:
        versions = []
        for f in self.metadata_dir.glob("*.root.json"):
            head = f.name.split(".", 1)[0]
            if head.isdigit():
                versions.append(int(head))
        return sorted(versions)

    def root_bytes(self, version: int | None = None) -> bytes:
        """The bytes of ``N.root.json`` (the newest when ``version`` is None).

        Raises:
            PublishError: no such root version.
        """
        versions = self._root_versions()
        if not versions:
            raise PublishError(f"{self.metadata_dir} has no root metadata")
        n = versions[-1] if version is None else version
        path = self.metadata_dir / f"{n}.root.json"
        if not path.is_file():
            raise PublishError(f"no root version {n} in {self.metadata_dir}")
        return path.read_bytes()

    def _current(self) -> _Current:
        try:
            root = Metadata[Root].from_bytes(self.root_bytes())
            timestamp = Metadata[Timestamp].from_file(str(self.metadata_dir / "timestamp.json"))
            snap_v = timestamp.signed.snapshot_meta.version
            snapshot = Metadata[Snapshot].from_file(
                str(self.metadata_dir / f"{snap_v}.snapshot.json")
            )
            targets_v = snapshot.signed.meta["targets.json"].version
            targets = Metadata[Targets].from_file(
                str(self.metadata_dir / f"{targets_v}.targets.json")
            )
        except (OSError, ValueError, KeyError) as e:
            raise PublishError(f"repository metadata cannot be read: {e}") from None
        return _Current(root, timestamp, snapshot, targets)

    def targets(self) -> list[Target]:
        """Every target, sorted by product then SemVer.

        Raises:
            PublishError: the metadata cannot be read.
        """
        out = []
        for tf in self._current().targets.signed.targets.values():
            try:
                out.append(Target.from_targetfile(tf))
            except ValueError:
                continue
        out.sort(key=lambda t: (t.product, t.info.semver, t.path))
        return out

    # -- commands ---------------------------------------------------------------

    def add(
        self,
        file: Path,
        *,
        product: str,
        version: str,
        kind: str = "software",
        severity: str = "normal",
        channel: str = "stable",
        eula: str | None = None,
        actions: Sequence[str] = (),
        name: str | None = None,
    ) -> Target:
        """Add ``file`` as target ``<product>/<version>/<name>`` and re-sign.

        Raises:
            PublishError: a bad field, a missing file, the same product and version
                with other bytes, or a missing or wrong key.
        """
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            raise PublishError(f"{file}: no such file") from None
        except IsADirectoryError:
            raise PublishError(f"{file}: is a directory, not a file") from None
        except OSError as e:
            raise PublishError(f"{file}: cannot be read: {e.strerror}") from None
        return self.add_bytes(
            data,
            name or file.name,
            product=product,
            version=version,
            kind=kind,
            severity=severity,
            channel=channel,
            eula=eula,
            actions=actions,
        )

    def add_bytes(
        self,
        data: bytes,
        name: str,
        *,
        product: str,
        version: str,
        kind: str = "software",
        severity: str = "normal",
        channel: str = "stable",
        eula: str | None = None,
        actions: Sequence[str] = (),
    ) -> Target:
        """Add ``data`` as target ``<product>/<version>/<name>`` and re-sign.

        Raises:
            PublishError: as :meth:`add`.
        """
        try:
            info = UpdateInfo(
                product=product,
                version=version,
                kind=kind,
                severity=severity,
                channel=channel,
                eula=eula,
                actions=tuple(actions),
            )
        except ValueError as e:
            raise PublishError(str(e)) from None
        if not name or "/" in name or name in {".", ".."} or name.startswith("."):
            raise PublishError(f"file name {name!r} is not usable in a target path")
        path = f"{product}/{version}/{name}"
        current = self._current()
        tf = TargetFile.from_data(path, data, ["sha256"])
        tf.unrecognized_fields["custom"] = info.to_dict()
        existing = current.targets.signed.targets
        for other_path, other in existing.items():
            other_custom = other.custom if isinstance(other.custom, dict) else {}
            same_release = other_custom.get("product") == product and _same_version(
                other_custom.get("version"), version
            )
            if other_path == path or same_release:
                if other_path == path and other.hashes == tf.hashes and other.custom == tf.custom:
                    return Target.from_targetfile(other)  # the same bytes again: nothing to do
                raise PublishError(
                    f"{product} {version} is already published as {other_path} with other "
                    "content; publish a new version instead"
                )
        self._signers = {r: self._load_signers(r, current.root.signed) for r in ROLES[1:]}
        targets = current.targets
        targets.signed.targets[path] = tf
        sha = tf.hashes["sha256"]
        blob = self.targets_dir / product / version / f"{sha}.{name}"
        write_atomic(blob, data)
        self._publish(current, targets)
        return Target.from_targetfile(tf)

    def remove(self, target_path: str) -> None:
        """Remove a target from the metadata (then its blob) and re-sign.

        Raises:
            PublishError: no such target, or a missing or wrong key.
        """
        current = self._current()
        tf = current.targets.signed.targets.get(target_path)
        if tf is None:
            raise PublishError(f"no target {target_path!r} (see: relay publish list)")
        self._signers = {r: self._load_signers(r, current.root.signed) for r in ROLES[1:]}
        del current.targets.signed.targets[target_path]
        self._publish(current, current.targets)
        directory, _, name = target_path.rpartition("/")
        blob = self.targets_dir / directory / f"{tf.hashes['sha256']}.{name}"
        with contextlib.suppress(FileNotFoundError):
            blob.unlink()

    def refresh(self) -> None:
        """Re-sign ``timestamp.json`` with a new version and expiry.

        Raises:
            PublishError: a missing or wrong timestamp key.
        """
        current = self._current()
        self._signers = {"timestamp": self._load_signers("timestamp", current.root.signed)}
        timestamp = current.timestamp
        timestamp.signed.version += 1
        timestamp.signed.expires = _now() + self._period("timestamp")
        self._sign(timestamp, "timestamp")
        self._write([], timestamp)

    def rotate(self, role: str) -> None:
        """Replace the keys of ``role`` with fresh ones.

        A new root version lists the new keys; it is signed by a threshold of the
        current root keys and, when root itself rotates, by the new root keys too.
        The role and those that depend on it are then re-signed.

        Raises:
            PublishError: an unknown role, or missing or wrong keys.
        """
        if role not in ROLES:
            raise PublishError(f"unknown role {role!r} (use {', '.join(ROLES)})")
        current = self._current()
        old_root_signers = self._load_signers("root", current.root.signed)
        self._signers = {r: self._load_signers(r, current.root.signed) for r in ROLES[1:]}
        root = current.root
        old_keyids = list(root.signed.roles[role].keyids)
        fresh = [CryptoSigner.generate_ed25519() for _ in old_keyids]
        for keyid in old_keyids:
            root.signed.revoke_key(keyid, role)
        for signer in fresh:
            root.signed.add_key(signer.public_key, role)
        root.signed.version += 1
        root.signed.expires = _now() + self._period("root")
        root.signatures.clear()
        signers_for_root = [*old_root_signers, *(fresh if role == "root" else [])]
        for root_signer in signers_for_root:
            root.sign(root_signer, append=True)
        # Write the new keys before anything refers to them; retire the old ones.
        for new_signer in fresh:
            self._save_key(role, new_signer)
        self._signers[role] = list(fresh)
        if role == "root":
            self._signers["root"] = list(fresh)
        root_name = f"{root.signed.version}.root.json"
        timestamp = current.timestamp
        versioned: list[tuple[str, Metadata[Any]]] = [(root_name, root)]
        if role == "targets":
            self._publish(current, current.targets, extra=versioned)
        elif role == "snapshot":
            snapshot = current.snapshot
            snapshot.signed.version += 1
            snapshot.signed.expires = _now() + self._period("snapshot")
            self._sign(snapshot, "snapshot")
            versioned.append((f"{snapshot.signed.version}.snapshot.json", snapshot))
            timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
            self._bump_timestamp(timestamp)
            self._write(versioned, timestamp)
        else:
            self._bump_timestamp(timestamp)
            self._write(versioned, timestamp)
        retired = self.keys_dir / "retired" / role
        retired.mkdir(parents=True, mode=0o700, exist_ok=True)
        for keyid in old_keyids:
            old = self.keys_dir / role / f"{keyid}.pem"
            if old.exists():
                old.replace(retired / old.name)

    # -- writing ----------------------------------------------------------------

    def _bump_timestamp(self, timestamp: Metadata[Timestamp]) -> None:
        timestamp.signed.version += 1
        timestamp.signed.expires = _now() + self._period("timestamp")
        self._sign(timestamp, "timestamp")

    def _publish(
        self,
        current: _Current,
        targets: Metadata[Targets],
        extra: list[tuple[str, Metadata[Any]]] | None = None,
    ) -> None:
        now = _now()
        targets.signed.version += 1
        targets.signed.expires = now + self._period("targets")
        self._sign(targets, "targets")
        snapshot = current.snapshot
        snapshot.signed.version += 1
        snapshot.signed.expires = now + self._period("snapshot")
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
        self._sign(snapshot, "snapshot")
        timestamp = current.timestamp
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        self._bump_timestamp(timestamp)
        files = list(extra or [])
        files += [
            (f"{targets.signed.version}.targets.json", targets),
            (f"{snapshot.signed.version}.snapshot.json", snapshot),
        ]
        self._write(files, timestamp)

    def _write(
        self, versioned: list[tuple[str, Metadata[Any]]], timestamp: Metadata[Timestamp]
    ) -> None:
        # Serialise everything first: a signing or encoding failure writes nothing.
        try:
            blobs = [(name, md.to_bytes(_SERIALIZER)) for name, md in versioned]
            ts_bytes = timestamp.to_bytes(_SERIALIZER)
        except (UnsignedMetadataError, ValueError) as e:
            raise PublishError(f"cannot serialise metadata: {e}") from None
        for name, data in blobs:
            path = self.metadata_dir / name
            if path.exists() and path.read_bytes() != data:
                raise PublishError(f"{path} exists with other content; refusing to overwrite")
        for name, data in blobs:
            write_atomic(self.metadata_dir / name, data)
        write_atomic(self.metadata_dir / "timestamp.json", ts_bytes)


def _same_version(a: object, b: str) -> bool:
    if not isinstance(a, str):
        return False
    try:
        return Version.parse(a) == Version.parse(b)
    except ValueError:
        return a == b


def format_table(targets: Sequence[Target]) -> str:
    """A readable table of targets for ``relay publish list``."""
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


__all__ = ["DEFAULT_EXPIRES", "ROLES", "Repository", "check_product", "format_table"]
