"""What nbd-verify does with sources: digest one, compare two.

Both walk the source's extents: holes are never read (a digest adds them
with Hasher.zero(), a comparison skips a range that is a hole in both), and
data is read in large chunks aligned to READ_SIZE.

compare() reports differences in whole blkhash blocks (64 KiB, the last one
shorter), merged into ranges: the unit a manifest of block digests will be
able to point at, so "compare" and a later "check MANIFEST" name the same
ranges for the same damage.
"""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple

from . import blkhash
from .errors import SizeMismatch
from .sources import Extent

# Large aligned reads: few system calls, and a multiple of the block size so
# that chunks never split a block except at extent boundaries.
READ_SIZE = 4 * 1024 * 1024
assert READ_SIZE % blkhash.BLOCK_SIZE == 0


class Range(NamedTuple):
    offset: int
    length: int


def checksum(source, algorithm: str = blkhash.DEFAULT_ALGORITHM,
             block_size: int = blkhash.BLOCK_SIZE) -> str:
    """The blkhash hex digest of source."""
    hasher = blkhash.Hasher(algorithm, block_size)
    buf = bytearray(READ_SIZE)
    for extent in source.extents():
        if not extent.is_data:
            hasher.zero(extent.length)
            continue
        for offset, length in _chunks(extent.offset, extent.length):
            view = memoryview(buf)[:length]
            source.read_into(offset, view)
            hasher.update(view)
    return hasher.hexdigest()


def compare(source, copy,
            block_size: int = blkhash.BLOCK_SIZE) -> Iterator[Range]:
    """Yield the ranges where copy differs from source, merged, in order.

    Raises SizeMismatch before reading anything when the sizes differ.
    """
    if source.size != copy.size:
        raise SizeMismatch(
            f"{source.name} is {source.size} bytes but {copy.name} is "
            f"{copy.size} bytes")
    size = source.size
    buf_a = bytearray(READ_SIZE)
    buf_b = bytearray(READ_SIZE)
    run = None      # [start, end) of the differing range being merged
    for segment in _data_segments(source.extents(), copy.extents()):
        for offset, length in _chunks(segment.offset, segment.length):
            view_a = memoryview(buf_a)[:length]
            view_b = memoryview(buf_b)[:length]
            source.read_into(offset, view_a)
            copy.read_into(offset, view_b)
            # bytearray.startswith is a memcmp; "view_a == view_b" compares
            # item by item, about 50 times slower.
            if buf_a.startswith(view_b):
                continue
            for start in _differing_blocks(buf_a, view_b, offset, block_size):
                end = min(start + block_size, size)
                if run and start <= run[1]:
                    run[1] = max(run[1], end)
                else:
                    if run:
                        yield Range(run[0], run[1] - run[0])
                    run = [start, end]
    if run:
        yield Range(run[0], run[1] - run[0])


def _differing_blocks(buf_a: bytearray, view_b: memoryview, offset: int,
                      block_size: int) -> Iterator[int]:
    """Start offsets of the blocks where buf_a and view_b differ.

    Both hold the image bytes at offset; blocks are aligned to the image,
    not to the buffers.
    """
    length = len(view_b)
    i = 0
    while i < length:
        block_start = (offset + i) // block_size * block_size
        j = min(block_start + block_size - offset, length)
        if not buf_a.startswith(view_b[i:j], i):
            yield block_start
        i = j


def _chunks(offset: int, length: int,
            size: int = READ_SIZE) -> Iterator[tuple[int, int]]:
    """Split [offset, offset + length) at multiples of size."""
    end = offset + length
    while offset < end:
        n = min(end, (offset // size + 1) * size) - offset
        yield offset, n
        offset += n


def _data_segments(a: Iterable[Extent], b: Iterable[Extent]) -> Iterator[Range]:
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
