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
