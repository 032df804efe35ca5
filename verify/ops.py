"""What nbd-verify does with sources: digest one, compare two, check a copy.

All of them walk the source's extents: holes are never read (a digest adds
them as known zeros, a comparison skips a range that is a hole in both), and
data is read in large aligned pieces by a pool of threads, one piece per
job, while the main thread takes the results in image order::

    extents  |data......|hole.............|data....|
    plan     |d0 |d1 |d2|zero run         |d3 |d4 |      (d: one job each)
    workers    read + block_digests(d0)  read + block_digests(d1)  ...
    in order   d0, d1, d2, zero run, d3, d4 -> Hasher, ChunkHasher, ...

hashlib and blake3 release the GIL while they hash a block and the reads
release it while they wait, so the workers use every core; blkhash's outer
hash is sequential, but it only sees 32 bytes per 64 KiB block.

compare() reports differences in whole blkhash blocks (64 KiB, the last one
shorter), merged into ranges; check() in whole manifest chunks.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
from typing import Iterable, Iterator, Optional

from . import blkhash
from . import manifest as manifest_mod
from .errors import SizeMismatch
from .manifest import ManifestError
from .plan import Piece, Range, cut, data_segments, plan


# A job reads at least this much: enough to make handing it to a thread cheap.
JOB_SIZE = 4 * 1024 * 1024


def default_threads(*sources) -> int:
    """One worker per CPU we may run on, or per NBD connection if more."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:      # not on Linux
        cpus = os.cpu_count() or 1
    return max([cpus] + [s.connections for s in sources])


def checksum(source, algorithm: str = blkhash.DEFAULT_ALGORITHM,
             block_size: int = blkhash.BLOCK_SIZE,
             threads: Optional[int] = None) -> str:
    """The blkhash hex digest of source."""
    hasher = blkhash.Hasher(algorithm, block_size)
    scan(source, [hasher], algorithm, block_size, threads)
    return hasher.hexdigest()


def make_manifest(source, algorithm: str = blkhash.DEFAULT_ALGORITHM,
                  chunk_size: int = manifest_mod.DEFAULT_CHUNK_SIZE,
                  block_size: int = blkhash.BLOCK_SIZE,
                  threads: Optional[int] = None) -> manifest_mod.Manifest:
    """The image digest and the chunk digests of source, in one pass."""
    created = manifest_mod.now()
    hasher = blkhash.Hasher(algorithm, block_size)
    chunks = manifest_mod.ChunkHasher(algorithm, block_size, chunk_size)
    scan(source, [hasher, chunks], algorithm, block_size, threads)
    return manifest_mod.Manifest(
        size=source.size, algorithm=algorithm, block_size=block_size,
        chunk_size=chunk_size, digest=hasher.hexdigest(),
        chunks=chunks.hexdigests(), source=source.name, created=created)


def check(manifest: manifest_mod.Manifest, copy,
          threads: Optional[int] = None) -> list:
    """The ranges (whole chunks, merged) where copy differs from manifest.

    Raises SizeMismatch before reading anything when the sizes differ, and
    ManifestError for a manifest that is incomplete or contradicts itself.
    """
    if not manifest.complete:
        raise ManifestError(
            "the manifest is incomplete (its digest is still being "
            "computed); try again later")
    if copy.size != manifest.size:
        raise SizeMismatch(
            f"the manifest is of {manifest.size} bytes but {copy.name} is "
            f"{copy.size} bytes")
    hasher = blkhash.Hasher(manifest.algorithm, manifest.block_size)
    chunks = manifest_mod.ChunkHasher(
        manifest.algorithm, manifest.block_size, manifest.chunk_size)
    scan(copy, [hasher, chunks], manifest.algorithm, manifest.block_size,
         threads)
    actual = chunks.hexdigests()
    ranges = [Range(*r) for r in manifest_mod.differing_ranges(
        manifest.chunks, actual, manifest.chunk_size, manifest.size)]
    # The image digest comes from the same block digests as the chunks:
    # one without the other means the manifest was not made by a digest.
    if bool(ranges) != (hasher.hexdigest() != manifest.digest):
        raise ManifestError(
            "the manifest contradicts itself: its image digest and its "
            "chunk digests do not describe the same image")
    return ranges


def scan(source, sinks: Iterable, algorithm: str = blkhash.DEFAULT_ALGORITHM,
         block_size: int = blkhash.BLOCK_SIZE,
         threads: Optional[int] = None) -> None:
    """Feed the block digests of source, in order, to every sink.

    A sink has add_digests(digests, length) and zero(length), like
    blkhash.Hasher and manifest.ChunkHasher.
    """
    sinks = list(sinks)
    segment = segment_size(block_size, source)
    pieces = plan(source.extents(), source.size, block_size, segment)
    for done, digests in digest_pieces(source, pieces, algorithm,
                                       block_size, threads):
        for sink in sinks:
            if digests is None:
                sink.zero(done.length)
            else:
                sink.add_digests(digests, done.length)


def digest_pieces(source, pieces: Iterable, algorithm: str,
                  block_size: int, threads: Optional[int] = None
                  ) -> Iterator[tuple]:
    """Yield (piece, its block digests) in order, reading the data pieces
    (block-aligned, at most segment_size() long) by a pool of threads; any
    other piece (is_data false: a hole, or a part an incremental manifest
    copies) comes back as (piece, None), unread."""
    buf_size = min(_piece_size(block_size, source),
                   segment_size(block_size, source))
    local = threading.local()

    def job(offset: int, length: int) -> bytes:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(buf_size)
        # Hash each piece right after reading it, while it is in the cache.
        out = []
        for start, n in cut(offset, length, len(buf)):
            view = memoryview(buf)[:n]
            source.read_into(start, view)
            out.append(blkhash.block_digests(view, algorithm, block_size))
        return b"".join(out)

    return _run(pieces, job, threads or default_threads(source))


def compare(source, copy, block_size: int = blkhash.BLOCK_SIZE,
            threads: Optional[int] = None) -> Iterator[Range]:
    """Yield the ranges where copy differs from source, merged, in order.

    Raises SizeMismatch before reading anything when the sizes differ.
    """
    if source.size != copy.size:
        raise SizeMismatch(
            f"{source.name} is {source.size} bytes but {copy.name} is "
            f"{copy.size} bytes")
    size = source.size
    segment = segment_size(block_size, source, copy)
    local = threading.local()

    def job(offset: int, length: int) -> list:
        bufs = getattr(local, "bufs", None)
        if bufs is None:
            bufs = local.bufs = (bytearray(segment), bytearray(segment))
        buf_a, buf_b = bufs
        view_b = memoryview(buf_b)[:length]
        _read(source, offset, memoryview(buf_a)[:length])
        _read(copy, offset, view_b)
        # bytearray.startswith is a memcmp; "view_a == view_b" compares
        # item by item, about 50 times slower.
        if buf_a.startswith(view_b):
            return []
        return list(_differing_blocks(buf_a, view_b, offset, block_size))

    pieces = (Piece(True, offset, length)
              for seg in data_segments(source.extents(), copy.extents())
              for offset, length in cut(seg.offset, seg.length, segment))
    run = None      # [start, end) of the differing range being merged
    for _, starts in _run(pieces, job, threads or
                          default_threads(source, copy)):
        for start in starts:
            end = min(start + block_size, size)
            if run and start <= run[1]:
                run[1] = max(run[1], end)
            else:
                if run:
                    yield Range(run[0], run[1] - run[0])
                run = [start, end]
    if run:
        yield Range(run[0], run[1] - run[0])


def _run(pieces: Iterable[Piece], job, workers: int) -> Iterator[tuple]:
    """Yield (piece, result) in order: job(offset, length) for data pieces,
    run by workers threads, at most 2 * workers ahead; None for zero runs.
    """
    if workers < 1:
        raise ValueError(f"workers must be positive: {workers}")
    ahead = 2 * workers
    with concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="nbd-verify") as pool:
        queue = collections.deque()
        running = 0
        try:
            for piece in pieces:
                if piece.is_data:
                    queue.append(
                        (piece, pool.submit(job, piece.offset, piece.length)))
                    running += 1
                else:
                    queue.append((piece, None))
                while queue and (queue[0][1] is None or running >= ahead):
                    done, future = queue.popleft()
                    if future is None:
                        yield done, None
                    else:
                        running -= 1
                        yield done, future.result()
            while queue:
                done, future = queue.popleft()
                yield done, None if future is None else future.result()
        finally:
            # On an error, don't read what nobody will look at.
            for _, future in queue:
                if future is not None:
                    future.cancel()


def segment_size(block_size: int, *sources) -> int:
    """The bytes one job reads: at least JOB_SIZE, whole blocks."""
    size = max([JOB_SIZE] + [s.read_size for s in sources])
    return max(block_size, size // block_size * block_size)


def _piece_size(block_size: int, source) -> int:
    """The bytes one read_into() of source asks for: whole blocks."""
    return max(block_size, source.read_size // block_size * block_size)


def _read(source, offset: int, view: memoryview) -> None:
    """Fill view from source in reads of the size it likes."""
    piece = source.read_size
    if len(view) <= piece:
        source.read_into(offset, view)
        return
    for start, n in cut(offset, len(view), piece):
        source.read_into(start, view[start - offset:start - offset + n])


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
