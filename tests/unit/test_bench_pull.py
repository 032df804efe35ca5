"""lab/bench_pull.py's and lab/bench_pull_report.py's pure parts: where the
zeros go, what a change touched, the aims, what the report says."""

import random

import pytest

from lab import bench_pull as bp
from lab import bench_pull_report as rep

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BLOCK = 64 * KiB


def test_zero_regions_are_a_quarter_of_the_regions_sorted_aligned():
    zeros = bp.zero_regions(256 * MiB, 0.25, random.Random(1))
    assert len(zeros) == 64
    assert zeros == sorted(set(zeros))
    assert all(z % MiB == 0 and 0 <= z < 256 * MiB for z in zeros)
    assert zeros == bp.zero_regions(256 * MiB, 0.25, random.Random(1))


def test_whole_blocks_counts_distinct_blocks():
    assert bp.whole_blocks([0, BLOCK, 5 * BLOCK, BLOCK]) == 3
    assert bp.whole_blocks([]) == 0


def test_rate_bytes_reads_tc_rates():
    assert rep.rate_bytes("1gbit") == 125e6
    assert rep.rate_bytes("100mbit") == 12.5e6
    assert rep.rate_bytes("8bit") == 1
    with pytest.raises(ValueError):
        rep.rate_bytes("1G")


def pull_row(kind, changed, fetched, manifest, link, seconds, step="s"):
    return {"step": step, "tool": "nbd-pull, " + kind, "seconds": seconds,
            "ran": seconds, "flush": 0.0, "link": link, "changed": changed,
            "equal": True, "allocated": changed * BLOCK,
            "json": {"kind": kind, "blocks_fetched": fetched,
                     "bytes_read": fetched * BLOCK + manifest,
                     "seconds": seconds - 0.4}}


def test_link_aim_counts_the_manifest_and_checks_what_was_fetched():
    row = pull_row("incremental", 100, 100, 1 * MiB, 8 * MiB, 1.0)
    a = rep.pull_aims(row, 40.0, 36.0)
    assert a["manifest"] == MiB
    assert a["need"] == 100 * BLOCK + MiB
    assert a["ratio"] == pytest.approx(8 * MiB / (100 * BLOCK + MiB))
    assert a["link_met"] and a["fetched_right"]
    over = dict(row, link=1.26 * a["need"])
    assert not rep.pull_aims(over, 40.0, 36.0)["link_met"]
    wrong = pull_row("incremental", 100, 101, MiB, 8 * MiB, 1.0)
    assert not rep.pull_aims(wrong, 40.0, 36.0)["fetched_right"]


def test_time_aims_incremental_against_the_faster_full_first_against_first():
    inc = pull_row("incremental", 10, 10, MiB, 2 * MiB, 3.59)
    assert rep.pull_aims(inc, 40.0, 36.0)["limit"] == pytest.approx(3.6)
    assert rep.pull_aims(inc, 40.0, 36.0)["time_met"]
    assert not rep.pull_aims(dict(inc, seconds=3.6), 40.0, 36.0)["time_met"]
    full = pull_row("full", 1000, 1000, MiB, 1000 * BLOCK, 42.0)
    a = rep.pull_aims(full, 40.0, 36.0)
    assert a["limit"] == pytest.approx(42.0) and a["time_met"]
    assert not rep.pull_aims(dict(full, seconds=42.1), 40.0, 36.0)["time_met"]


def other(tool, step, seconds, link, changed, equal=True):
    return {"step": step, "tool": tool, "seconds": seconds, "ran": seconds,
            "flush": 0.5, "link": link, "changed": changed, "equal": equal,
            "allocated": GiB}


def result(equal=True):
    s1, s2, s3 = "1. first", "2. bytes", "3. blocks"
    rows = [other("nbdcopy, full", s1, 40.0, GiB, 12288),
            pull_row("full", 12288, 12288, MiB, 769 * MiB, 30.0, s1),
            other("rsync, full", s1, 45.0, GiB, 12288),
            # 7000 blocks take 3.67 s at 1 Gbit/s: more than 3.6 s.
            pull_row("incremental", 7000, 7000, 2 * MiB, 440 * MiB, 6.0, s2),
            other("rsync, incremental", s2, 30.0, 450 * MiB, 7000, equal),
            other("nbdcopy, full", s2, 36.0, GiB, 7000),
            pull_row("incremental", 164, 164, 2 * MiB, 13 * MiB, 1.5, s3),
            other("rsync, incremental", s3, 25.0, 12 * MiB, 164)]
    return {"size": GiB, "rate": "1gbit", "server": "3.24",
            "rsync": "version 3.2.7", "zeros": 0.25, "writes": 2621,
            "load": ["0.10 0.20 0.30"] * 2, "rows": rows}


def test_section_table_and_verdicts():
    text = rep.section(result())
    assert text.startswith(rep.HEADING + "\n")
    assert "| 1. first | nbdcopy, full | 40.00 s | 0.50 s | 1024 MiB | " \
        "1.333 | yes | 1024 MiB |" in text
    assert "| 3. blocks | nbd-pull, incremental | 1.50 s | 0.00 s | 13 MiB |" \
        in text
    # (c): 30 s against 40 s; (b): 6 s and 1.5 s against 3.6 s.
    assert "(c) 30.00 s against the first nbdcopy's 40.00 s (aim ≤ 42.00 " \
        "s: met)" in text
    assert "(b) 6.00 s against 3.60 s allowed (10 % of nbdcopy's faster " \
        "full, 36.00 s): **MISSED**" in text
    assert "no tool that moves 64 KiB blocks can meet (b) here" in text
    assert "(b) 1.50 s against 3.60 s allowed" in text and ": met;" in text
    assert text.count("can meet (b) here") == 1
    assert "Every copy equals IMAGE" in text
    assert "≈ 15 % of the 64 KiB blocks" in text
    assert "3. blocks: rsync 25.00 s, 12 MiB; nbd-pull 1.50 s, 13 MiB " \
        "(16.7 × faster)" in text


def test_section_says_a_wrong_copy_is_worthless():
    text = rep.section(result(equal=False))
    assert "| **NO** |" in text
    assert "do **not** equal IMAGE: 2. bytes, rsync, incremental" in text
