"""nbdsnap.verify.plan: where to read, fixed answers."""

import pytest

from nbdsnap.verify import plan
from nbdsnap.verify.plan import Piece, Range
from nbdsnap.verify.sources import Extent

BS = 64 * 1024


def test_plan_all_data_cut_at_segments():
    pieces = list(plan.plan([Extent(0, 10 * BS + 5, True)], 10 * BS + 5,
                            BS, 4 * BS))
    assert pieces == [Piece(True, 0, 4 * BS), Piece(True, 4 * BS, 4 * BS),
                      Piece(True, 8 * BS, 2 * BS + 5)]


def test_plan_holes_become_zero_runs_of_whole_blocks():
    #  |data 100|hole ...........|data 10 at 5 BS + 3|hole ....|
    size = 9 * BS + 1
    extents = [Extent(0, 100, True), Extent(100, 5 * BS - 97, False),
               Extent(5 * BS + 3, 10, True),
               Extent(5 * BS + 13, size - 5 * BS - 13, False)]
    assert list(plan.plan(extents, size, BS, 4 * BS)) == [
        Piece(True, 0, BS),
        Piece(False, BS, 4 * BS),
        Piece(True, 5 * BS, BS),
        Piece(False, 6 * BS, 3 * BS + 1),
    ]


def test_plan_merges_extents_sharing_a_block():
    extents = [Extent(0, 10, True), Extent(10, 20, False),
               Extent(30, 10, True), Extent(40, 2 * BS - 40, False),
               Extent(2 * BS, BS, True)]
    assert list(plan.plan(extents, 3 * BS, BS, 8 * BS)) == [
        Piece(True, 0, BS), Piece(False, BS, BS), Piece(True, 2 * BS, BS)]


def test_plan_data_pieces_never_cross_a_segment():
    extents = [Extent(0, 3 * BS, False), Extent(3 * BS, 6 * BS, True)]
    assert list(plan.plan(extents, 9 * BS, BS, 4 * BS)) == [
        Piece(False, 0, 3 * BS), Piece(True, 3 * BS, BS),
        Piece(True, 4 * BS, 4 * BS), Piece(True, 8 * BS, BS)]


def test_plan_empty_image_and_all_hole():
    assert list(plan.plan([], 0, BS, 4 * BS)) == []
    assert list(plan.plan([Extent(0, 5, False)], 5, BS, 4 * BS)) == [
        Piece(False, 0, 5)]


def test_cut_at_multiples():
    assert list(plan.cut(10, 25, 8)) == [(10, 6), (16, 8), (24, 8), (32, 3)]
    assert list(plan.cut(16, 8, 8)) == [(16, 8)]
    assert list(plan.cut(5, 0, 8)) == []


def test_data_segments_data_in_either_merged():
    #  a  |data 10|hole 20             |data 6|
    #  b  |hole 5|data 3|hole 14 |data 6|hole 8 |
    a = [Extent(0, 10, True), Extent(10, 20, False), Extent(30, 6, True)]
    b = [Extent(0, 5, False), Extent(5, 3, True), Extent(8, 14, False),
         Extent(22, 6, True), Extent(28, 8, False)]
    assert list(plan.data_segments(a, b)) == [Range(0, 10), Range(22, 6),
                                              Range(30, 6)]
    assert list(plan.data_segments(b, a)) == [Range(0, 10), Range(22, 6),
                                              Range(30, 6)]


def test_data_segments_adjacent_are_one():
    a = [Extent(0, 10, True), Extent(10, 10, False)]
    b = [Extent(0, 10, False), Extent(10, 10, True)]
    assert list(plan.data_segments(a, b)) == [Range(0, 20)]
    assert list(plan.data_segments([Extent(0, 9, False)],
                                   [Extent(0, 9, False)])) == []


# An incremental manifest's plan.

def test_rehash_widens_to_blocks_and_merges():
    size = 10 * BS
    assert plan.rehash([(5, 1), (BS - 1, 2), (4 * BS, BS), (9 * BS, 0)],
                       size, size, BS) == [Range(0, 2 * BS),
                                           Range(4 * BS, BS)]


def test_rehash_same_size_short_last_block_always():
    size = 3 * BS + 10
    assert plan.rehash([], size, size, BS) == [Range(3 * BS, 10)]


def test_rehash_grown_from_a_short_block_to_the_end():
    assert plan.rehash([(0, 1), (7 * BS, 5)], 2 * BS + 1, 9 * BS + 3,
                       BS) == [Range(0, BS), Range(2 * BS, 7 * BS + 3)]


def test_rehash_shrunk_drops_what_is_past_the_end():
    assert plan.rehash([(5 * BS, 10), (BS, 3 * BS)], 8 * BS, 3 * BS,
                       BS) == [Range(BS, 2 * BS)]
    assert plan.rehash([], 8 * BS, 3 * BS + 1, BS) == [Range(3 * BS, 1)]


def test_rehash_refuses_negative_ranges():
    with pytest.raises(ValueError, match="invalid dirty range"):
        plan.rehash([(-1, 5)], BS, BS, BS)


def test_plan_incremental_keeps_per_chunk_reads_data_skips_holes():
    #  chunks of 4 blocks; rehash blocks 2-5 and 9; blocks 4-5 a hole
    size = 10 * BS
    extents = [Extent(0, 4 * BS, True), Extent(4 * BS, 2 * BS, False),
               Extent(6 * BS, 4 * BS, True)]
    ranges = [Range(2 * BS, 4 * BS), Range(9 * BS, BS)]
    assert list(plan.plan_incremental(extents, ranges, size, BS, 4 * BS,
                                      8 * BS)) == [
        plan.Keep(0, 2 * BS),
        Piece(True, 2 * BS, 2 * BS),
        Piece(False, 4 * BS, 2 * BS),
        plan.Keep(6 * BS, 2 * BS),
        plan.Keep(8 * BS, BS),
        Piece(True, 9 * BS, BS),
    ]


def test_plan_incremental_a_hole_outside_the_ranges_is_zeros():
    #  chunks of 4 blocks; rehash block 9; blocks 1-5 a hole nothing marked
    size = 10 * BS
    extents = [Extent(0, BS, True), Extent(BS, 5 * BS, False),
               Extent(6 * BS, 4 * BS, True)]
    assert list(plan.plan_incremental(extents, [Range(9 * BS, BS)], size,
                                      BS, 4 * BS, 8 * BS)) == [
        plan.Keep(0, BS),
        Piece(False, BS, 5 * BS),
        plan.Keep(6 * BS, 2 * BS),
        plan.Keep(8 * BS, BS),
        Piece(True, 9 * BS, BS),
    ]


def test_plan_incremental_nothing_to_rehash():
    extents = [Extent(0, 9 * BS, True)]
    assert list(plan.plan_incremental(extents, [], 9 * BS, BS, 4 * BS,
                                      2 * BS)) == [
        plan.Keep(0, 4 * BS), plan.Keep(4 * BS, 4 * BS),
        plan.Keep(8 * BS, BS)]
