"""The delta engine: patches made, applied and verified; hostile patches; budgets; the loop."""

from __future__ import annotations

import asyncio
import bz2
import hashlib
import os
import random
import struct
import subprocess
import sys
import tracemalloc

import bsdiff4
import pytest

import relay.deltas.engine as engine_module
import relay.deltas.formats as formats_module
from relay.config import DeltaSettings
from relay.core.protocol import DeltaFormat
from relay.deltas.apply import apply_patch_file
from relay.deltas.engine import DeltaBudget, DeltaEngine, DeltaOutcome, estimate_memory
from relay.deltas.formats import apply_patch_bytes, declared_output_size, make_patch
from relay.errors import PatchRejectedError

zstd = formats_module.zstd  # compression.zstd or backports.zstd, as the formats use


def release(seed: int, size: int) -> tuple[bytes, bytes]:
    """A binary and its next build: code shifted by insertions, a relocated table, edits."""
    rng = random.Random(seed)
    old = bytearray(rng.randbytes(size))
    # A table of 32-bit little-endian pointers, as in a library's relocation data.
    table = slice(size // 3, size // 3 + 64 * 1024)
    old[table] = b"".join(struct.pack("<I", 0x400000 + 16 * i) for i in range(len(old[table]) // 4))
    new = bytearray(old)
    ptrs = struct.unpack(f"<{len(new[table]) // 4}I", new[table])
    new[table] = struct.pack(f"<{len(ptrs)}I", *(p + 0x40 for p in ptrs))  # code moved by 64
    for _ in range(40):  # patched instructions
        at = rng.randrange(size - 100)
        new[at : at + rng.randrange(2, 24)] = rng.randbytes(rng.randrange(2, 24))
    for at in sorted((rng.randrange(size) for _ in range(3)), reverse=True):
        new[at:at] = rng.randbytes(rng.randrange(100, 3000))  # new functions
    del new[size // 2 : size // 2 + 1500]  # a removed one
    return bytes(old), bytes(new)


OLD, NEW = release(1, 3_000_000)
NEW_SHA = hashlib.sha256(NEW).hexdigest()
OTHER_OLD, OTHER_NEW = release(2, 3_000_000)
OTHER_NEW = (OTHER_NEW + bytes(len(NEW)))[: len(NEW)]  # another pair, same target length
HUGE = 2**32 - 1  # fits every header's size field
PATCHES = {fmt: make_patch(OLD, NEW, fmt, 3) for fmt in DeltaFormat}


def write(tmp_path, **files: bytes):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)


# -- formats ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(DeltaFormat))
def test_patch_made_applied_and_verified(tmp_path, fmt):
    patch = PATCHES[fmt]
    assert len(patch) < 0.05 * len(NEW)
    assert declared_output_size(patch[:64], fmt) == len(NEW)
    write(tmp_path, old=OLD, patch=patch)
    apply_patch_file(
        tmp_path / "old",
        tmp_path / "patch",
        tmp_path / "out",
        fmt=fmt,
        expected_length=len(NEW),
        expected_sha256=NEW_SHA,
    )
    assert (tmp_path / "out").read_bytes() == NEW
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "out", "patch"]
    assert apply_patch_bytes(
        OLD, patch, fmt, expected_length=len(NEW), expected_sha256=NEW_SHA
    ) == (NEW)


@pytest.mark.parametrize(("step", "batch"), [(4096, 3), (65536, 1), (1_000_003, 50)])
def test_bsdiff4_applied_in_small_steps_matches_the_library(monkeypatch, step, batch):
    # Triples split across steps and seeks carried between steps give the same bytes.
    monkeypatch.setattr(formats_module, "_STEP", step)
    monkeypatch.setattr(formats_module, "_BATCH_TUPLES", batch)
    patch = PATCHES[DeltaFormat.BSDIFF4]
    assert bsdiff4.patch(OLD, patch) == NEW
    out = apply_patch_bytes(
        OLD, patch, DeltaFormat.BSDIFF4, expected_length=len(NEW), expected_sha256=NEW_SHA
    )
    assert out == NEW


@pytest.mark.parametrize("fmt", list(DeltaFormat))
@pytest.mark.parametrize(("old", "new"), [(b"", b"abc"), (b"abc", b""), (b"", b""), (b"x", b"x")])
def test_tiny_and_empty_files(fmt, old, new):
    patch = make_patch(old, new, fmt)
    sha = hashlib.sha256(new).hexdigest()
    assert apply_patch_bytes(old, patch, fmt, expected_length=len(new), expected_sha256=sha) == new


def test_declared_size_headers():
    with pytest.raises(PatchRejectedError, match="magic"):
        declared_output_size(b"BSDIFF39" + bytes(24), DeltaFormat.BSDIFF4)
    with pytest.raises(PatchRejectedError, match="32"):
        declared_output_size(b"BSDIFF40", DeltaFormat.BSDIFF4)
    negative = b"BSDIFF40" + bytes(16) + (5 | 1 << 63).to_bytes(8, "little")
    with pytest.raises(PatchRejectedError, match="negative"):
        declared_output_size(negative, DeltaFormat.BSDIFF4)
    with pytest.raises(PatchRejectedError, match="not a zstd"):
        declared_output_size(b"\x00" * 64, DeltaFormat.ZSTD)
    # A frame without a content size (streamed, nothing pledged) cannot be checked.
    comp = zstd.ZstdCompressor()
    unsized = comp.compress(NEW[:1000]) + comp.flush()
    with pytest.raises(PatchRejectedError, match="does not declare"):
        declared_output_size(unsized, DeltaFormat.ZSTD)


def test_applying_pulls_in_no_process_management_and_no_network():
    # What the agent imports to apply a delta: no diff engine, no aiohttp.
    code = (
        "import sys, relay.deltas.apply; "
        "print(sorted(m for m in ('multiprocessing', 'aiohttp', 'relay.deltas.engine') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- hostile patches ------------------------------------------------------------------


def with_declared_size(patch: bytes, fmt: DeltaFormat, size: int) -> bytes:
    """The same patch with its header's output size replaced."""
    if fmt is DeltaFormat.BSDIFF4:
        return patch[:24] + size.to_bytes(8, "little") + patch[32:]
    fhd = patch[4]
    fcs_bytes = {2: 4, 3: 8}[fhd >> 6]  # our frames carry a 4- or 8-byte content size
    at = 5 + (0 if fhd & 0x20 else 1) + (0, 1, 2, 4)[fhd & 3]
    return patch[:at] + size.to_bytes(fcs_bytes, "little") + patch[at + fcs_bytes :]


def bsdiff4_raw(size: int, control: bytes, diff: bytes, extra: bytes) -> bytes:
    """A hand-made bsdiff4 patch from already-compressed blocks."""
    return b"BSDIFF40" + struct.pack("<QQQ", len(control), len(diff), size) + control + diff + extra


def hostile(fmt: DeltaFormat, attack: str) -> tuple[bytes, int]:
    """(patch, the length the caller expects) for one attack."""
    good = PATCHES[fmt]
    n = len(NEW)
    if attack == "declares-another-size":
        return with_declared_size(good, fmt, n + 1), n
    if attack == "declares-a-huge-size":
        return with_declared_size(good, fmt, HUGE), n
    if attack == "header-lies-consistently":
        # The header agrees with the caller, the body produces the real length.
        return with_declared_size(good, fmt, n - 1), n - 1
    if attack == "garbage-body":
        return good[:64] + random.Random(3).randbytes(len(good) - 64), n
    if attack == "patch-for-another-pair":
        return make_patch(OTHER_OLD, OTHER_NEW, fmt, 3), n
    if attack == "truncated":
        return good[: len(good) // 2], n
    if attack == "trailing-bytes":
        return good + b"\0" * 16, n
    if attack == "longer-than-target":
        return good[:64] + bytes(n + 128 * 1024), n
    raise AssertionError(attack)


ATTACKS = [
    "declares-another-size",
    "declares-a-huge-size",
    "header-lies-consistently",
    "garbage-body",
    "patch-for-another-pair",
    "truncated",
    "trailing-bytes",
    "longer-than-target",
]


@pytest.mark.parametrize("fmt", list(DeltaFormat))
@pytest.mark.parametrize("attack", ATTACKS)
def test_hostile_patch_rejected_and_no_output(tmp_path, fmt, attack):
    patch, expected_length = hostile(fmt, attack)
    write(tmp_path, old=OLD, patch=patch)
    with pytest.raises(PatchRejectedError):
        apply_patch_file(
            tmp_path / "old",
            tmp_path / "patch",
            tmp_path / "out",
            fmt=fmt,
            expected_length=expected_length,
            expected_sha256=NEW_SHA,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "patch"]  # no out, no temp
    with pytest.raises(PatchRejectedError):
        apply_patch_bytes(OLD, patch, fmt, expected_length=expected_length, expected_sha256=NEW_SHA)


@pytest.mark.parametrize("fmt", list(DeltaFormat))
def test_wrong_declared_size_refused_before_applying(monkeypatch, fmt):
    def must_not_run(*_args):
        raise AssertionError("applied a patch whose declared size is wrong")

    monkeypatch.setattr(formats_module, "_apply_bsdiff4", must_not_run)
    monkeypatch.setattr(formats_module, "_apply_zstd", must_not_run)
    patch = with_declared_size(PATCHES[fmt], fmt, HUGE)
    with pytest.raises(PatchRejectedError, match=f"declares {HUGE} bytes"):
        apply_patch_bytes(OLD, patch, fmt, expected_length=len(NEW), expected_sha256=NEW_SHA)


def decompression_bomb(fmt: DeltaFormat, block: str, size: int) -> bytes:
    """A patch whose header declares ``size`` but whose data expands to far more."""
    big = bytes(64 * 1024**2)
    if fmt is DeltaFormat.ZSTD:
        comp = zstd.ZstdCompressor()
        comp.set_pledged_input_size(len(big))
        return with_declared_size(comp.compress(big, comp.FLUSH_FRAME), fmt, size)
    one = bz2.compress(struct.pack("<QQQ", size, 0, 0))
    if block == "diff":
        return bsdiff4_raw(size, one, bz2.compress(big), bz2.compress(b""))
    if block == "extra":
        ctrl = bz2.compress(struct.pack("<QQQ", 0, size, 0))
        return bsdiff4_raw(size, ctrl, bz2.compress(b""), bz2.compress(big))
    # control: endless empty triples
    return bsdiff4_raw(size, bz2.compress(big), bz2.compress(b""), bz2.compress(b""))


@pytest.mark.parametrize(
    ("fmt", "block"),
    [
        (DeltaFormat.BSDIFF4, "control"),
        (DeltaFormat.BSDIFF4, "diff"),
        (DeltaFormat.BSDIFF4, "extra"),
        (DeltaFormat.ZSTD, "frame"),
    ],
)
def test_decompression_bomb_refused_with_bounded_memory(fmt, block):
    size = 1024**2
    patch = decompression_bomb(fmt, block, size)
    assert len(patch) < 16 * 1024  # 64 MiB inside
    old = bytes(size)
    tracemalloc.start()
    try:
        with pytest.raises(PatchRejectedError):
            apply_patch_bytes(
                old,
                patch,
                fmt,
                expected_length=size,
                expected_sha256=hashlib.sha256(old).hexdigest(),
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * size  # a plain bz2/zstd decompress would hold 64 MiB


# -- the engine -----------------------------------------------------------------------


async def compute(engine, tmp_path, old, new, fmt, name="p", **kw):
    (tmp_path / f"{name}.old").write_bytes(old)
    (tmp_path / f"{name}.new").write_bytes(new)
    return await engine.compute(
        tmp_path / f"{name}.old",
        tmp_path / f"{name}.new",
        fmt=fmt,
        new_sha256=hashlib.sha256(new).hexdigest(),
        new_length=len(new),
        dest=tmp_path / "deltas" / name,
        **kw,
    )


def leftovers(tmp_path):
    d = tmp_path / "deltas"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.mark.parametrize("fmt", list(DeltaFormat))
async def test_engine_computes_a_verified_patch(tmp_path, fmt):
    engine = DeltaEngine(workers=1, budget=DeltaBudget())
    r = await compute(engine, tmp_path, OLD, NEW, fmt)
    assert r.outcome is DeltaOutcome.COMPUTED, r.detail
    assert r.format is fmt
    assert r.patch_path == tmp_path / "deltas" / "p"
    data = r.patch_path.read_bytes()
    assert r.patch_length == len(data) < 0.05 * len(NEW)
    assert r.patch_sha256 == hashlib.sha256(data).hexdigest()
    assert r.seconds > 0
    assert leftovers(tmp_path) == ["p"]
    out = apply_patch_bytes(OLD, data, fmt, expected_length=len(NEW), expected_sha256=NEW_SHA)
    assert out == NEW


async def test_engine_budgets_and_identical(tmp_path):
    tight = DeltaEngine(
        budget=DeltaBudget(max_memory=estimate_memory(DeltaFormat.BSDIFF4, len(OLD), len(NEW)) - 1)
    )
    r = await compute(tight, tmp_path, OLD, NEW, DeltaFormat.BSDIFF4, "mem")
    assert r.outcome is DeltaOutcome.SKIPPED_MEMORY
    assert "budget" in r.detail
    assert tight.running == 0
    # zstd needs far less than bsdiff4 for the same pair: the same budget lets it run.
    r = await compute(tight, tmp_path, OLD, NEW, DeltaFormat.ZSTD, "mem")
    assert r.outcome is DeltaOutcome.COMPUTED

    engine = DeltaEngine(budget=DeltaBudget(max_ratio=0.5))
    unrelated = random.Random(9).randbytes(300_000)
    for fmt in DeltaFormat:
        r = await compute(engine, tmp_path, OLD[:300_000], unrelated, fmt, f"ratio-{fmt}")
        assert r.outcome is DeltaOutcome.SKIPPED_RATIO, r.detail
        assert r.patch_length > 0.5 * len(unrelated)
        assert r.patch_path is None

    same = hashlib.sha256(OLD).hexdigest()
    r = await engine.compute(
        tmp_path / "mem.old",
        tmp_path / "mem.old",
        fmt=DeltaFormat.ZSTD,
        new_sha256=same,
        old_sha256=same,
        new_length=len(OLD),
        dest=tmp_path / "deltas" / "same",
    )
    assert r.outcome is DeltaOutcome.IDENTICAL
    assert leftovers(tmp_path) == ["mem"]


def test_budget_from_the_delta_settings():
    settings = DeltaSettings(max_memory=123, max_seconds=4.5, max_ratio=0.25, zstd_level=7)
    budget = DeltaBudget.from_settings(settings)
    assert budget == DeltaBudget(max_memory=123, max_seconds=4.5, max_ratio=0.25, zstd_level=7)
    assert DeltaBudget.from_settings(DeltaSettings()) == DeltaBudget()


async def test_engine_estimates_are_what_the_budget_compares():
    n = 10 * 1024**2
    assert estimate_memory(DeltaFormat.BSDIFF4, n, n) >= 18 * n
    assert estimate_memory(DeltaFormat.ZSTD, n, n) < estimate_memory(DeltaFormat.BSDIFF4, n, n)
    with pytest.raises(ValueError, match="negative"):
        estimate_memory(DeltaFormat.ZSTD, -1, n)


class Ticker:
    """Measures the worst gap between 10 ms sleeps of the event loop."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        for _ in range(100_000):
            await asyncio.sleep(0.01)
            now = loop.time()
            self.worst = max(self.worst, now - last)
            self.ticks += 1
            last = now

    def __enter__(self):
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc):
        self._task.cancel()


async def test_diff_past_max_seconds_is_killed_then_next_succeeds(tmp_path):
    big_old, big_new = release(3, 8_000_000)  # bsdiff4: seconds, not tenths
    engine = DeltaEngine(workers=1, budget=DeltaBudget(max_seconds=0.5))
    with Ticker() as ticker:
        r = await compute(engine, tmp_path, big_old, big_new, DeltaFormat.BSDIFF4, "slow")
    assert r.outcome is DeltaOutcome.TIMEOUT
    assert r.seconds >= 0.5
    assert engine.running == 0
    assert leftovers(tmp_path) == []
    assert ticker.worst < 0.5
    engine.budget = DeltaBudget(max_seconds=120)
    r = await compute(engine, tmp_path, OLD, NEW, DeltaFormat.BSDIFF4, "next")
    assert r.outcome is DeltaOutcome.COMPUTED, r.detail
    assert leftovers(tmp_path) == ["next"]


async def test_event_loop_keeps_answering_during_a_long_diff(tmp_path):
    big_old, big_new = release(4, 6_000_000)
    engine = DeltaEngine(workers=1, budget=DeltaBudget())
    with Ticker() as ticker:
        r = await compute(engine, tmp_path, big_old, big_new, DeltaFormat.BSDIFF4)
    assert r.outcome is DeltaOutcome.COMPUTED, r.detail
    assert r.seconds > 0.5  # a diff long enough to matter
    assert ticker.ticks > 0.5 * r.seconds / 0.01 / 4  # the loop kept turning...
    assert ticker.worst < 0.5  # ...and never stalled (a behaviour bound, not a speed claim)


async def test_concurrency_never_exceeds_workers(tmp_path):
    engine = DeltaEngine(workers=2, budget=DeltaBudget())
    old, new = release(7, 1_000_000)
    seen: list[int] = []

    async def watch():
        for _ in range(100_000):
            seen.append(engine.running)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(
        *(compute(engine, tmp_path, old, new, DeltaFormat.BSDIFF4, f"c{i}") for i in range(4))
    )
    watcher.cancel()
    assert [r.outcome for r in results] == [DeltaOutcome.COMPUTED] * 4
    assert max(seen) == 2
    assert engine.running == 0


async def wait_running(engine, count):
    for _ in range(1000):
        if engine.running == count and all(p.pid for p in engine._running):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {count} running")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_cancelled_compute_kills_its_child(tmp_path):
    big_old, big_new = release(5, 8_000_000)
    engine = DeltaEngine(workers=1, budget=DeltaBudget())
    task = asyncio.create_task(compute(engine, tmp_path, big_old, big_new, DeltaFormat.BSDIFF4))
    await wait_running(engine, 1)
    pid = next(iter(engine._running)).pid
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.running == 0
    assert gone(pid)
    assert leftovers(tmp_path) == []


async def test_close_kills_running_diffs_and_refuses_new_ones(tmp_path):
    big_old, big_new = release(6, 8_000_000)
    engine = DeltaEngine(workers=1, budget=DeltaBudget())
    task = asyncio.create_task(compute(engine, tmp_path, big_old, big_new, DeltaFormat.BSDIFF4))
    await wait_running(engine, 1)
    pid = next(iter(engine._running)).pid
    await engine.close()
    assert gone(pid)
    r = await task
    assert r.outcome is DeltaOutcome.FAILED
    assert leftovers(tmp_path) == []
    r = await compute(engine, tmp_path, OLD, NEW, DeltaFormat.ZSTD, "after")
    assert r.outcome is DeltaOutcome.FAILED
    assert r.detail == "engine closed"


async def test_child_address_space_is_capped(tmp_path, monkeypatch):
    # Let a pair past the estimate through: the child's own limit stops it.
    monkeypatch.setattr(engine_module, "estimate_memory", lambda *_: 0)
    old = random.Random(8).randbytes(40 * 1024**2)  # bsdiff4 wants ~720 MB for this
    engine = DeltaEngine(workers=1, budget=DeltaBudget(max_memory=64 * 1024**2))
    r = await compute(engine, tmp_path, old, old[:-1000], DeltaFormat.BSDIFF4)
    assert r.outcome is DeltaOutcome.FAILED
    assert r.detail == "out of memory"
    assert leftovers(tmp_path) == []
