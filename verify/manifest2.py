"""The manifest, version 2: every block's digest, readable in parts.

Version 1 (manifest.py, JSON) holds the image digest and one digest per
16 MiB chunk: enough to say which chunks of a copy differ, not which
blocks.  Version 2 also holds the digest of every 64 KiB block, the
change-tracking chain (generation, chain id, full or incremental) and the
frozen domain's inactive definition.  A client with a 2 TiB copy must not
download 1 GiB of block digests to learn that 40 chunks changed, so the
file is binary, cut into parts at offsets the header gives, each one read
with one plain read (a file's pread, an NBD read)::

    offset 0                 header, HEADER_SIZE (4096) bytes, fixed
           |  magic "NBDSNAPM", version 2, flags (bit 0: complete)
           |  size, block_size, digest_size, chunk_size, chunk_count
           |  algorithm, generation, kind (1 full, 2 incremental),
           |  chain_id, created, chain_started (when the chain's
           |  full manifest was created), digest (the image's blkhash)
           |  offset + length of the three parts below
           |  sha256(chunk table), sha256(domain XML), source
           |  sha256(header bytes 0 .. 4063)   <- the last 32 bytes
    4096                     chunk table: chunk_count digests, in order,
           |                 digest_size bytes each, raw
    4096 + C                 block table: every block's digest, in
           |                 image order, digest_size bytes each;
           |                 chunk i's run starts at
           |                 block_table_offset + i * B * digest_size,
           |                 B = chunk_size / block_size
           |                 domain XML, UTF-8, xml_length bytes
    end

What proves what (sha256 for the structure, the manifest's algorithm H
for the image):

    header   its own sha256 in its last 32 bytes
    chunks   sha256(chunk table) in the header
    run i    chunks[i] = H(run i || le64(chunk i's length)): chunk i's
             blkhash, computed from exactly these block digests
             (blkhash.Hasher.add_digests), so a reader that fetched run i
             recomputes chunks[i] and compares
    XML      sha256(domain XML) in the header
    digest   H(every block digest || le64(size)), the same blocks

so a reader that trusts the header trusts every part it reads, alone.
The offsets are not free: a reader computes the one layout the sizes
allow and refuses a header that says otherwise, and every count and
length is bounded before anything is allocated, so a damaged or hostile
manifest is one ManifestError line.

Zero blocks need no read: a full block of zeros has the digest
blkhash.zero_block_digest(algorithm, block_size) (Header.zero_digest);
a short last block of zeros does not (blkhash hashes it at its length).

complete is 0 while a manifest is still being written: then chunk_count
may be less than the image has, and the block table covers only those
chunks, and the image digest means nothing yet; check refuses it as it
refuses an incomplete version 1.

All integers are little endian.  Text fields are ASCII (created,
chain_started, algorithm, chain_id) or UTF-8 (source, truncated to SOURCE_MAX bytes),
padded with NUL bytes.  A v1 manifest starts with "{", a v2 with the
magic: read() tells them apart and returns what check needs of either.

This module is the format and its reading.  Writing: manifest2_pack
(block digests in, manifest bytes out, streamed) and manifest2_write
(a full or an incremental manifest of an image, into a file).
"""

from __future__ import annotations

import hashlib
import re
import struct
from typing import NamedTuple

from . import blkhash
from . import manifest as manifest_v1
from .errors import ManifestError, UnknownAlgorithm
from .readers import BytesReader, FileReader, SourceReader  # noqa: F401

MAGIC = b"NBDSNAPM"
VERSION = 2
HEADER_SIZE = 4096
FULL, INCREMENTAL = 1, 2
KINDS = {FULL: "full", INCREMENTAL: "incremental"}
COMPLETE = 1

# Bounds, checked before anything is read or allocated.
MAX_SIZE = 1 << 62                  # image bytes
MIN_BLOCK, MAX_BLOCK = 512, 64 << 20
MAX_DIGEST = 64                     # sha512
MAX_RUN = 16 << 20                  # one chunk's block digests
MAX_CHUNK_TABLE = 64 << 20          # 2 PiB in 16 MiB chunks of sha256
MAX_XML = 16 << 20
SOURCE_MAX = 2048

_FIXED = struct.Struct(
    "<8sII"         # magic, version, flags
    "QIIQQ"         # size, block_size, digest_size, chunk_size, chunk_count
    "QB7x"          # generation, kind
    "16s64s32s32s"  # algorithm, chain_id, created, chain_started
    "64s"           # digest
    "QQQQQQ"        # chunk table, block table, XML: offset, length
    "32s32s"        # sha256 of the chunk table, of the XML
    "H6x")          # source length (the source follows)
_SUM = HEADER_SIZE - 32
_TEXT = re.compile(rb"[\x21-\x7e]*")


class Header(NamedTuple):
    size: int
    algorithm: str
    block_size: int
    digest_size: int
    chunk_size: int
    chunk_count: int
    complete: bool
    generation: int
    kind: str               # "full" or "incremental"
    chain_id: str
    created: str
    chain_started: str      # when the chain's full manifest was created
    source: str
    digest: bytes
    chunk_table: tuple      # (offset, length)
    block_table: tuple
    xml: tuple
    chunk_table_sha256: bytes
    xml_sha256: bytes

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_size // self.block_size

    @property
    def zero_digest(self) -> bytes:
        """The digest of every full block of zeros: such a block needs no
        read."""
        return blkhash.zero_block_digest(self.algorithm, self.block_size)

    def chunk_length(self, i: int) -> int:
        return min(self.chunk_size, self.size - i * self.chunk_size)

    def run(self, i: int) -> tuple:
        """(offset, length) of chunk i's block digests in the manifest."""
        blocks = -(-self.chunk_length(i) // self.block_size)
        start = self.block_table[0] + \
            i * self.blocks_per_chunk * self.digest_size
        return start, blocks * self.digest_size


class _Layout(NamedTuple):
    """The one layout a header's sizes allow."""
    size: int
    block_size: int
    digest_size: int
    chunk_size: int
    chunk_count: int
    xml_length: int

    def header_fields(self) -> tuple:
        covered = min(self.chunk_count * self.chunk_size, self.size)
        chunks = self.chunk_count * self.digest_size
        blocks = -(-covered // self.block_size) * self.digest_size
        return (HEADER_SIZE, chunks, HEADER_SIZE + chunks, blocks,
                HEADER_SIZE + chunks + blocks, self.xml_length)


def layout(size: int, block_size: int, digest_size: int, chunk_size: int,
           chunk_count: int, xml_length: int) -> dict:
    """The parts' (offset, length) as Header fields: chunk_table,
    block_table, xml."""
    f = _Layout(size, block_size, digest_size, chunk_size, chunk_count,
                xml_length).header_fields()
    return dict(chunk_table=f[0:2], block_table=f[2:4], xml=f[4:6])


# Reading.  reader: anything with name and pread(offset, length) -> bytes
# (readers.py: a file, a verify source, bytes).

def _pread(reader, offset: int, length: int) -> bytes:
    data = reader.pread(offset, length)
    if len(data) != length:
        raise ManifestError(f"{reader.name}: the manifest is truncated "
                            f"(short read at offset {offset})")
    return data


def read_header(reader) -> Header:
    """The header, checked: one read of HEADER_SIZE bytes."""
    name = reader.name
    head = reader.pread(0, HEADER_SIZE)
    # The magic first: a short v1 manifest is not a truncated v2.
    if not head.startswith(MAGIC) and not MAGIC.startswith(head):
        raise ManifestError(f"{name}: not an nbdsnap manifest of version 2")
    if len(head) != HEADER_SIZE:
        raise ManifestError(f"{name}: the manifest is truncated "
                            f"(short read at offset 0)")
    if hashlib.sha256(head[:_SUM]).digest() != head[_SUM:]:
        raise ManifestError(f"{name}: the manifest is damaged "
                            f"(its header checksum does not match)")
    f = _FIXED.unpack_from(head)
    (_, version, flags, size, bs, md, chunk_size, count, generation, kind,
     algorithm, chain_id, created, chain_started, digest, *tables) = f[:-3]
    chunk_sha, xml_sha, source_length = f[-3:]

    def bad(what):
        return ManifestError(f"{name}: invalid manifest: {what}")
    if version != VERSION:
        raise ManifestError(f"{name}: manifest version {version} is not "
                            f"supported (this nbd-verify reads 1 and 2)")
    if flags & ~COMPLETE:
        raise bad(f"unknown flags {flags:#x}")
    algorithm = _text(algorithm, name, "algorithm")
    try:
        real_md = blkhash.digest_size(algorithm)
    except UnknownAlgorithm as e:
        raise ManifestError(f"{name}: {e}") from None
    if md != real_md or md > MAX_DIGEST:
        raise bad(f"digest size {md} for {algorithm}")
    if size > MAX_SIZE:
        raise bad(f"size {size}")
    if not MIN_BLOCK <= bs <= MAX_BLOCK:
        raise bad(f"block size {bs}")
    if chunk_size == 0 or chunk_size % bs or chunk_size > MAX_SIZE or \
            chunk_size // bs * md > MAX_RUN:
        raise bad(f"chunk size {chunk_size} for block size {bs}")
    expected = -(-size // chunk_size)
    complete = bool(flags & COMPLETE)
    if count > expected or complete and count != expected:
        raise bad(f"{count} chunks for {size} bytes in chunks of "
                  f"{chunk_size}")
    if count * md > MAX_CHUNK_TABLE:
        raise bad(f"a chunk table of {count * md} bytes")
    if kind not in KINDS:
        raise bad(f"kind {kind}")
    if source_length > SOURCE_MAX:
        raise bad(f"source of {source_length} bytes")
    xml_length = tables[5]
    if xml_length > MAX_XML:
        raise bad(f"domain XML of {xml_length} bytes")
    where = _Layout(size, bs, md, chunk_size, count, xml_length)
    if tuple(tables) != where.header_fields():
        raise bad("its parts are not where its sizes put them")
    start = _FIXED.size
    try:
        source = head[start:start + source_length].decode("utf-8")
    except UnicodeDecodeError:
        raise bad("source is not UTF-8") from None
    return Header(
        size=size, algorithm=algorithm, block_size=bs, digest_size=md,
        chunk_size=chunk_size, chunk_count=count, complete=complete,
        generation=generation, kind=KINDS[kind],
        chain_id=_text(chain_id, name, "chain id"),
        created=_text(created, name, "created"),
        chain_started=_text(chain_started, name, "chain started"),
        source=source,
        digest=digest[:md], chunk_table=tuple(tables[0:2]),
        block_table=tuple(tables[2:4]), xml=tuple(tables[4:6]),
        chunk_table_sha256=chunk_sha, xml_sha256=xml_sha)


def _text(field: bytes, name: str, what: str) -> str:
    text = field.rstrip(b"\0")
    if not _TEXT.fullmatch(text):
        raise ManifestError(f"{name}: invalid manifest: {what} is not "
                            f"printable ASCII")
    return text.decode("ascii")


def read_chunks(reader, header: Header) -> list:
    """The chunk digests (bytes), checked: one read."""
    table = _read_part(reader, header.chunk_table,
                       header.chunk_table_sha256, "chunk table")
    return _split(table, header.digest_size)


def read_block_digests(reader, header: Header, chunks: list,
                       i: int) -> list:
    """Chunk i's block digests (bytes each), checked against chunks[i]:
    one read of the chunk's run."""
    return _split(read_run(reader, header, chunks, i), header.digest_size)


def read_run(reader, header: Header, chunks: list, i: int) -> bytes:
    """Chunk i's block digests, joined, checked against chunks[i]."""
    if not 0 <= i < len(chunks):
        raise ManifestError(f"{reader.name}: the manifest has no chunk {i} "
                            f"({len(chunks)} chunks)")
    offset, length = header.run(i)
    run = _pread(reader, offset, length)
    hasher = blkhash.Hasher(header.algorithm, header.block_size)
    hasher.add_digests(run, header.chunk_length(i))
    if hasher.digest() != chunks[i]:
        raise ManifestError(f"{reader.name}: the manifest is damaged (the "
                            f"block digests of chunk {i} do not match it)")
    return run


class Runs:
    """A manifest's block digests by image range, one checked run held
    at a time (ranges asked for in order read each run once)."""

    def __init__(self, reader, header: Header, chunks: list):
        self.reader, self.header, self.chunks = reader, header, chunks
        self._i, self._run = None, b""

    def run(self, i: int) -> bytes:
        """Chunk i's block digests, checked; b"" past the chunk table."""
        if i >= len(self.chunks):
            return b""
        if i != self._i:
            self._run = read_run(self.reader, self.header, self.chunks, i)
            self._i = i
        return self._run

    def digests(self, offset: int, length: int) -> bytes:
        """The block digests of [offset, offset + length), block-aligned,
        within one chunk or across several, cut at the image's end."""
        h = self.header
        length = min(length, h.size - offset)
        out = []
        while length > 0:
            i, start = divmod(offset, h.chunk_size)
            n = min(length, h.chunk_length(i) - start)
            first = start // h.block_size * h.digest_size
            out.append(self.run(i)[first:first
                                   + -(-n // h.block_size) * h.digest_size])
            offset, length = offset + n, length - n
        return b"".join(out)


def _read_part(reader, part: tuple, sha256: bytes, what: str) -> bytes:
    """The bytes of part (offset, length), checked against sha256."""
    data = _pread(reader, *part)
    if hashlib.sha256(data).digest() != sha256:
        raise ManifestError(f"{reader.name}: the manifest is damaged "
                            f"(its {what} checksum does not match)")
    return data


def _split(data: bytes, size: int) -> list:
    return [data[i:i + size] for i in range(0, len(data), size)]


def read_domain_xml(reader, header: Header) -> str:
    """The frozen domain's inactive definition, checked: one read."""
    data = _read_part(reader, header.xml, header.xml_sha256, "domain XML")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"{reader.name}: invalid manifest: the domain "
                            f"XML is not UTF-8") from None


def read(source) -> manifest_v1.Manifest:
    """What check needs of a manifest of either version, from a source:
    for v2, the header and the chunk table only."""
    if source.size >= len(MAGIC):
        magic = bytearray(len(MAGIC))
        source.read_into(0, magic)
        if magic == MAGIC:
            reader = SourceReader(source)
            header = read_header(reader)
            chunks = read_chunks(reader, header)
            return manifest_v1.Manifest(
                size=header.size, algorithm=header.algorithm,
                block_size=header.block_size, chunk_size=header.chunk_size,
                digest=header.digest.hex(), chunks=[c.hex() for c in chunks],
                complete=header.complete, source=header.source,
                created=header.created)
    return manifest_v1.read(source)
