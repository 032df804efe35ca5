"""Block digests in, a version 2 manifest out (the format: manifest2.py).

Packer takes the block digests of an image in order, as ops.scan() gives
them, and writes each one where the block table puts it while it hashes
it into the chunk and image digests; finish() writes what only the end
knows.  Every offset follows from the sizes alone, so nothing waits::

    while the digests come     block table  (pwrite at its offset)
                               chunk i's digest, the image digest (hashed)
    finish()                   chunk table, domain XML, then the header

It holds one chunk digest per chunk and a buffer of at most _FLUSH bytes
of block digests: 8 KiB for a 64 GiB image in 16 MiB chunks, not the
512 MiB per TiB that keeping every block digest would.  Its output is
anything with pwrite(data, offset): a file (manifest2_write) or memory
(build(), for tests and small images).  The header fields are checked
when the Packer is made, before any image is read.
"""

from __future__ import annotations

import hashlib
import os

from . import blkhash
from . import manifest as manifest_v1
from . import manifest2
from .errors import ManifestError
from .files import write_atomic

_FLUSH = 1 << 20            # block digests written at a time
_ZERO_BATCH = 4096          # zero-block digests added at a time


class Packer:
    """A scan() sink (add_digests, zero) writing a v2 manifest to out.

    chunk_count: the chunks the block digests will cover; all of the
    image's by default.  Fewer make an incomplete manifest (its first
    chunks only, complete flag clear).
    """

    def __init__(self, out, size: int, *, generation: int, kind: str,
                 chain_id: str, chain_started: str, created: str,
                 source: str, domain_xml: str,
                 algorithm: str = blkhash.DEFAULT_ALGORITHM,
                 block_size: int = blkhash.BLOCK_SIZE,
                 chunk_size: int = manifest_v1.DEFAULT_CHUNK_SIZE,
                 chunk_count: int | None = None):
        if chunk_size <= 0 or chunk_size % block_size:
            raise ValueError(f"chunk size {chunk_size} is not a multiple of "
                             f"the block size {block_size}")
        md = blkhash.digest_size(algorithm)
        every = -(-size // chunk_size)
        count = every if chunk_count is None else chunk_count
        if not 0 <= count <= every:
            raise ValueError(f"{count} chunks for {size} bytes")
        self._out = out
        self._xml = domain_xml.encode("utf-8")
        self._covered = min(count * chunk_size, size)
        self._header = manifest2.Header(
            size=size, algorithm=algorithm, block_size=block_size,
            digest_size=md, chunk_size=chunk_size, chunk_count=count,
            complete=count == every, generation=generation, kind=kind,
            chain_id=chain_id, created=created, chain_started=chain_started,
            source=source, digest=bytes(md),
            **manifest2.layout(size, block_size, md, chunk_size, count,
                               len(self._xml)),
            chunk_table_sha256=bytes(32), xml_sha256=bytes(32))
        pack_header(self._header)     # refuse bad fields now
        self._pos = 0           # image bytes whose digests came
        self._written = self._header.block_table[0]
        self._buf = bytearray()
        self._whole = blkhash.Hasher(algorithm, block_size)
        self._chunk = blkhash.Hasher(algorithm, block_size)
        self._chunks = []
        self._zero_batch = blkhash.zero_block_digest(
            algorithm, block_size) * _ZERO_BATCH

    @property
    def header(self) -> manifest2.Header:
        """The header as it stands (digests filled in by finish())."""
        return self._header

    def add_digests(self, digests, length: int) -> None:
        """The block digests of the next length bytes of the image."""
        h = self._header
        bs, cs, md = h.block_size, h.chunk_size, h.digest_size
        view = memoryview(digests).cast("B")
        while length:
            if self._pos >= self._covered:
                raise ValueError(f"block digests past the {self._covered} "
                                 f"bytes the manifest covers")
            chunk_end = min((self._pos // cs + 1) * cs, h.size)
            n = min(length, chunk_end - self._pos)
            k = -(-n // bs) * md
            part = view[:k]
            self._chunk.add_digests(part, n)
            self._whole.add_digests(part, n)
            self._buf += part
            if len(self._buf) >= _FLUSH:
                self._flush()
            self._pos += n
            if self._pos == chunk_end:
                self._chunks.append(self._chunk.digest())
                self._chunk = blkhash.Hasher(h.algorithm, bs)
            view = view[k:]
            length -= n
        if len(view):
            raise ValueError("more block digests than bytes")

    def zero(self, length: int) -> None:
        """length bytes of zeros, unread: whole blocks, or up to the end."""
        h = self._header
        full, rest = divmod(length, h.block_size)
        while full:
            n = min(full, _ZERO_BATCH)
            self.add_digests(memoryview(self._zero_batch)[:n * h.digest_size],
                             n * h.block_size)
            full -= n
        if rest:
            # A short last block of zeros is hashed at its length.
            self.add_digests(blkhash.block_digests(
                bytes(rest), h.algorithm, h.block_size), rest)

    def _flush(self) -> None:
        self._out.pwrite(self._buf, self._written)
        self._written += len(self._buf)
        self._buf.clear()

    def finish(self) -> manifest2.Header:
        """Write the chunk table, the XML and the header; return it."""
        if self._pos != self._covered:
            raise ValueError(f"the block digests cover {self._pos} of "
                             f"{self._covered} bytes")
        self._flush()
        h = self._header
        table = b"".join(self._chunks)
        h = self._header = h._replace(
            digest=self._whole.digest() if h.complete else h.digest,
            chunk_table_sha256=hashlib.sha256(table).digest(),
            xml_sha256=hashlib.sha256(self._xml).digest())
        self._out.pwrite(table, h.chunk_table[0])
        self._out.pwrite(self._xml, h.xml[0])
        self._out.pwrite(pack_header(h), 0)
        return h


def pack_header(h: manifest2.Header) -> bytes:
    """The HEADER_SIZE bytes of h, checksummed: read_header()'s inverse.

    The parts must be where manifest2.layout() puts them; the source is
    cut to SOURCE_MAX bytes (at a character boundary).  Raises ValueError
    for a field the format cannot hold.
    """
    m = manifest2
    if h.kind not in m.KINDS.values():
        raise ValueError(f"kind {h.kind!r} is not full or incremental")
    if not 0 <= h.generation < 1 << 64:
        raise ValueError(f"invalid generation: {h.generation}")
    where = m.layout(h.size, h.block_size, h.digest_size, h.chunk_size,
                     h.chunk_count, h.xml[1])
    if (h.chunk_table, h.block_table, h.xml) != tuple(where.values()):
        raise ValueError("the parts are not where the sizes put them")
    kind = {v: k for k, v in m.KINDS.items()}[h.kind]
    src = h.source.encode("utf-8")[:m.SOURCE_MAX]
    src = src.decode("utf-8", "ignore").encode("utf-8")
    fixed = m._FIXED.pack(
        m.MAGIC, m.VERSION, m.COMPLETE if h.complete else 0,
        h.size, h.block_size, h.digest_size, h.chunk_size, h.chunk_count,
        h.generation, kind,
        _ascii(h.algorithm, 16, "algorithm"),
        _ascii(h.chain_id, 64, "chain id"),
        _ascii(h.created, 32, "created"),
        _ascii(h.chain_started, 32, "chain started"), h.digest,
        *h.chunk_table, *h.block_table, *h.xml,
        h.chunk_table_sha256, h.xml_sha256, len(src))
    head = (fixed + src).ljust(m._SUM, b"\0")
    return head + hashlib.sha256(head).digest()


def _ascii(text: str, width: int, what: str) -> bytes:
    data = text.encode("ascii", "replace")
    if len(data) > width or not text.isascii() or \
            not manifest2._TEXT.fullmatch(data):
        raise ValueError(f"invalid {what}: {text!r}")
    return data


class FileOut:
    """pwrite() into a file descriptor, whole."""

    def __init__(self, fd: int):
        self.fd = fd

    def pwrite(self, data, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n


class MemoryOut:
    """pwrite() into a bytearray (data)."""

    def __init__(self):
        self.data = bytearray()

    def pwrite(self, data, offset: int) -> None:
        end = offset + len(data)
        if len(self.data) < end:
            self.data += bytes(end - len(self.data))
        self.data[offset:end] = data


def build(block_digests, size: int, *, generation: int, chain_id: str,
          kind: str, domain_xml: str,
          algorithm: str = blkhash.DEFAULT_ALGORITHM,
          block_size: int = blkhash.BLOCK_SIZE,
          chunk_size: int = manifest_v1.DEFAULT_CHUNK_SIZE,
          complete: bool = True, source: str = "", created: str = "",
          chain_started: str = "") -> bytes:
    """The bytes of a v2 manifest of an image of size bytes, in memory.

    block_digests is blkhash.block_digests() of the whole image (or, when
    not complete, of its first whole chunks), as bytes or a list of one
    digest per block; the chunk digests and the image digest are computed
    from them, so they cannot disagree.
    """
    if isinstance(block_digests, (list, tuple)):
        block_digests = b"".join(block_digests)
    md = blkhash.digest_size(algorithm)
    if len(block_digests) % md:
        raise ValueError("block digests of a partial length")
    covered = min(len(block_digests) // md * block_size, size)
    count = -(-covered // chunk_size) if chunk_size > 0 else 0
    if -(-covered // block_size) * md != len(block_digests) or \
            covered != min(count * chunk_size, size) or \
            complete and covered != size:
        raise ValueError(f"{len(block_digests) // md} block digests do not "
                         f"cover {size} bytes")
    out = MemoryOut()
    packer = Packer(out, size, generation=generation, kind=kind,
                    chain_id=chain_id, chain_started=chain_started,
                    created=created, source=source, domain_xml=domain_xml,
                    algorithm=algorithm, block_size=block_size,
                    chunk_size=chunk_size, chunk_count=count)
    packer.add_digests(block_digests, covered)
    packer.finish()
    return bytes(out.data)


def write(path: str, data: bytes) -> None:
    """Write what build() made, atomically."""
    try:
        write_atomic(path, data, mode=0o644)
    except OSError as e:
        raise ManifestError(
            f"cannot write manifest {path}: {e.strerror}") from None
