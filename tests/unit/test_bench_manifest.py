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


def freeze(label, kind, seconds, read, writes=0, blocks=0):
    return {"label": label, "kind": kind, "seconds": seconds, "read": read,
            "writes": writes, "blocks": blocks, "write_seconds": 1.0,
            "complete": seconds + 0.5, "prerun": 0.5}


def test_section_reports_the_aims_against_the_faster_full():
    GiB, block = 1 << 30, 64 * KiB
    r = {"size": GiB, "load": ["1.00 1.00 1.00", "2.00 2.00 2.00"],
         "same": True, "others": [("sha256sum", 4.0)],
         "freezes": [freeze("first", "full", 10.0, GiB),
                     freeze("bytes", "incremental", 3.0, 100 * block,
                            writes=110, blocks=100),
                     freeze("blocks", "incremental", 0.9, 10 * block,
                            writes=10, blocks=10),
                     freeze("same", "full", 12.0, GiB)]}
    text = bm.section(r)
    assert text.startswith(bm.HEADING)
    # 5 % of 10 s (the faster full) + 0.5 s = 1.0 s allowed.
    assert "3.00 s against 1.00 s allowed" in text and "MISSED" in text
    assert "0.90 s against 1.00 s allowed" in text
    assert "| 3. blocks | incremental | 10 | 10 blocks, 0.6 MiB |" in text
    assert "| sha256sum | 4.00 s | 256 | 0.40 |" in text
    assert "the same digests" in text
