"""pread() over the things a v2 manifest is read from: a file, a verify
source (a file or an NBD export, read_into()), bytes in memory.

manifest2's read functions take any object with name and pread(offset,
length) -> bytes; a short result means the manifest ends there (they say
"truncated").  An error is one ManifestError line.
"""

from __future__ import annotations

import os

from .errors import ManifestError


class SourceReader:
    """pread() over a verify source (a file, an NBD export): read_into()."""

    def __init__(self, source):
        self.source = source
        self.name = source.name

    def pread(self, offset: int, length: int) -> bytes:
        if offset + length > self.source.size:
            raise ManifestError(
                f"{self.name}: the manifest is truncated ({self.source.size} "
                f"bytes, a part ends at {offset + length})")
        buf = bytearray(length)
        self.source.read_into(offset, buf)
        return bytes(buf)


class BytesReader:
    """pread() over a manifest in memory (what build() returned)."""

    def __init__(self, data: bytes, name: str = "manifest"):
        self.data = data
        self.name = name

    def pread(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]


class FileReader:
    """pread() over a manifest file: what an incremental manifest reads its
    previous one with.  Closes with close() or as a context manager."""

    def __init__(self, path: str):
        self.name = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ManifestError(
                f"cannot open manifest {path}: {e.strerror}") from None

    def pread(self, offset: int, length: int) -> bytes:
        """Up to length bytes at offset: fewer only at the end of the file
        (_pread() calls that truncated)."""
        parts = []
        while length:
            try:
                data = os.pread(self._fd, length, offset)
            except InterruptedError:
                continue
            except OSError as e:
                raise ManifestError(f"cannot read manifest {self.name}: "
                                    f"{e.strerror}") from None
            if not data:
                break
            parts.append(data)
            offset += len(data)
            length -= len(data)
        return b"".join(parts)

    def close(self) -> None:
        if self._fd != -1:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
