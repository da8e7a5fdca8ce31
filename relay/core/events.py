"""Event generations and splay: the arithmetic of ``GET /v1/events`` (no I/O).

Rules:

* A relay's generation, for one agent group, has three parts: the version of the
  verified timestamp (``content``), a digest of the policy that concerns the group
  (its own approvals, the all-groups approvals, the EULAs accepted and the policy
  settings: ``policy``), and a digest of the group's agent settings
  (``settings``). Its text form is ``<content>.<policy>.<settings>``.
* Digests, not counters: a relay that restarts with the same data answers with the
  same generation, so its agents are not all woken by the restart.
* A ``since`` that differs from the current generation is answered at once; the
  reasons are the parts that differ. A ``since`` that cannot be read (empty, from
  another kind of relay) differs in every part.
* Splay: the ``count`` agents woken by one change get delays spread evenly over the
  splay, in the order they wake (the first gets ``0``), so they do not all download
  at once and a lone agent is not delayed at all.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum

from relay.core.policy import PolicyState, Settings

DIGEST_CHARS = 12  # hex characters of a policy or settings digest


class Reason(StrEnum):
    """Why an event answers (``reasons`` in its body)."""

    CONTENT = "content"
    """A new verified timestamp: new content may be offered."""
    POLICY = "policy"
    """Approvals, accepted EULAs or policy settings that concern the group changed."""
    SETTINGS = "settings"
    """The group's agent settings changed."""


def digest(value: object) -> str:
    """A short, stable digest of a JSON-safe value (keys sorted).

    Raises:
        TypeError: ``value`` has no JSON form.
    """
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def policy_digest(state: PolicyState, settings: Settings, group: str) -> str:
    """The digest of the policy that concerns ``group``.

    Args:
        state: the decisions.
        settings: the policy settings (they concern every group).
        group: the agent group.

    Returns:
        A digest of the group's own approvals, the all-groups approvals, the EULAs
        accepted and the settings: a decision for another group leaves it unchanged.
    """
    full = state.to_dict()
    mine = [a for a in full["approvals"] if a["group"] in (None, group)]
    return digest([mine, full["eulas_accepted"], settings.to_dict()])


@dataclass(frozen=True, slots=True)
class Generation:
    """What an agent of one group has seen of a relay."""

    content: int  # the verified timestamp's version; 0 before the first sync
    policy: str  # digest of the policy that concerns the group
    settings: str  # digest of the group's agent settings

    def __str__(self) -> str:
        """The text form, ``<content>.<policy>.<settings>``."""
        return f"{self.content}.{self.policy}.{self.settings}"

    @classmethod
    def parse(cls, text: str) -> Generation | None:
        """Read the text form; ``None`` when ``text`` is not one.

        Raises:
            Nothing: an unreadable text is ``None``.
        """
        parts = text.split(".")
        if len(parts) != 3 or not parts[0].isdecimal() or len(parts[0]) > 20:
            return None
        if not all(_is_digest(p) for p in parts[1:]):
            return None
        return cls(int(parts[0]), parts[1], parts[2])

    def reasons_since(self, since: str) -> tuple[Reason, ...]:
        """The parts of this generation that differ from ``since``, in a fixed order.

        Args:
            since: the generation the agent has seen (text form); anything that
                cannot be read differs in every part.

        Returns:
            ``()`` when ``since`` is this generation.
        """
        seen = Generation.parse(since)
        if seen is None:
            return (Reason.CONTENT, Reason.POLICY, Reason.SETTINGS)
        out = []
        if seen.content != self.content:
            out.append(Reason.CONTENT)
        if seen.policy != self.policy:
            out.append(Reason.POLICY)
        if seen.settings != self.settings:
            out.append(Reason.SETTINGS)
        return tuple(out)


def _is_digest(text: str) -> bool:
    return len(text) == DIGEST_CHARS and all(c in "0123456789abcdef" for c in text)


def splay_delay_ms(index: int, count: int, splay_seconds: float) -> int:
    """The delay of the ``index``-th of ``count`` agents woken together.

    Args:
        index: the agent's place in the wake-up order, from 0.
        count: how many agents were waiting when the change happened (at least 1;
            a late ``index`` past ``count`` gets the last slot).
        splay_seconds: the window to spread them over.

    Returns:
        Milliseconds from 0 (the first agent) up to, and never reaching,
        ``splay_seconds``: ``splay * index / count``.

    Raises:
        ValueError: ``index`` or ``splay_seconds`` is negative.
    """
    if index < 0 or splay_seconds < 0:
        raise ValueError(f"index {index} and splay {splay_seconds} must not be negative")
    count = max(count, 1)
    index = min(index, count - 1)
    return int(splay_seconds * 1000 * index // count)
