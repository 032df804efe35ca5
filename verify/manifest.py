"""The manifest: an image's blkhash digest and its chunk digests, in a file.

``nbd-verify digest --manifest FILE SOURCE`` writes one; ``nbd-verify check
FILE COPY`` checks a copy against it without reading the source again, and
names the chunks that differ.  The format, version 1, is one JSON object::

    {
      "format": "nbdsnap-manifest",
      "version": 1,
      "complete": true,
      "source": "/var/lib/libvirt/images/vm.raw",
      "created": "2026-01-31T02:00:00Z",
      "size": 10737418240,
      "algorithm": "sha256",
      "block_size": 65536,
      "chunk_size": 16777216,
      "digest": "<hex>",
      "chunks": ["<hex>", "<hex>", ...],
      "checksum": "<hex>"
    }

- digest is the blkhash digest of the image, the one ``nbd-verify digest``
  prints.
- chunks[i] is the blkhash digest of bytes [i * chunk_size, (i + 1) *
  chunk_size) of the image, as if that range were an image of its own (the
  last chunk is shorter when size is not a multiple of chunk_size).  Each
  can be checked on its own with any blkhash tool, e.g. blksum on a ``dd``
  of that range; all of them come from the same block digests as digest, so
  one pass computes both.  chunk_size is a multiple of block_size.
- complete is false while a manifest is still being written (the
  freeze-time digest writes a first version early); check refuses those.
- source and created are for people; check ignores them.
- checksum is the sha256 of the canonical JSON of every other member
  (sorted keys, separators "," and ":", ASCII), so that a manifest damaged
  after it was written is told from a copy that differs.

Readers refuse a file whose format is not "nbdsnap-manifest", and a version
they do not know; a later version that only adds members keeps its number.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Iterator, NamedTuple, Optional

from . import blkhash
from .files import write_atomic
from .errors import ManifestError

FORMAT = "nbdsnap-manifest"
VERSION = 1
DEFAULT_CHUNK_SIZE = 16 * 1024 * 1024
# A manifest larger than this is not one of ours (1 TiB in 16 MiB chunks
# is about 4.5 MB).
MAX_SIZE = 256 * 1024 * 1024


class Manifest(NamedTuple):
    size: int
    algorithm: str
    block_size: int
    chunk_size: int
    digest: str
    chunks: list
    complete: bool = True
    source: str = ""
    created: str = ""

    def to_dict(self) -> dict:
        data = {
            "format": FORMAT,
            "version": VERSION,
            "complete": self.complete,
            "source": self.source,
            "created": self.created,
            "size": self.size,
            "algorithm": self.algorithm,
            "block_size": self.block_size,
            "chunk_size": self.chunk_size,
            "digest": self.digest,
            "chunks": list(self.chunks),
        }
        data["checksum"] = _checksum(data)
        return data


class ChunkHasher:
    """The blkhash digest of every chunk_size piece of an image.

    Takes the image the way blkhash.Hasher does, as block digests
    (add_digests) and known zeros (zero), in order, and starts a new
    chunk every chunk_size bytes.
    """

    def __init__(self, algorithm: str = blkhash.DEFAULT_ALGORITHM,
                 block_size: int = blkhash.BLOCK_SIZE,
                 chunk_size: int = DEFAULT_CHUNK_SIZE):
        if chunk_size <= 0 or chunk_size % block_size:
            raise ValueError(
                f"chunk size {chunk_size} is not a positive multiple of the "
                f"block size {block_size}")
        self.algorithm = algorithm
        self.block_size = block_size
        self.chunk_size = chunk_size
        self._md_size = blkhash.digest_size(algorithm)
        self._done = []
        self._current = None

    def _chunk(self) -> blkhash.Hasher:
        if self._current is None:
            self._current = blkhash.Hasher(self.algorithm, self.block_size)
        return self._current

    def _room(self) -> int:
        """Bytes the current chunk still takes."""
        current = self._current.length if self._current else 0
        return self.chunk_size - current

    def _close_if_full(self) -> None:
        if self._current is not None and self._room() == 0:
            self._done.append(self._current.hexdigest())
            self._current = None

    def add_digests(self, digests: bytes, length: int) -> None:
        bs = self.block_size
        view = memoryview(digests)
        while length > 0:
            n = min(length, self._room())
            count = -(-n // bs)
            self._chunk().add_digests(view[:count * self._md_size], n)
            view = view[count * self._md_size:]
            length -= n
            self._close_if_full()

    def zero(self, length: int) -> None:
        while length > 0:
            n = min(length, self._room())
            self._chunk().zero(n)
            length -= n
            self._close_if_full()

    def hexdigests(self) -> list:
        """The chunk digests so far, a short last chunk included."""
        last = [self._current.hexdigest()] if self._current else []
        return self._done + last


def differing_ranges(expected: list, actual: list, chunk_size: int,
                     size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the chunks that differ, adjacent ones merged."""
    run = None
    for i, (a, b) in enumerate(zip(expected, actual)):
        if a == b:
            continue
        start = i * chunk_size
        end = min(start + chunk_size, size)
        if run and run[1] == start:
            run[1] = end
        else:
            if run:
                yield run[0], run[1] - run[0]
            run = [start, end]
    if run:
        yield run[0], run[1] - run[0]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def _checksum(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def dumps(manifest: Manifest) -> str:
    return json.dumps(manifest.to_dict(), indent=1) + "\n"


def write(path: str, manifest: Manifest) -> None:
    """Write the manifest atomically: a reader sees the old file or the new."""
    try:
        write_atomic(path, dumps(manifest).encode("ascii"), mode=0o644)
    except OSError as e:
        raise ManifestError(
            f"cannot write manifest {path}: {e.strerror}") from None


def loads(text, name: str) -> Manifest:
    """Parse and validate; every problem is one ManifestError line."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ManifestError(f"{name}: not a manifest (not text)") from None
    # A manifest served over NBD may come padded to a sector with zeros.
    text = text.rstrip("\0")
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ManifestError(
            f"{name}: not a manifest or damaged (invalid JSON: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{name}: not an nbdsnap manifest")
    version = data.get("version")
    if version != VERSION:
        raise ManifestError(
            f"{name}: manifest version {version!r} is not supported "
            f"(this nbd-verify reads version {VERSION})")
    if data.get("checksum") != _checksum(data):
        raise ManifestError(f"{name}: the manifest is damaged "
                            f"(its checksum does not match)")
    try:
        manifest = Manifest(
            size=_integer(data, "size", 0),
            algorithm=_string(data, "algorithm"),
            block_size=_integer(data, "block_size", 1),
            chunk_size=_integer(data, "chunk_size", 1),
            digest=_string(data, "digest"),
            chunks=data["chunks"],
            complete=data["complete"],
            source=data.get("source", ""),
            created=data.get("created", ""),
        )
    except KeyError as e:
        raise ManifestError(f"{name}: the manifest has no {e}") from None
    except ManifestError as e:
        raise ManifestError(f"{name}: invalid manifest: {e}") from None
    _validate(manifest, name)
    return manifest


def _integer(data: dict, key: str, minimum: int) -> int:
    value = data[key]
    if type(value) is not int or value < minimum:
        raise ManifestError(f"invalid {key}: {value!r}")
    return value


def _string(data: dict, key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value:
        raise ManifestError(f"invalid {key}: {value!r}")
    return value


def _validate(m: Manifest, name: str) -> None:
    def bad(what):
        return ManifestError(f"{name}: invalid manifest: {what}")
    if m.complete is not True and m.complete is not False:
        raise bad(f"complete is {m.complete!r}")
    if m.chunk_size % m.block_size:
        raise bad(f"chunk_size {m.chunk_size} is not a multiple of "
                  f"block_size {m.block_size}")
    if not isinstance(m.chunks, list):
        raise bad("chunks is not a list")
    expected = -(-m.size // m.chunk_size)
    # A manifest still being written may have only the first chunks.
    if len(m.chunks) > expected or m.complete and len(m.chunks) != expected:
        raise bad(f"{len(m.chunks)} chunks for {m.size} bytes in chunks of "
                  f"{m.chunk_size}")
    width = None
    for value in [m.digest] + m.chunks:
        if not isinstance(value, str) or not _is_hex(value):
            raise bad(f"digest {value!r} is not hexadecimal")
        if width is None:
            width = len(value)
        elif len(value) != width:
            raise bad("digests of different lengths")


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return len(text) % 2 == 0 and text == text.lower()


def read(source, name: Optional[str] = None) -> Manifest:
    """Read a manifest from an open source (a file, or an NBD export)."""
    name = name or source.name
    if source.size > MAX_SIZE:
        raise ManifestError(
            f"{name}: not a manifest ({source.size} bytes is too large)")
    buf = bytearray(source.size)
    source.read_into(0, buf)
    return loads(bytes(buf), name)
