"""lab/bench_manifest.py's pure parts: where the guest writes, the aims."""

import random

import pytest

from lab import bench_manifest as bm

KiB, MiB = 1 << 10, 1 << 20


def test_scattered_offsets_are_distinct_aligned_and_cover_the_fraction():
    offsets = bm.scattered(64 * MiB, 0.01, random.Random(1))
    assert len(offsets) == round(64 * MiB // (4 * KiB) * 0.01)
    assert len(set(offsets)) == len(offsets)
    assert all(o % (4 * KiB) == 0 and 0 <= o < 64 * MiB for o in offsets)


def test_one_per_block_touches_as_many_blocks_as_writes():
    offsets = bm.one_per_block(64 * MiB, 0.05, random.Random(2))
    assert len(offsets) == round(1024 * 0.05)
    assert bm.changed_blocks(offsets) == len(offsets)
    assert all(o % (4 * KiB) == 0 for o in offsets)


def test_same_seed_same_offsets():
    assert bm.scattered(MiB, 0.1, random.Random(3)) == \
        bm.scattered(MiB, 0.1, random.Random(3))


def test_changed_blocks_counts_distinct_blocks_and_crossings():
    block = 64 * KiB
    assert bm.changed_blocks([]) == 0
    assert bm.changed_blocks([0, 4 * KiB, 60 * KiB]) == 1
    assert bm.changed_blocks([0, block, 5 * block]) == 3
    # A write across a boundary touches both blocks.
    assert bm.changed_blocks([block - 2 * KiB]) == 2


def test_aims_met_and_missed():
    a = bm.aims(bytes_read=150, changed_bytes=100, seconds=1.0,
                full_seconds=10.0)
    assert a["ratio"] == 1.5 and a["read_met"]
    assert a["limit"] == pytest.approx(1.0) and a["time_met"]
    assert a["share"] == pytest.approx(0.1)
    b = bm.aims(bytes_read=151, changed_bytes=100, seconds=1.01,
                full_seconds=10.0)
    assert not b["read_met"] and not b["time_met"]


def test_aims_without_a_change():
    assert bm.aims(0, 0, 0.2, 10.0)["read_met"]
    assert not bm.aims(1, 0, 0.2, 10.0)["read_met"]
