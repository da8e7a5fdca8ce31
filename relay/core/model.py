"""Domain types shared by the publisher, the relay and the agent.

A target path is ``<product>/<version>/<file name>``; its TUF ``custom`` object
carries the fields of docs/PROTOCOL.md (``product``, ``version``, ``kind``,
``severity``, ``channel``, optional ``eula`` and ``actions``). :class:`UpdateInfo`
validates them in ``__init__``, round-trips through ``from_dict``/``to_dict`` and
keeps fields it does not know in ``unrecognized_fields`` (after python-tuf's
``MetaFile``), so a newer publisher does not break an older relay.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from relay.core.semver import Version

if TYPE_CHECKING:
    from tuf.api.metadata import TargetFile

_PRODUCT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Kind(StrEnum):
    """What an update is; decides the "install undefined" default."""

    SOFTWARE = "software"
    """Programs: wait for approval by default."""
    CONTENT = "content"
    """Signatures and other data: flow without approval by default."""
    CONFIG = "config"
    """Configuration files: may be limited to once a day."""


class Severity(StrEnum):
    """Critical updates may be approved automatically."""

    CRITICAL = "critical"
    """Approved automatically while "auto-approve critical" is on."""
    NORMAL = "normal"


class Channel(StrEnum):
    """Only ``channel`` decides what is beta."""

    STABLE = "stable"
    BETA = "beta"
    """Offered only to groups that opt into beta."""


def is_sha256(text: str) -> bool:
    """Return whether ``text`` is a lowercase hex sha256 digest."""
    return _SHA256.match(text) is not None


def check_product(name: str) -> str:
    """Return ``name`` if it is a valid product name.

    Raises:
        ValueError: the name is empty, too long, or has characters outside ``[A-Za-z0-9._-]``.
    """
    if not _PRODUCT.match(name) or name in {".", ".."}:
        raise ValueError(
            f"product {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-'"
        )
    return name


class UpdateInfo:
    """The ``custom`` object of a target.

    Raises:
        ValueError: on construction, when a field is missing or malformed.
    """

    __slots__ = (
        "actions",
        "channel",
        "eula",
        "kind",
        "product",
        "severity",
        "unrecognized_fields",
        "version",
    )

    def __init__(
        self,
        product: str,
        version: str,
        kind: Kind | str = Kind.SOFTWARE,
        severity: Severity | str = Severity.NORMAL,
        channel: Channel | str = Channel.STABLE,
        eula: str | None = None,
        actions: tuple[str, ...] | list[str] = (),
        unrecognized_fields: dict[str, Any] | None = None,
    ) -> None:
        self.product = check_product(product)
        Version.parse(version)
        self.version = version
        try:
            self.kind = Kind(kind)
        except ValueError:
            raise ValueError(f"kind {kind!r} must be one of software, content, config") from None
        try:
            self.severity = Severity(severity)
        except ValueError:
            raise ValueError(f"severity {severity!r} must be critical or normal") from None
        try:
            self.channel = Channel(channel)
        except ValueError:
            raise ValueError(f"channel {channel!r} must be stable or beta") from None
        if eula is not None and (not isinstance(eula, str) or not eula):
            raise ValueError(f"eula {eula!r} must be a target path")
        self.eula = eula
        if not all(isinstance(a, str) and a for a in actions):
            raise ValueError(f"actions {actions!r} must be non-empty strings")
        self.actions = tuple(actions)
        self.unrecognized_fields = dict(unrecognized_fields or {})

    @property
    def semver(self) -> Version:
        """The parsed version (SemVer precedence orders versions)."""
        return Version.parse(self.version)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UpdateInfo:
        """Build from a ``custom`` object.

        Raises:
            ValueError: a field is missing or malformed.
        """
        data = dict(data)
        try:
            product = data.pop("product")
            version = data.pop("version")
        except KeyError as e:
            raise ValueError(f"custom object lacks {e.args[0]!r}") from None
        if not isinstance(product, str) or not isinstance(version, str):
            raise ValueError("custom product and version must be strings")
        actions = data.pop("actions", [])
        if not isinstance(actions, list):
            raise ValueError(f"custom actions {actions!r} must be a list")
        return cls(
            product=product,
            version=version,
            kind=data.pop("kind", Kind.SOFTWARE),
            severity=data.pop("severity", Severity.NORMAL),
            channel=data.pop("channel", Channel.STABLE),
            eula=data.pop("eula", None),
            actions=actions,
            unrecognized_fields=data,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the ``custom`` object."""
        out: dict[str, Any] = {
            "product": self.product,
            "version": self.version,
            "kind": str(self.kind),
            "severity": str(self.severity),
            "channel": str(self.channel),
        }
        if self.eula is not None:
            out["eula"] = self.eula
        if self.actions:
            out["actions"] = list(self.actions)
        out.update(self.unrecognized_fields)
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UpdateInfo):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.product, self.version))

    def __repr__(self) -> str:
        return f"UpdateInfo({self.to_dict()!r})"


@dataclass(frozen=True, slots=True)
class Target:
    """One verified target: where it lives, what it is, and its signed hash and length."""

    path: str
    length: int
    sha256: str
    info: UpdateInfo

    @property
    def product(self) -> str:
        """The product this target belongs to."""
        return self.info.product

    @property
    def version(self) -> str:
        """The SemVer version text."""
        return self.info.version

    @property
    def url_path(self) -> str:
        """The consistent-snapshot URL path under ``targets/``: ``<dir>/<sha256>.<name>``."""
        directory, name = posixpath.split(self.path)
        return f"{directory}/{self.sha256}.{name}" if directory else f"{self.sha256}.{name}"

    @classmethod
    def from_targetfile(cls, tf: TargetFile) -> Target:
        """Build from a verified python-tuf ``TargetFile``.

        Raises:
            ValueError: it has no sha256, or its ``custom`` object is malformed.
        """
        sha = tf.hashes.get("sha256")
        if sha is None or not is_sha256(sha):
            raise ValueError(f"target {tf.path} has no sha256 hash")
        custom = tf.custom if isinstance(tf.custom, dict) else {}
        return cls(path=tf.path, length=tf.length, sha256=sha, info=UpdateInfo.from_dict(custom))
