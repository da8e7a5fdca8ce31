"""Exceptions of relay.

Rules (after python-tuf ``exceptions.py``):

* Every name ends in ``Error`` and derives from :class:`RelayError`.
* Two roots for the upstream side: :class:`UpstreamContentError` for bad or
  untrusted data, and :class:`TransportError` for the network. Callers that
  fail over between upstreams catch both; callers that decide whether to retry
  the same upstream catch only :class:`TransportError`.
* Errors carry fields (``path``, ``expected``, ``observed``, ``status_code``)
  and their message gives observed and expected values.
* Third-party exceptions are translated at the boundary with ``raise ... from e``.
"""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error relay raises on purpose."""


# --- configuration --------------------------------------------------------


class ConfigError(RelayError):
    """A configuration value is missing, unknown or malformed.

    Attributes:
        key: dotted key, e.g. ``limits.egress``.
        value: the offending value as given (``None`` when missing).
        source: the file path or environment variable it came from.
    """

    def __init__(self, key: str, value: object, source: str, reason: str) -> None:
        self.key = key
        self.value = value
        self.source = source
        self.reason = reason
        shown = "" if value is None else f" = {value!r}"
        super().__init__(f"{source}: {key}{shown}: {reason}")


# --- state ----------------------------------------------------------------


class StateUnavailableError(RelayError):
    """The state database cannot be written or read (disk full, I/O error, damage).

    Nothing was changed: a write that raises this took no effect.
    """


class StateDamagedError(StateUnavailableError):
    """The state database was found damaged at start (and said so, once).

    Every write is refused until ``relay state check --repair``.
    """


# --- requests -------------------------------------------------------------


class BodyError(RelayError, ValueError):
    """A request body is malformed; the message names the field."""


# --- start-up -------------------------------------------------------------


class StartupError(RelayError):
    """The process cannot start: the host or a file is not as the configuration says.

    The message is one line: what is wrong, then what to do about it.

    Attributes:
        subject: the thing at fault (a key and its value, or a path).
        problem: what is wrong with it.
        remedy: what the operator should do.
    """

    def __init__(self, subject: str, problem: str, remedy: str) -> None:
        self.subject = subject
        self.problem = problem
        self.remedy = remedy
        super().__init__(f"{subject}: {problem}; {remedy}")


class DataDirLockedError(StartupError):
    """Another process holds the lock on the data directory.

    Attributes:
        path: the data directory.
        pid: the process holding the lock, as written in its lock file (``None``
            when unreadable).
    """

    def __init__(self, path: str, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        holder = f"PID {pid}" if pid is not None else "a process whose PID is unknown"
        super().__init__(
            f"data directory {path}",
            f"in use by another relay ({holder})",
            "stop it, or give this relay another relay.data_dir",
        )


# --- publisher ------------------------------------------------------------


class PublishError(RelayError):
    """A publisher command cannot be carried out; the repository is unchanged."""


# --- upstream: content ----------------------------------------------------


class UpstreamContentError(RelayError):
    """The upstream sent data that is bad or cannot be trusted."""


class MetadataRejectedError(UpstreamContentError):
    """TUF metadata failed verification (signature, version, expiry, hash, length).

    Attributes:
        role: the role whose metadata was refused (``timestamp``, ``root``...).
    """

    def __init__(self, role: str, reason: str) -> None:
        self.role = role
        self.reason = reason
        super().__init__(f"{role} metadata rejected: {reason}")


class SignedValueMismatchError(UpstreamContentError):
    """Downloaded bytes disagree with a value the metadata signed.

    Attributes:
        path: the target or file.
        expected: the signed value.
        observed: what the bytes gave.
    """

    def __init__(self, path: str, expected: object, observed: object, detail: str) -> None:
        self.path = path
        self.expected = expected
        self.observed = observed
        super().__init__(f"{path}: {detail}")


class HashMismatchError(SignedValueMismatchError):
    """Downloaded bytes do not hash to the signed digest."""

    def __init__(self, path: str, expected: str, observed: str) -> None:
        super().__init__(
            path, expected, observed, f"sha256 {observed} does not match signed {expected}"
        )


class LengthMismatchError(SignedValueMismatchError):
    """Downloaded bytes are longer (or shorter) than the signed length."""

    def __init__(self, path: str, expected: int, observed: int) -> None:
        super().__init__(
            path, expected, observed, f"got {observed} bytes, signed length is {expected}"
        )


# --- upstream: transport --------------------------------------------------


class TransportError(RelayError):
    """The network failed: connect, timeout, broken transfer, unexpected status."""


class UpstreamHTTPError(TransportError):
    """The upstream answered with an unexpected HTTP status."""

    def __init__(self, url: str, status_code: int) -> None:
        self.url = url
        self.status_code = status_code
        super().__init__(f"{url}: HTTP {status_code}")


class UpstreamUnavailableError(TransportError):
    """No configured upstream could deliver the resource."""

    def __init__(self, path: str, causes: list[BaseException]) -> None:
        self.path = path
        self.causes = causes
        detail = "; ".join(str(c) for c in causes) or "no upstream configured"
        super().__init__(f"{path}: every upstream failed: {detail}")


# --- store ----------------------------------------------------------------


class StoreError(RelayError):
    """The blob store cannot do what was asked."""


class StoreFullError(StoreError):
    """The quota is reached and nothing can be evicted; new fills are refused."""

    def __init__(self, needed: int, available: int) -> None:
        self.needed = needed
        self.available = available
        super().__init__(f"store full: need {needed} bytes, {available} can be freed")


class TargetBackoffError(StoreError):
    """The upstream's copy of a target failed verification recently.

    It is not fetched again until the backoff ends (answer 503 with ``Retry-After``).

    Attributes:
        retry_after: seconds until the next fetch may start.
    """

    def __init__(self, path: str, retry_after: float, reason: str) -> None:
        self.retry_after = retry_after
        super().__init__(
            f"{path}: the upstream's copy failed verification ({reason}); "
            f"not fetched again for {retry_after:.0f} s"
        )


class NotInMetadataError(StoreError):
    """The requested path is not in the verified metadata (so it is a 404)."""


# --- deltas ---------------------------------------------------------------


class DeltaError(RelayError):
    """A delta could not be computed or applied."""


class PatchRejectedError(DeltaError):
    """A patch failed a check (declared size, format, result hash): use the full target."""


# --- policy and admin -----------------------------------------------------


class PolicyError(RelayError):
    """An administrative change is not allowed by the policy rules."""


class EulaNotAcceptedError(PolicyError):
    """An update that names an EULA cannot be approved before it is accepted."""


class ReplicaReadOnlyError(PolicyError):
    """A replica relay takes its policy from its parent; local changes are refused."""


# --- agent ----------------------------------------------------------------


class AgentError(RelayError):
    """The agent could not complete an update."""


class InstallError(AgentError):
    """The install command failed or overran its timeout; the previous version stays.

    Attributes:
        reason: a short machine-readable reason for reports (``install_failed``,
            ``install_timeout``...).
    """

    def __init__(self, message: str, *, reason: str = "install_failed") -> None:
        self.reason = reason
        super().__init__(message)


# --- static export --------------------------------------------------------


class ExportError(RelayError):
    """A static export cannot be completed; the output tree is left as it was."""
