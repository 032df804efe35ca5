"""Where to read: an image's extents cut into the pieces the workers take.

Pure functions over offsets, no I/O, tested with fixed answers.  A digest
reads every block that holds data and takes whole blocks of hole as known
zeros (plan(), pictured there); a comparison reads what is data in either
image (data_segments()).  Both cut what they read at multiples of a segment
(cut()), so that reads stay aligned and a job reads one segment at most.
Extents cover [0, size) in order; offsets and lengths are in bytes.
"""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple

from .sources import Extent


class Range(NamedTuple):
    """Bytes of the image, as compare() and check() report them."""

    offset: int
    length: int


class Piece(NamedTuple):
    """A block-aligned range of the image: data to read, or known zeros."""

    is_data: bool
    offset: int
    length: int


def plan(extents: Iterable[Extent], size: int, block_size: int,
         segment: int) -> Iterator[Piece]:
    """Cut [0, size) into data pieces to read and zero runs to skip.

    A block that holds any data is read whole (the rest of it reads as
    zeros anyway); only whole blocks of hole become zero runs.  Data
    pieces are at most segment long and never cross a multiple of
    segment, so reads stay aligned::

        extents  |hole |data  |hole          |da|hole   |
        blocks   |    |    |    |    |    |    |    |    |
        pieces   |zero|data     |zero     |data|zero    |
    """
    pos = 0
    for start, end in _data_runs(extents, size, block_size):
        if start > pos:
            yield Piece(False, pos, start - pos)
        for offset, length in cut(start, end - start, segment):
            yield Piece(True, offset, length)
        pos = end
    if pos < size:
        yield Piece(False, pos, size - pos)


def _data_runs(extents: Iterable[Extent], size: int,
               block_size: int) -> Iterator[tuple[int, int]]:
    """The data extents widened to whole blocks, overlapping ones merged."""
    run = None
    for e in extents:
        if not e.is_data or not e.length:
            continue
        start = e.offset // block_size * block_size
        end = min(size, -(-(e.offset + e.length) // block_size) * block_size)
        if run and start <= run[1]:
            run[1] = max(run[1], end)
        else:
            if run:
                yield run[0], run[1]
            run = [start, end]
    if run:
        yield run[0], run[1]


def cut(offset: int, length: int, size: int) -> Iterator[tuple[int, int]]:
    """Split [offset, offset + length) at multiples of size."""
    end = offset + length
    while offset < end:
        n = min(end, (offset // size + 1) * size) - offset
        yield offset, n
        offset += n


def data_segments(a: Iterable[Extent], b: Iterable[Extent]) -> Iterator[Range]:
    """The ranges that are data in a or in b (not a hole in both), merged."""
    a, b = iter(a), iter(b)
    ea, eb = next(a, None), next(b, None)
    pos = 0
    run = None
    while ea is not None and eb is not None:
        end_a = ea.offset + ea.length
        end_b = eb.offset + eb.length
        end = min(end_a, end_b)
        if ea.is_data or eb.is_data:
            if run and run[1] == pos:
                run[1] = end
            else:
                if run:
                    yield Range(run[0], run[1] - run[0])
                run = [pos, end]
        pos = end
        if end_a == end:
            ea = next(a, None)
        if end_b == end:
            eb = next(b, None)
    if run:
        yield Range(run[0], run[1] - run[0])


# An incremental manifest: only the blocks that changed are read.

class Keep(NamedTuple):
    """Whole blocks within one chunk whose digests an incremental manifest
    copies from the previous one, unread."""

    offset: int
    length: int
    is_data = False     # to ops: nothing to read


def rehash(dirty: Iterable[tuple], old_size: int, new_size: int,
           block_size: int) -> list:
    """The blocks of the new image whose digests must be computed again,
    as merged Ranges of whole blocks (the last may end at new_size).

    dirty: (offset, length) byte ranges of any alignment that hold every
    change since the old image.  A block that touches one is rehashed, and
    so is everything from the block holding the smaller size's end: a
    short last block is hashed at its length, so it changes when the size
    does, and blocks past the old end have no old digest::

        old      |    |    |    |    |  |
        new      |    |    |    |    |    |    |  |     (grew)
        dirty         ^^                  (any bytes)
        rehash        |    |         |    .    .  |
    """
    tail = min(old_size, new_size) // block_size * block_size
    spans = []
    for offset, length in dirty:
        if offset < 0 or length < 0:
            raise ValueError(f"invalid dirty range ({offset}, {length})")
        start = offset // block_size * block_size
        end = min(-(-(offset + length) // block_size) * block_size, tail)
        if length and start < end:
            spans.append((start, end))
    if tail < new_size:
        spans.append((tail, new_size))
    spans.sort()
    merged = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [Range(start, end - start) for start, end in merged]


def plan_incremental(extents: Iterable[Extent], ranges: list, size: int,
                     block_size: int, chunk_size: int,
                     segment: int) -> Iterator:
    """Cut [0, size) into what plan() makes inside ranges (rehash()'s:
    data pieces to read) and Keep pieces outside them, one per chunk at
    most; zero runs (whole blocks of hole) stay zero runs everywhere::

        chunks   |              |              |              |
        extents  |data                 |hole      |data             |
        ranges          |rehash    |                  |rehash |
        pieces   |keep  |data|keep |zero      |keep|keep|data |keep

    A hole is known zeros without the previous manifest, at no read: so a
    change the dirty ranges missed that left a hole (a disk shrunk and
    grown back, which QEMU's bitmaps do not mark) is never copied over.
    """
    ranges = iter(ranges)
    r = next(ranges, None)
    keep = [0, 0]       # the Keep run not yet yielded

    def kept():
        for offset, length in cut(keep[0], keep[1] - keep[0], chunk_size):
            yield Keep(offset, length)

    for piece in plan(extents, size, block_size, segment):
        pos, end = piece.offset, piece.offset + piece.length
        if not piece.is_data:
            yield from kept()
            keep = [end, end]
            yield piece
            continue
        while pos < end:
            while r is not None and r.offset + r.length <= pos:
                r = next(ranges, None)
            if r is not None and r.offset <= pos:
                stop = min(end, r.offset + r.length)
                yield from kept()
                keep = [stop, stop]
                yield piece._replace(offset=pos, length=stop - pos)
            else:
                stop = end if r is None else min(end, r.offset)
                keep[1] = stop
            pos = stop
    yield from kept()
