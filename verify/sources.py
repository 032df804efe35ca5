"""Images to read: files and block devices, behind one reader interface.

A source has a name, a size, read_into(offset, buf) and extents(), which
tells data from holes so a digest or a comparison can skip what reads as
zeros without reading it.  NBD exports will be one more kind of source with
the same interface; until then an NBD URI is refused with a clear error.

Extents of a regular file come from SEEK_DATA/SEEK_HOLE.  A "data" extent
may still read as zeros (the file system decides what it allocates); a hole
always reads as zeros.  Block devices, and file systems without SEEK_DATA,
report one data extent covering everything.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Iterator, NamedTuple

from .errors import SourceError, UnsupportedSource

# Schemes of the NBD URI standard (nbd-server, qemu-nbd, libnbd).
_NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock",
                "nbds+vsock")


class Extent(NamedTuple):
    offset: int
    length: int
    is_data: bool   # False: a hole, reads as zeros without reading


def is_nbd_uri(name: str) -> bool:
    scheme, sep, _ = name.partition("://")
    return bool(sep) and scheme.lower() in _NBD_SCHEMES


def open_source(name: str) -> "FileSource":
    """Open a file or block device read-only; refuse what we cannot read."""
    if is_nbd_uri(name):
        raise UnsupportedSource(
            f"{name}: NBD sources are not supported yet; copy the export to "
            f"a file or block device first")
    return FileSource(name)


class FileSource:
    """A regular file or a block device, opened O_RDONLY."""

    def __init__(self, path: str):
        self.name = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SourceError(f"cannot open {path}: {e.strerror}") from None
        try:
            st = os.fstat(self._fd)
            if stat.S_ISREG(st.st_mode):
                self.size = st.st_size
                self._sparse = True
            elif stat.S_ISBLK(st.st_mode):
                # st_size is 0 for a block device; its end is its size.
                self.size = os.lseek(self._fd, 0, os.SEEK_END)
                self._sparse = False
            else:
                raise SourceError(
                    f"{path}: not a regular file or a block device")
        except OSError as e:
            os.close(self._fd)
            raise SourceError(f"cannot size {path}: {e.strerror}") from None
        except BaseException:
            os.close(self._fd)
            raise

    def read_into(self, offset: int, buf) -> None:
        """Fill buf with the bytes at offset; the range must be in the image."""
        view = memoryview(buf).cast("B")
        if offset < 0 or offset + len(view) > self.size:
            raise ValueError(
                f"read of {len(view)} bytes at {offset} is outside "
                f"{self.name} (size {self.size})")
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self._fd, [view[done:]], offset + done)
            except InterruptedError:
                continue
            except OSError as e:
                raise SourceError(
                    f"cannot read {self.name} at offset {offset + done}: "
                    f"{e.strerror}") from None
            if n == 0:
                # The image shrank under us: a frozen base must not change.
                raise SourceError(
                    f"cannot read {self.name} at offset {offset + done}: "
                    f"unexpected end of file (expected size {self.size})")
            done += n

    def extents(self) -> Iterator[Extent]:
        """Data and holes covering [0, size), in order, never empty."""
        if not self._sparse:
            if self.size:
                yield Extent(0, self.size, True)
            return
        pos = 0
        while pos < self.size:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    # No data after pos: the rest is a hole.
                    data = self.size
                elif e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    # The file system cannot tell: everything is data.
                    yield Extent(pos, self.size - pos, True)
                    return
                else:
                    raise SourceError(
                        f"cannot map {self.name}: {e.strerror}") from None
            data = min(data, self.size)
            if data > pos:
                yield Extent(pos, data - pos, False)
            if data == self.size:
                return
            try:
                hole = os.lseek(self._fd, data, os.SEEK_HOLE)
            except OSError as e:
                raise SourceError(
                    f"cannot map {self.name}: {e.strerror}") from None
            # A hole right at data would loop forever: take the rest as data.
            hole = min(hole, self.size) if hole > data else self.size
            yield Extent(data, hole - data, True)
            pos = hole

    def close(self) -> None:
        if self._fd != -1:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<FileSource {self.name!r} size={self.size}>"
