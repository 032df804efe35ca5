"""A version 2 manifest of an image, written to a file: full or incremental.

write_full() reads the whole image (its holes excepted).  write_incremental()
reads only the blocks that changed since a previous manifest of the same
chain and copies every other block digest from it, checked::

    previous   |run 0     |run 1     |run 2     |run 3 |   (checked runs)
    dirty             ^^^                    ^
    new image  |copy|read|copy      |cp|r|cp  |copy  |read (grew)
               -> the same Packer as write_full: the same bytes

Both stream through manifest2_pack.Packer into a temporary file beside
path, renamed over it once whole and on disk (files.atomic_file): until
then path keeps what it held (the incomplete manifest a client may be
waiting on).  Memory is O(chunk count) plus one run of the previous
manifest, whatever the image size.

Because both feed the Packer the same block digests (a copied digest is
the one a read would compute: the block did not change), an incremental
manifest is byte for byte the full one of the same image but for the
header's kind, created and source.  That holds only if dirty covers every
change: the caller's dirty bitmap is trusted, and a full manifest now and
then (chain_started says when the last one was made) bounds what a missed
write can cost.
"""

from __future__ import annotations

import collections
import contextlib
from typing import NamedTuple

from . import blkhash, manifest2, ops, plan
from . import manifest as manifest_v1
from .errors import ManifestError
from .files import atomic_file
from .manifest2_pack import FileOut, Packer


class Stats(NamedTuple):
    kind: str                   # "full" or "incremental"
    size: int                   # of the image
    digest: bytes               # the image's blkhash
    bytes_read: int             # of the image
    blocks_hashed: int          # read and hashed
    blocks_zero: int            # holes: the zero digest, unread
    blocks_copied: int          # digests copied from the previous manifest
    manifest_bytes_read: int    # of the previous manifest


def write_full(path: str, source, *, generation: int, chain_id: str,
               chain_started: str, domain_xml: str, source_name: str,
               created: str, algorithm: str = blkhash.DEFAULT_ALGORITHM,
               block_size: int = blkhash.BLOCK_SIZE,
               chunk_size: int = manifest_v1.DEFAULT_CHUNK_SIZE,
               threads: int = 1) -> Stats:
    """Write the full manifest of source (a verify source) to path."""
    segment = ops.segment_size(block_size, source)
    pieces = plan.plan(source.extents(), source.size, block_size, segment)
    with _packing(path, source.size, generation=generation, kind="full",
                  chain_id=chain_id, chain_started=chain_started,
                  created=created, source=source_name,
                  domain_xml=domain_xml, algorithm=algorithm,
                  block_size=block_size, chunk_size=chunk_size) as packer:
        counts = _feed(packer, source, pieces, None, threads)
    return Stats("full", source.size, packer.header.digest, *counts, 0)


def write_incremental(path: str, previous, source, dirty, *,
                      generation: int, domain_xml: str, source_name: str,
                      created: str,
                      algorithm: str = blkhash.DEFAULT_ALGORITHM,
                      block_size: int = blkhash.BLOCK_SIZE,
                      chunk_size: int = manifest_v1.DEFAULT_CHUNK_SIZE,
                      threads: int = 1) -> Stats:
    """Write source's manifest to path from previous's and the blocks of
    source that touch dirty.

    previous: a reader (manifest2.FileReader) of the chain's last complete
    v2 manifest, of this algorithm, block and chunk size; its chain id and
    chain start carry over.  dirty: (offset, length) byte ranges holding
    every change since it.  A previous manifest that cannot serve
    (incomplete, other sizes, damaged, truncated) raises ManifestError,
    before anything is written or while (then path keeps what it held):
    the caller makes a full one instead.
    """
    counted = _Counted(previous)
    old = manifest2.read_header(counted)
    if not old.complete:
        raise ManifestError(f"{previous.name}: the previous manifest is "
                            f"incomplete")
    if (old.algorithm, old.block_size, old.chunk_size) != \
            (algorithm, block_size, chunk_size):
        raise ManifestError(
            f"{previous.name}: the previous manifest is of {old.algorithm} "
            f"in blocks of {old.block_size} and chunks of "
            f"{old.chunk_size}, not {algorithm}, {block_size}, {chunk_size}")
    runs = manifest2.Runs(counted, old, manifest2.read_chunks(counted, old))
    ranges = plan.rehash(dirty, old.size, source.size, block_size)
    segment = ops.segment_size(block_size, source)
    pieces = plan.plan_incremental(source.extents(), ranges, source.size,
                                   block_size, chunk_size, segment)
    with _packing(path, source.size, generation=generation,
                  kind="incremental", chain_id=old.chain_id,
                  chain_started=old.chain_started, created=created,
                  source=source_name, domain_xml=domain_xml,
                  algorithm=algorithm, block_size=block_size,
                  chunk_size=chunk_size) as packer:
        counts = _feed(packer, source, _prefetched(pieces, source),
                       runs.digests, threads)
    return Stats("incremental", source.size, packer.header.digest, *counts,
                 counted.bytes_read)


@contextlib.contextmanager
def _packing(path: str, size: int, **fields):
    """A Packer into a temporary file that replaces path when the body
    ends well; the Packer's header is complete after."""
    try:
        with atomic_file(path, 0o644) as fd:
            packer = Packer(FileOut(fd), size, **fields)
            yield packer
            packer.finish()
    except OSError as e:
        raise ManifestError(
            f"cannot write manifest {path}: {e.strerror}") from None


# Bytes of scattered blocks announced to the kernel ahead of their read,
# and at most this many pieces looked ahead (Keep and zero pieces count no
# bytes): memory stays that of the window, whatever the plan's length.
PREFETCH = 64 << 20
MAX_AHEAD = 4096


def _prefetched(pieces, source, window: int = PREFETCH):
    """pieces, with the data ones up to window bytes ahead announced to
    the source (will_need): one thread reading scattered blocks otherwise
    waits for each in turn (measured: 80-125 MiB/s against a full
    digest's 330-600 on this machine's disk).  Streamed: a 2 TiB disk
    with scattered changes plans millions of pieces."""
    hint = getattr(source, "will_need", None)
    if hint is None:
        yield from pieces
        return
    pieces = iter(pieces)
    ahead = collections.deque()     # announced, not yet yielded
    queued = 0
    while True:
        while not ahead or (queued < window and len(ahead) < MAX_AHEAD):
            piece = next(pieces, None)
            if piece is None:
                break
            if piece.is_data:
                hint(piece.offset, piece.length)
                queued += piece.length
            ahead.append(piece)
        if not ahead:
            return
        piece = ahead.popleft()
        if piece.is_data:
            queued -= piece.length
        yield piece


def _feed(packer: Packer, source, pieces, keep, threads: int) -> tuple:
    """Give packer every piece's block digests; (bytes read, blocks
    hashed, zero, copied)."""
    bs = packer.header.block_size
    read = hashed = zero = copied = 0
    for piece, digests in ops.digest_pieces(
            source, pieces, packer.header.algorithm, bs, threads):
        blocks = -(-piece.length // bs)
        if isinstance(piece, plan.Keep):
            packer.add_digests(keep(piece.offset, piece.length),
                               piece.length)
            copied += blocks
        elif digests is None:
            packer.zero(piece.length)
            zero += blocks
        else:
            packer.add_digests(digests, piece.length)
            read += piece.length
            hashed += blocks
    return read, hashed, zero, copied


class _Counted:
    """A reader that counts the bytes read through it."""

    def __init__(self, reader):
        self.reader, self.name, self.bytes_read = reader, reader.name, 0

    def pread(self, offset: int, length: int) -> bytes:
        data = self.reader.pread(offset, length)
        self.bytes_read += len(data)
        return data
