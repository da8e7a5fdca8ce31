"""Admin sign-in failures: counted per client address, slowed down, recorded.

Rules:

* Every missing or wrong admin token is counted
  (``relay_admin_signin_failures_total{outcome="refused"}``) and logged.
* After :data:`MAX_FAILURES` failures within :data:`WINDOW` seconds from one
  address, every admin request from it is answered ``429`` with ``Retry-After``
  (the right token too: guessing must not go on), until the oldest of those
  failures leaves the window (``outcome="rate_limited"``).
* Refusals go to the audit log, at most :data:`AUDIT_PER_WINDOW` per window in
  all, so many addresses cannot flush the log's real entries; the rest are only
  counted. Memory is bounded: at most :data:`MAX_ADDRESSES` addresses are tracked
  (the one seen longest ago is forgotten first).

No I/O: the caller writes the audit entries this returns.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

MAX_FAILURES = 5
WINDOW = 60.0  # seconds
AUDIT_PER_WINDOW = 30
MAX_ADDRESSES = 10_000


@dataclass(slots=True)
class SignInGuard:
    """Failed admin sign-ins per address in a sliding window."""

    max_failures: int = MAX_FAILURES
    window: float = WINDOW
    audit_per_window: int = AUDIT_PER_WINDOW
    max_addresses: int = MAX_ADDRESSES
    _failures: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)
    _audited: deque[float] = field(default_factory=deque)

    def _recent(self, address: str, now: float) -> deque[float]:
        times = self._failures.get(address)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
        return times

    def blocked_for(self, address: str, now: float) -> float:
        """Seconds ``address`` must wait before it may try again (0: it may now)."""
        times = self._recent(address, now)
        if len(times) < self.max_failures:
            return 0.0
        return times[-self.max_failures] + self.window - now

    def failed(self, address: str, now: float) -> int:
        """Count a failure from ``address``; return its failures within the window."""
        times = self._recent(address, now)
        times.append(now)
        self._failures[address] = times
        self._failures.move_to_end(address)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)
        return len(times)

    def may_audit(self, now: float) -> bool:
        """Whether one more refusal may be written to the audit log now."""
        while self._audited and self._audited[0] <= now - self.window:
            self._audited.popleft()
        if len(self._audited) >= self.audit_per_window:
            return False
        self._audited.append(now)
        return True
