"""The stage: what a pull fetched, kept aside until all of it is there.

COPY is a disk someone may boot in an emergency, so it does not change
while blocks cross the network.  They go to a journal in COPY's state
folder instead, one record after the other; a COMMIT record, written and
fsynced only when every block of the pull is in and checked, turns the
journal into something to apply::

    journal  | DATA off len | len bytes | ZERO off len | DATA ... | COMMIT |
               <- 32-byte header ->                      size, digest

    header   magic "NBDPULLJ", kind, crc32, offset, length   (little endian)
    DATA     length bytes of the image at offset follow
    ZERO     the image is zeros at [offset, offset + length); nothing follows
    COMMIT   offset: the image size; length bytes follow: the image digest

The crc32 covers a header (and COMMIT's digest), so a torn header ends
the journal where it tore; a DATA record's bytes are checked against the
manifest's block digests whenever they are read back (apply, resume),
never trusted.  Applying writes every record into COPY in order: doing it
twice gives the same COPY, so a run killed while applying is finished by
the next one (apply.py).
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import NamedTuple, Optional

MAGIC = b"NBDPULLJ"
DATA, ZERO, COMMIT = 1, 2, 3
_HEAD = struct.Struct("<8sIIQQ")    # magic, kind, crc32, offset, length
HEAD = _HEAD.size
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Record(NamedTuple):
    kind: int
    offset: int
    length: int
    pos: int            # where a DATA record's bytes start in the journal


class Contents(NamedTuple):
    records: list       # DATA and ZERO, in order
    size: Optional[int]     # COMMIT's: None while not committed
    digest: Optional[bytes]
    end: int            # bytes of sound records (a torn tail after)


def _crc(kind: int, offset: int, length: int, payload: bytes = b"") -> int:
    return zlib.crc32(_HEAD.pack(MAGIC, kind, 0, offset, length) + payload)


def _header(kind: int, offset: int, length: int,
            payload: bytes = b"") -> bytes:
    return _HEAD.pack(MAGIC, kind, _crc(kind, offset, length, payload),
                      offset, length)


class Writer:
    """A new journal at path (never over an existing file or symlink)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, _FLAGS, 0o600)
        self.bytes = 0

    def _write(self, *parts) -> None:
        for part in parts:
            view = memoryview(part).cast("B")
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
                self.bytes += n

    def data(self, offset: int, buf) -> None:
        self._write(_header(DATA, offset, len(buf)), buf)

    def zero(self, offset: int, length: int) -> None:
        self._write(_header(ZERO, offset, length))

    def commit(self, size: int, digest: bytes) -> None:
        """Seal the journal: everything before is on disk, then the seal."""
        os.fsync(self.fd)
        self._write(_header(COMMIT, size, len(digest), digest), digest)
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read(fd: int) -> Contents:
    """The sound records of the journal open at fd, up to the first torn
    or foreign header, and its COMMIT if it has one."""
    total = os.fstat(fd).st_size
    records, pos = [], 0
    while pos + HEAD <= total:
        head = os.pread(fd, HEAD, pos)
        magic, kind, crc, offset, length = _HEAD.unpack(head)
        if magic != MAGIC or kind not in (DATA, ZERO, COMMIT):
            break
        if kind == COMMIT:
            digest = os.pread(fd, min(length, 64), pos + HEAD)
            if length > 64 or len(digest) != length or \
                    crc != _crc(kind, offset, length, digest):
                break
            return Contents(records, offset, digest, pos + HEAD + length)
        if crc != _crc(kind, offset, length):
            break
        body = length if kind == DATA else 0
        if pos + HEAD + body > total:
            break
        records.append(Record(kind, offset, length, pos + HEAD))
        pos += HEAD + body
    return Contents(records, None, None, pos)


def open_existing(path: str) -> Optional[int]:
    """A descriptor of the journal at path, or None when there is none."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
