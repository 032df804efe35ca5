"""lab/bench_client.py's and lab/nbd_readers.py's pure parts: where the
scattered reads go, how a whole read is split, what the report says."""

import random

from lab import bench_client as bc
from lab import nbd_readers

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def test_scattered_offsets_are_sorted_distinct_aligned_blocks():
    offsets = bc.scattered_offsets(64 * MiB, 0.01, random.Random(1))
    assert len(offsets) == round(1024 * 0.01)
    assert offsets == sorted(set(offsets))
    assert all(o % (64 * KiB) == 0 and 0 <= o < 64 * MiB for o in offsets)
    assert offsets == bc.scattered_offsets(64 * MiB, 0.01, random.Random(1))


def test_quarters_cover_the_export_once_aligned():
    for size, n in ((2 * GiB, 4), (2 * GiB, 1), (10 * MiB + 512, 4),
                    (MiB, 4)):
        parts = nbd_readers.quarters(size, n)
        assert len(parts) <= n
        assert parts[0][0] == 0
        assert sum(length for _, length in parts) == size
        assert all(a + la == b for (a, la), (b, _) in zip(parts, parts[1:]))
        assert all(o % MiB == 0 for o, _ in parts)


def result(python="/usr/bin/python3"):
    case = {"bytes": GiB, "wall": 8.0, "cpu": 2.0, "server_cpu": 1.0,
            "link": GiB + 4 * MiB}
    rows = [("ours", 1, case), ("libnbd", 1, None if python is None else case),
            ("ours, scattered, one at a time", 1,
             dict(case, bytes=64 * KiB * 10, wall=0.1, link=700 * KiB)),
            ("libnbd, scattered, many in flight", 1, None if python is None
             else dict(case, bytes=64 * KiB * 10, wall=0.05, link=700 * KiB))]
    return {"size": GiB, "rate": "1gbit", "blocks": 10, "python": python,
            "server": "3.24", "load": ["0.10 0.20 0.30"] * 2,
            "links": [("1gbit", rows), (None, rows)]}


def test_section_rows_and_rates():
    text = bc.section(result())
    assert text.startswith(bc.HEADING + "\n")
    assert "| ours | 1 | 8.00 s | 128 | 2.00 | 1.00 | 1028 MiB | 1.004 |" \
        in text
    assert "| link 1gbit |" in text and "| unshaped loopback |" in text
    assert "ours, one at a time 10.00 ms a block; libnbd, many in flight " \
        "5.00 ms a block" in text


def test_section_says_when_libnbd_is_missing():
    text = bc.section(result(python=None))
    assert "python3-libnbd is not importable" in text
    assert "Scattered, 1gbit" not in text
