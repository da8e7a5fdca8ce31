"""TUF verification state, without I/O.

This is the only module of relay that touches python-tuf's private
``TrustedMetadataSet`` (``tuf.ngclient._internal``); ``tests/test_verify.py`` pins its
behaviour so that an upgrade of python-tuf breaks loudly and here.

Rules:

* Every function takes ``bytes`` and returns verified objects; nothing here reads a
  file, a socket or the clock except through python-tuf's reference time.
* A :class:`TrustSession` follows the TUF client workflow exactly as
  ``ngclient.Updater`` does: start from the newest root already trusted, walk
  ``N+1.root.json`` forward, load the last verified timestamp and snapshot *as
  intermediate* metadata (so an older timestamp or snapshot replayed by an upstream
  is refused, even after a restart), then the new timestamp, snapshot, targets and
  delegated targets.
* Metadata is kept byte-for-byte: :class:`VerifiedMetadata` holds the exact bytes
  each role was verified from, under the file name clients ask for.
* python-tuf's exceptions are translated at this boundary into
  :class:`relay.errors.MetadataRejectedError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
from tuf.ngclient.config import EnvelopeType

from relay.core.model import Target
from relay.errors import MetadataRejectedError

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Iterator, Mapping

# Upper bounds on metadata sizes, as python-tuf's UpdaterConfig defaults.
ROOT_MAX_LENGTH = 512_000
TIMESTAMP_MAX_LENGTH = 16_384
SNAPSHOT_MAX_LENGTH = 2_000_000
TARGETS_MAX_LENGTH = 5_000_000
MAX_ROOT_ROTATIONS = 256
MAX_DELEGATIONS = 64


class TimestampOutcome(Enum):
    """What a new timestamp means for a sync run."""

    NEW = "new"  # a newer timestamp: go on with snapshot and targets
    UNCHANGED = "unchanged"  # the same version as the one already trusted


def _reject(role: str, exc: Exception) -> MetadataRejectedError:
    reason = str(exc) or type(exc).__name__
    return MetadataRejectedError(role, f"{type(exc).__name__}: {reason}")


@dataclass(frozen=True, slots=True)
class VerifiedMetadata:
    """One consistent, verified generation of repository metadata.

    Attributes:
        files: served file name (``3.root.json``, ``timestamp.json``,
            ``7.snapshot.json``, ``7.targets.json``, ``2.<role>.json``) to the exact
            bytes verified.
        root_version: the newest trusted root version.
        timestamp_version: the version of ``timestamp.json``.
        expires: the earliest expiry among timestamp, snapshot and targets roles (UTC);
            past it, clients refuse what the relay serves.
        targets: target path to :class:`Target` (first role in delegation order wins).
    """

    files: Mapping[str, bytes]
    root_version: int
    timestamp_version: int
    expires: dt.datetime
    targets: Mapping[str, Target]
    invalid_targets: tuple[str, ...] = ()
    by_sha256: Mapping[str, Target] = field(default_factory=dict)

    def target_for_url(self, url_path: str) -> Target | None:
        """Return the target served at ``targets/<url_path>``, or ``None``.

        ``url_path`` is ``<dir>/<sha256>.<name>`` as a consistent-snapshot client asks.
        """
        directory, _, leaf = url_path.rpartition("/")
        sha, dot, name = leaf.partition(".")
        if not dot:
            return None
        target = self.by_sha256.get(sha)
        if target is not None and target.url_path == url_path:
            return target
        # Two targets may share bytes (same sha256) under different paths.
        path = f"{directory}/{name}" if directory else name
        target = self.targets.get(path)
        if target is not None and target.sha256 == sha:
            return target
        return None

    def products(self) -> dict[str, list[Target]]:
        """Return the targets grouped by product, each list sorted by SemVer."""
        out: dict[str, list[Target]] = {}
        for target in self.targets.values():
            out.setdefault(target.product, []).append(target)
        for versions in out.values():
            versions.sort(key=lambda t: t.info.semver)
        return out


class TrustSession:
    """One verification run over a ``TrustedMetadataSet``.

    Args:
        trusted_root: bytes of the newest root already trusted (the pinned root, or
            a newer one this relay verified earlier).
        reference_time: the time expiry is judged at (UTC); ``None`` for now. Only
            used to reload, at start-up, metadata verified at an earlier time.

    Raises:
        MetadataRejectedError: ``trusted_root`` is not a valid root.
    """

    def __init__(self, trusted_root: bytes, reference_time: dt.datetime | None = None) -> None:
        try:
            self._set = TrustedMetadataSet(trusted_root, EnvelopeType.METADATA)
        except (tuf_exceptions.RepositoryError, ValueError, TypeError) as e:
            raise _reject("root", e) from e
        if reference_time is not None:
            self._set.reference_time = reference_time
        self._files: dict[str, bytes] = {}
        self._loaded_roles: list[str] = []
        self._delegators: dict[str, str] = {}
        self._roots: dict[int, bytes] = {self._set.root.version: trusted_root}

    # -- root -------------------------------------------------------------

    @property
    def root(self) -> Root:
        """The newest trusted root."""
        return self._set.root

    @property
    def next_root_version(self) -> int:
        """The root version to ask the upstream for next."""
        return self._set.root.version + 1

    def update_root(self, data: bytes) -> Root:
        """Verify ``data`` as root version :attr:`next_root_version`.

        Raises:
            MetadataRejectedError: it is not signed by the current and its own keys,
                or its version is not the next one.
        """
        try:
            root = self._set.update_root(data)
        except (tuf_exceptions.RepositoryError, ValueError, TypeError) as e:
            raise _reject("root", e) from e
        self._roots[root.version] = data
        return root

    @property
    def roots(self) -> Mapping[int, bytes]:
        """Every root walked in this session, by version."""
        return dict(self._roots)

    # -- timestamp, snapshot, targets --------------------------------------

    def load_trusted_timestamp(self, data: bytes) -> None:
        """Load the last verified timestamp as intermediate metadata.

        It only serves rollback protection: an upstream cannot make this relay go
        back to an older timestamp or snapshot version. Invalid or expired stored
        data is ignored (the upstream's must then verify on its own).
        """
        try:
            self._set.update_timestamp(data)
        except (tuf_exceptions.RepositoryError, ValueError, TypeError):
            return

    def update_timestamp(self, data: bytes) -> TimestampOutcome:
        """Verify the upstream's ``timestamp.json``.

        Returns:
            :attr:`TimestampOutcome.UNCHANGED` if it is the version already trusted.

        Raises:
            MetadataRejectedError: bad signature, older version (a replay), older
                snapshot version, or expired.
        """
        try:
            self._set.update_timestamp(data)
        except tuf_exceptions.EqualVersionNumberError:
            if self._set.timestamp.is_expired(self._set.reference_time):
                raise MetadataRejectedError("timestamp", "timestamp.json is expired") from None
            return TimestampOutcome.UNCHANGED
        except (tuf_exceptions.RepositoryError, ValueError, TypeError) as e:
            raise _reject("timestamp", e) from e
        self._files["timestamp.json"] = data
        return TimestampOutcome.NEW

    @property
    def snapshot_version(self) -> int:
        """The snapshot version the trusted timestamp names."""
        return self._set.timestamp.snapshot_meta.version

    def snapshot_max_length(self) -> int:
        """The signed length of the snapshot, or a default bound."""
        return self._set.timestamp.snapshot_meta.length or SNAPSHOT_MAX_LENGTH

    def load_trusted_snapshot(self, data: bytes) -> bool:
        """Load the last verified snapshot (intermediate, for rollback protection).

        Returns:
            True if it is also valid as the final snapshot (nothing to download).
        """
        try:
            self._set.update_snapshot(data, trusted=True)
        except (tuf_exceptions.RepositoryError, ValueError, TypeError):
            return Snapshot.type in self._set and self._final_snapshot_ok()
        return True

    def _final_snapshot_ok(self) -> bool:
        snapshot = self._set.snapshot
        return (
            not snapshot.is_expired(self._set.reference_time)
            and snapshot.version == self._set.timestamp.snapshot_meta.version
        )

    def update_snapshot(self, data: bytes) -> Snapshot:
        """Verify the upstream's snapshot against the trusted timestamp.

        Raises:
            MetadataRejectedError: hash or length mismatch, bad signature, a version
                other than the timestamp names, rollback of a role, or expired.
        """
        try:
            snapshot = self._set.update_snapshot(data)
        except (tuf_exceptions.RepositoryError, ValueError, TypeError) as e:
            raise _reject("snapshot", e) from e
        self._files[f"{snapshot.version}.snapshot.json"] = data
        return snapshot

    def snapshot_bytes_name(self) -> str:
        """The served file name of the trusted snapshot."""
        return f"{self._set.snapshot.version}.snapshot.json"

    def roles_to_load(self) -> Iterator[tuple[str, str, int, int]]:
        """Yield ``(role, delegator, version, max_length)`` in load order.

        Top-level ``targets`` first, then delegated roles breadth first. Call
        :meth:`update_targets` for each before asking for the next.
        """
        meta = self._set.snapshot.meta
        info = meta.get("targets.json")
        if info is None:
            return
        yield "targets", "root", info.version, info.length or TARGETS_MAX_LENGTH
        queue = ["targets"]
        seen = {"targets"}
        while queue and len(seen) <= MAX_DELEGATIONS:
            delegator = queue.pop(0)
            if delegator not in self._set:
                continue
            delegations = self._set[delegator]
            assert isinstance(delegations, Targets)
            if delegations.delegations is None or delegations.delegations.roles is None:
                continue
            for name in delegations.delegations.roles:
                role_info = meta.get(f"{name}.json")
                if name in seen or role_info is None:
                    continue
                seen.add(name)
                queue.append(name)
                yield name, delegator, role_info.version, role_info.length or TARGETS_MAX_LENGTH

    def update_targets(self, role: str, delegator: str, data: bytes) -> Targets:
        """Verify targets metadata of ``role`` (``targets`` or a delegated role).

        Raises:
            MetadataRejectedError: hash, length, version or signature mismatch, or expired.
        """
        try:
            if role == Targets.type:
                targets = self._set.update_targets(data)
            else:
                targets = self._set.update_delegated_targets(data, role, delegator)
        except (tuf_exceptions.RepositoryError, ValueError, TypeError) as e:
            raise _reject(role, e) from e
        self._files[f"{targets.version}.{role}.json"] = data
        self._loaded_roles.append(role)
        self._delegators[role] = delegator
        return targets

    def result(self, previous: VerifiedMetadata | None = None) -> VerifiedMetadata:
        """Return the verified generation built in this session.

        Files not downloaded in this session (an unchanged snapshot, say) are taken
        from ``previous``.

        Raises:
            MetadataRejectedError: the session did not reach a complete, valid state.
        """
        if Timestamp.type not in self._set or Snapshot.type not in self._set:
            raise MetadataRejectedError("snapshot", "no complete verified metadata")
        if Targets.type not in self._set:
            raise MetadataRejectedError("targets", "no verified targets metadata")
        files: dict[str, bytes] = {}
        for version, data in self._roots.items():
            files[f"{version}.root.json"] = data
        old_files = previous.files if previous is not None else {}
        for name, data in old_files.items():
            if name.endswith(".root.json"):
                files.setdefault(name, data)
        timestamp = self._files.get("timestamp.json") or old_files.get("timestamp.json")
        if timestamp is None:
            raise MetadataRejectedError("timestamp", "no verified timestamp bytes")
        files["timestamp.json"] = timestamp
        snap_name = self.snapshot_bytes_name()
        snap = self._files.get(snap_name) or old_files.get(snap_name)
        if snap is None:
            raise MetadataRejectedError("snapshot", f"no verified bytes for {snap_name}")
        files[snap_name] = snap

        targets: dict[str, Target] = {}
        by_sha: dict[str, Target] = {}
        invalid: list[str] = []
        expiries = [self._set.timestamp.expires, self._set.snapshot.expires]
        paths: dict[str, None] = {}
        for role_name in self._loaded_roles:
            role = self._set[role_name]
            assert isinstance(role, Targets)
            name = f"{role.version}.{role_name}.json"
            role_data = self._files.get(name) or old_files.get(name)
            if role_data is None:
                raise MetadataRejectedError(role_name, f"no verified bytes for {name}")
            files[name] = role_data
            expiries.append(role.expires)
            paths.update(dict.fromkeys(role.targets))
        for path in paths:
            # The target a TUF client would resolve for this path, if any: a role may
            # only sign paths its delegators gave it, and the search order decides
            # which role wins when several sign the same path.
            tf = self._resolve(path)
            if tf is None:
                continue
            try:
                target = Target.from_targetfile(tf)
            except ValueError:
                # A target without relay's custom fields is still mirrored for
                # TUF clients, but it is not an update relay can offer.
                invalid.append(path)
                continue
            targets[path] = target
            by_sha.setdefault(target.sha256, target)
        return VerifiedMetadata(
            files=files,
            root_version=self._set.root.version,
            timestamp_version=self._set.timestamp.version,
            expires=min(expiries),
            targets=targets,
            invalid_targets=tuple(invalid),
            by_sha256=by_sha,
        )

    def _resolve(self, path: str) -> TargetFile | None:
        """The target file of ``path`` as a TUF client resolves it.

        The search of the TUF specification (section 5.6.7.2, python-tuf's
        ``_preorder_depth_first_walk``): depth-first and pre-order from the
        top-level ``targets``, children in their listed order, only through
        delegations whose paths cover ``path``; a ``terminating`` delegation
        that covers ``path`` ends the search of every role not yet visited;
        at most :data:`MAX_DELEGATIONS` roles are visited.
        """
        to_visit = [Targets.type]
        visited: set[str] = set()
        while to_visit and len(visited) < MAX_DELEGATIONS:
            role_name = to_visit.pop()
            if role_name in visited or role_name not in self._set:
                continue
            visited.add(role_name)
            role = self._set[role_name]
            assert isinstance(role, Targets)
            found = role.targets.get(path)
            if found is not None:
                return found
            if role.delegations is None:
                continue
            children = []
            for child, terminating in role.delegations.get_roles_for_target(path):
                children.append(child)
                if terminating:
                    to_visit.clear()
                    break
            to_visit.extend(reversed(children))
        return None


def root_version(data: bytes) -> int:
    """Return the version of a root given as bytes, verifying only its form.

    Raises:
        MetadataRejectedError: the bytes are not root metadata.
    """
    try:
        md = Metadata[Root].from_bytes(data)
    except (tuf_exceptions.RepositoryError, ValueError, TypeError, KeyError) as e:
        raise _reject("root", e) from e
    if not isinstance(md.signed, Root):
        raise MetadataRejectedError("root", f"expected root metadata, got {md.signed.type}")
    return md.signed.version
