"""One egress cap over several processes: each takes its share of it, by its flows.

Rules:

* The processes serving one relay (slots ``0`` .. ``slots - 1``) share a small
  file mapped in memory, ``<data_dir>/run/egress.shm``: one record per slot, each
  written by its own process only. A record holds the process's active flows
  (agents with a transfer waiting or running there) and a heartbeat
  (``time.monotonic()``, one clock for every process of the machine).
* Every :data:`PERIOD` seconds (:meth:`EgressShare.run`) a process publishes its
  flows, reads every record and sets its limiter's share of the cap to what
  :func:`relay.core.rates.egress_shares` gives its slot: proportional to its
  flows, with a small floor while it has none so a new flow starts at once.
  With fair queueing per agent inside each process, every agent of the relay
  gets about ``cap / flows``: one share relay-wide.
* A record whose heartbeat is older than :data:`STALE_AFTER` (a dead or stuck
  process, or a previous run) counts as no process at all, so its part goes to
  the live ones. A process that stops clears its record.
* The share multiplies whatever rate the limiter was given (a time-of-day
  schedule, a reload): the cap stays the relay's, the share is the process's.
* The per-agent limit (``limits.per_agent``) is not shared: an agent with
  transfers in two processes at once may get up to twice it.
* The share is work-conserving within a process, not across them: a process
  whose flows do not use their share (slow readers, fills still arriving) does
  not lend it to the others until its flows end.
* Records are consistent without locks: every field is an aligned 8-byte word,
  and a sequence word, odd while its writer is between two stores, lets a reader
  retry a torn read (a sequence lock).
* One process (``relay.workers = 1``) needs none of this: no file, no task.
"""

from __future__ import annotations

import asyncio
import math
import mmap
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

from relay.core.rates import egress_shares
from relay.transfer.bandwidth import BandwidthLimiter

PERIOD = 0.05  # seconds between two looks at the other processes
STALE_AFTER = 1.0  # seconds: a record whose heartbeat is older belongs to no live process
RECORD_SIZE = 64  # bytes per slot: one cache line, so writers of two slots never share one
_SEQ = struct.Struct("=Q")  # the sequence word, at the start of a record
_FIELDS = struct.Struct("=qd")  # flows, heartbeat: after the sequence word
_READ_TRIES = 100


class EgressShare:
    """This process's record in the shared file, and its view of the others'.

    Args:
        path: the shared file (created when missing; grown when too small for
            ``slots``).
        slot: this process's slot, ``0 <= slot < slots``.
        slots: the number of processes serving the relay.
        clock: the heartbeat clock (seconds); the same for every process.

    Opening maps a small file: call it from a thread, or before the event loop
    serves requests.

    Raises:
        ValueError: a slot outside ``[0, slots)``.
        OSError: the file cannot be created, grown or mapped.
    """

    def __init__(
        self,
        path: Path,
        slot: int,
        slots: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= slot < slots:
            raise ValueError(f"slot {slot} is outside 0..{slots - 1}")
        self._path = path
        self._slot = slot
        self._slots = slots
        self._clock = clock
        size = slots * RECORD_SIZE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # the new bytes read as zeros: records never written
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        seq = _SEQ.unpack_from(self._map, self._offset(slot))[0]
        self._seq = seq + (seq & 1)  # a writer that died between two stores left it odd

    @property
    def path(self) -> Path:
        """The shared file."""
        return self._path

    @property
    def slot(self) -> int:
        """This process's slot."""
        return self._slot

    def _offset(self, slot: int) -> int:
        return slot * RECORD_SIZE

    def publish(self, flows: int) -> None:
        """Write this process's flows and a fresh heartbeat into its record."""
        self._write(flows, self._clock())

    def _write(self, flows: int, heartbeat: float) -> None:
        offset = self._offset(self._slot)
        _SEQ.pack_into(self._map, offset, self._seq + 1)  # odd: readers retry
        _FIELDS.pack_into(self._map, offset + _SEQ.size, flows, heartbeat)
        self._seq += 2
        _SEQ.pack_into(self._map, offset, self._seq)

    def flows(self) -> list[int | None]:
        """Every slot's flows as last published; ``None`` for a slot with no live process.

        Returns:
            One entry per slot.
        """
        now = self._clock()
        return [self._read(slot, now) for slot in range(self._slots)]

    def _read(self, slot: int, now: float) -> int | None:
        offset = self._offset(slot)
        for _ in range(_READ_TRIES):
            before = _SEQ.unpack_from(self._map, offset)[0]
            if before & 1:
                continue
            flows, heartbeat = _FIELDS.unpack_from(self._map, offset + _SEQ.size)
            if _SEQ.unpack_from(self._map, offset)[0] != before:
                continue
            # Never written (0), or a heartbeat too old or ahead of the clock (a previous
            # boot's monotonic clock): no live process.
            if before == 0 or abs(now - heartbeat) > STALE_AFTER:
                return None
            return int(flows)
        return None  # its writer keeps rewriting it: it is alive, but read it next time

    def update(self, limiter: BandwidthLimiter) -> float:
        """Publish ``limiter``'s active flows, then set its share of the cap.

        Returns:
            The share set: a fraction in ``(0, 1]`` (1 when no other slot is live).
        """
        mine = limiter.active_flows
        self.publish(mine)
        flows = self.flows()
        flows[self._slot] = mine  # this process is live, whatever the clock says
        share = egress_shares(flows)[self._slot]
        limiter.set_share(share)
        return share

    async def run(self, limiter: BandwidthLimiter, *, period: float = PERIOD) -> None:
        """Keep ``limiter`` on this process's share every ``period`` seconds, until cancelled.

        On the way out the record is cleared, so the other processes take the
        share back at their next look, and the limiter paces at the whole rate again.

        Raises:
            ValueError: ``period`` is not positive.
        """
        if not period > 0:
            raise ValueError(f"the period must be positive, got {period}")
        try:
            while True:
                self.update(limiter)
                await asyncio.sleep(period)
        finally:
            self.clear()
            limiter.set_share(1.0)

    def clear(self) -> None:
        """Mark this slot as not live (a process that stops)."""
        if not self._map.closed:
            self._write(0, -math.inf)

    def close(self) -> None:
        """Clear this slot and unmap the file."""
        self.clear()
        self._map.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["PERIOD", "RECORD_SIZE", "STALE_AFTER", "EgressShare"]
