"""What a pull moves: the blocks whose digest in the frozen base's manifest
differs from what COPY holds.  Pure: digests in, block lists out.

Both sides are version 2 manifests (verify/manifest2.py): the VM host's,
read over NBD, and COPY's own record, a local file.  The chunk tables are
compared first, so only the runs of chunks that differ are read at all::

    source chunks  | c0 | c1 | c2 | c3 |      one read each
    COPY's chunks  | c0 | C1 | c2 | C3 |
                          ^         ^        differ: read these runs only
    source run 1   | a | b | Z | d |         Z: the zero-block digest
    COPY's run 1   | a | x | y | d |
                         ^   ^
                     fetch   zero (no read: COPY just gets zeros)

A block is fetched only when its digest differs and it is not zeros: a
pull never moves a zero block or an unchanged one.  COPY's run may be
shorter or missing (the disk grew, or COPY's record ends earlier): what
it lacks is unknown, so its blocks are fetched or zeroed.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from nbdsnap.verify import blkhash


class Blocks(NamedTuple):
    """One chunk's work: image block indices to fetch and to zero."""
    fetch: list
    zero: list
    same: int


def differing_chunks(source: list, have: Optional[list]) -> list:
    """Indices of the chunks whose digest in source differs from have's
    (have None or shorter: those chunks are unknown, so they differ)."""
    have = have or []
    return [i for i, digest in enumerate(source)
            if i >= len(have) or have[i] != digest]


def zero_digest(algorithm: str, block_size: int, length: int) -> bytes:
    """The digest of length zero bytes as one block: the zero-block digest
    for a full block, the short last block's own otherwise."""
    if length == block_size:
        return blkhash.zero_block_digest(algorithm, block_size)
    return blkhash.block_digests(bytes(length), algorithm, block_size)


def blocks(header, i: int, source_run: bytes,
           have_run: Optional[bytes]) -> Blocks:
    """Chunk i's blocks to fetch and to zero, from its runs of block
    digests in the source manifest and in COPY's record."""
    md, bs = header.digest_size, header.block_size
    first = i * header.blocks_per_chunk
    count = len(source_run) // md
    have_run = have_run or b""
    zero = blkhash.zero_block_digest(header.algorithm, bs)
    fetch, zeros, same = [], [], 0
    for j in range(count):
        want = source_run[j * md:(j + 1) * md]
        if have_run[j * md:(j + 1) * md] == want:
            same += 1
            continue
        if j == count - 1:
            length = header.chunk_length(i) - j * bs
            if length < bs:
                zero = zero_digest(header.algorithm, bs, length)
        (zeros if want == zero else fetch).append(first + j)
    return Blocks(fetch, zeros, same)


def ranges(indices, block_size: int, size: int,
           limit: int) -> list:
    """[(offset, length)] of the blocks at indices (ascending), those that
    touch merged, none longer than limit bytes, the last cut at size."""
    out = []
    for index in indices:
        offset = index * block_size
        length = min(block_size, size - offset)
        if out and out[-1][0] + out[-1][1] == offset and \
                out[-1][1] + length <= limit:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))
    return out


def block_lengths(indices, block_size: int, size: int) -> int:
    """The bytes of the blocks at indices (the last one may be short)."""
    return sum(min(block_size, size - i * block_size) for i in indices)
