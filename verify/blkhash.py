"""The blkhash digest of a disk image.  Pure: no I/O.

blkhash (Soffer and Waisbard, SECRYPT 2024; the nirs/blkhash project) splits
the image into 64 KiB blocks, hashes every block on its own, and hashes the
block digests in order, followed by the image size in bytes as a 64-bit
little-endian integer::

    image   |<-- 64 KiB -->|<-- 64 KiB -->|     ...     |<- tail ->|
            |   block 0    |   block 1    |             | block N-1|
            +------+-------+------+-------+-------------+----+-----+
                   |              |                          |
                   v              v                          v
                 H(b0)          H(b1)        ...          H(bN-1)    le64(size)
                   |              |                          |          |
                   +--------------+-------------+------------+----------+
                                                |
                                                v
    digest = H( H(b0) || H(b1) || ... || H(bN-1) || le64(size) )

- The last block is hashed at its real length, never padded: a 100-byte
  image has one block of 100 bytes.
- A block made only of zeros has a digest known in advance, H(64 KiB of
  zeros); we compute it once and reuse it, and a known hole (zero()) costs
  no hashing at all.  A short last block of zeros is NOT such a block: it is
  hashed at its real length like any other short block.
- The empty image has no blocks: its digest is H(le64(0)), the hash of eight
  zero bytes, not H(b"").

This is the construction of blkhash's current library (lib/blkhash.c: the
outer digest gets every block digest, then the message length, little
endian).  Older blkhash releases hashed differently (no size field, and
later 4, 32 or 64 interleaved "streams" whose digests were hashed together),
so a blksum from those releases prints other values for the same image.

H is any hashlib algorithm of fixed digest size (sha256 by default), or
"blake3" when the optional blake3 module is installed.  Hasher mirrors
hashlib: update() takes data of any length, zero() adds a known hole without
reading it, and digest()/hexdigest() may be called at any time.

The block digests do not depend on each other, only their order does, so
they can be computed anywhere and fed in order::

    thread 1:  block_digests(segment 0) -> H(b0) .. H(b255) --+
    thread 2:  block_digests(segment 1) -> H(b256) .. H(b511) -+--> in order
    thread 1:  block_digests(segment 2) -> ...              --+   add_digests()

block_digests() hashes one block-aligned piece of the image (hashlib and
blake3 release the GIL while they hash, so threads use every core), and
Hasher.add_digests() takes its result.
"""

from __future__ import annotations

import functools
import hashlib
import struct

from .errors import UnknownAlgorithm

BLOCK_SIZE = 64 * 1024
DEFAULT_ALGORITHM = "sha256"

# zero() adds the zero-block digest this many times per outer update, so a
# 1 TiB hole costs 4096 calls instead of 16 million, in bounded memory.
_ZERO_BATCH = 4096


def available_algorithms() -> list[str]:
    """The algorithm names this machine can use, sorted."""
    names = set()
    for name in hashlib.algorithms_available:
        try:
            _constructor(name)
        except UnknownAlgorithm:
            continue
        names.add(name)
    try:
        _constructor("blake3")
        names.add("blake3")
    except UnknownAlgorithm:
        pass
    return sorted(names)


@functools.lru_cache(maxsize=None)
def _constructor(algorithm: str):
    """Return a callable: f() or f(data) -> a new hash object."""
    new = _lookup(algorithm)
    # Prefer the named constructor (hashlib.sha256): hashlib.new() looks the
    # name up again on every call, once per 64 KiB block.
    named = getattr(hashlib, algorithm, None)
    if algorithm in hashlib.algorithms_guaranteed and callable(named):
        return named
    return new


def _lookup(algorithm: str):
    if algorithm == "blake3":
        try:
            import blake3
        except ImportError:
            raise UnknownAlgorithm(
                "digest algorithm 'blake3' needs the Python module blake3, "
                "which is not installed") from None
        return blake3.blake3
    try:
        probe = hashlib.new(algorithm)
    except (ValueError, TypeError):
        raise UnknownAlgorithm(
            f"unknown digest algorithm: {algorithm!r}") from None
    # SHAKE has no fixed size (digest_size 0, digest() needs a length):
    # a block digest must have one size for the outer hash to be defined.
    if probe.digest_size == 0:
        raise UnknownAlgorithm(
            f"digest algorithm {algorithm!r} has no fixed digest size")
    return functools.partial(hashlib.new, algorithm)


@functools.lru_cache(maxsize=None)
def _zeros(length: int) -> bytes:
    return bytes(length)


def digest_size(algorithm: str = DEFAULT_ALGORITHM) -> int:
    """The size in bytes of one block digest."""
    return _constructor(algorithm)().digest_size


@functools.lru_cache(maxsize=None)
def zero_block_digest(algorithm: str = DEFAULT_ALGORITHM,
                      block_size: int = BLOCK_SIZE) -> bytes:
    """H(block_size zero bytes): the digest of every all-zero block."""
    return _constructor(algorithm)(_zeros(block_size)).digest()


def block_digests(data, algorithm: str = DEFAULT_ALGORITHM,
                  block_size: int = BLOCK_SIZE) -> bytes:
    """H(b1) || H(b2) || ... for the blocks of data, concatenated.

    data starts at a block boundary of the image; every block is full but
    the last, which may be short when data ends at the end of the image.
    A full block of zeros gets the precomputed zero-block digest.  Safe to
    call from several threads at once.
    """
    view = memoryview(data).cast("B")
    new = _constructor(algorithm)
    zero_block = _zeros(block_size)
    zero_md = zero_block_digest(algorithm, block_size)
    out = []
    append = out.append
    for start in range(0, len(view), block_size):
        block = view[start:start + block_size]
        # bytes.startswith is a memcmp: for data it stops at the first
        # non-zero byte, so testing every block costs next to nothing.
        if len(block) == block_size and zero_block.startswith(block):
            append(zero_md)
        else:
            append(new(block).digest())
    return b"".join(out)


class Hasher:
    """Streaming blkhash of one image (see the module docstring)."""

    def __init__(self, algorithm: str = DEFAULT_ALGORITHM,
                 block_size: int = BLOCK_SIZE):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive: {block_size}")
        self.algorithm = algorithm
        self.block_size = block_size
        self._new = _constructor(algorithm)
        self._zero_md = zero_block_digest(algorithm, block_size)
        self._zero_block = _zeros(block_size)
        self._outer = self._new()
        # Bytes of a block not complete yet; never a full block between calls.
        self._pending = bytearray()
        self._length = 0
        # True once the short last block went in through add_digests().
        self._ended = False

    @property
    def length(self) -> int:
        """Bytes added so far, by update() and zero()."""
        return self._length

    def update(self, data) -> None:
        """Add data (any bytes-like object, any length)."""
        view = memoryview(data).cast("B")
        if view and self._ended:
            raise ValueError("the short last block was already added")
        self._length += len(view)
        bs = self.block_size
        if self._pending:
            take = min(len(view), bs - len(self._pending))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < bs:
                return
            self._add_block(self._pending)
            self._pending.clear()
        full = len(view) - len(view) % bs
        for start in range(0, full, bs):
            self._add_block(view[start:start + bs])
        if full < len(view):
            self._pending += view[full:]

    def zero(self, length: int) -> None:
        """Add length zero bytes without the caller reading them (a hole)."""
        if length < 0:
            raise ValueError(f"length must not be negative: {length}")
        if length and self._ended:
            raise ValueError("the short last block was already added")
        self._length += length
        bs = self.block_size
        if self._pending:
            take = min(length, bs - len(self._pending))
            self._pending += self._zero_block[:take]
            length -= take
            if len(self._pending) < bs:
                return
            self._add_block(self._pending)
            self._pending.clear()
        count, rest = divmod(length, bs)
        self._add_zero_blocks(count)
        if rest:
            self._pending += self._zero_block[:rest]

    def add_digests(self, digests: bytes, length: int) -> None:
        """Add length bytes of image by their block digests.

        digests is what block_digests() returns for those bytes; they must
        start at a block boundary (everything added so far is whole
        blocks).  When length is not a multiple of the block size, its last
        block is the short last block of the image: nothing may follow.
        """
        bs = self.block_size
        if self._pending or self._ended:
            raise ValueError(
                "add_digests() needs everything added so far to be whole "
                "blocks")
        count = -(-length // bs)
        if len(digests) != count * len(self._zero_md):
            raise ValueError(
                f"{len(digests)} bytes of digests do not match {length} "
                f"bytes of data")
        self._outer.update(digests)
        self._length += length
        self._ended = length % bs != 0

    def digest(self) -> bytes:
        """The digest of what was added so far; adding more stays allowed."""
        outer = self._outer.copy()
        if self._pending:
            # The short last block, at its real length.
            outer.update(self._new(self._pending).digest())
        outer.update(struct.pack("<Q", self._length))
        return outer.digest()

    def hexdigest(self) -> str:
        return self.digest().hex()

    def _add_block(self, block) -> None:
        # bytes.startswith compares with memcmp and accepts any buffer;
        # "memoryview == bytes" compares item by item and is slower than
        # sha256 itself.  The block is full here, so startswith is equality.
        if self._zero_block.startswith(block):
            self._outer.update(self._zero_md)
        else:
            self._outer.update(self._new(block).digest())

    def _add_zero_blocks(self, count: int) -> None:
        if count >= _ZERO_BATCH:
            batch = self._zero_md * _ZERO_BATCH
            while count >= _ZERO_BATCH:
                self._outer.update(batch)
                count -= _ZERO_BATCH
        if count:
            self._outer.update(self._zero_md * count)
