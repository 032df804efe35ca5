"""Images to read: files, block devices and NBD exports, behind one interface.

A source has a name, a size, read_into(offset, buf), extents(), which tells
data from holes so a digest or a comparison can skip what reads as zeros
without reading it, and close().  Two hints tell ops how to read it fast:
``read_size``, the bytes one worker reads at a time, and ``connections``,
how many reads can be served at once.  read_into() may be called from
several threads at once.

Extents of a regular file come from SEEK_DATA/SEEK_HOLE.  A "data" extent
may still read as zeros (the file system decides what it allocates); a hole
always reads as zeros.  Block devices, and file systems without SEEK_DATA,
report one data extent covering everything.

An NBD export (nbd://host[:port]/export, nbd+unix:///export?socket=PATH,
and their TLS forms nbds:// and nbds+unix://, see nbd.py) is
read by our own client (nbd.py) over one connection, or several when the
server allows multi-connection; its extents come from the base:allocation
block status when the server offers it (a range the server reports as
reading as zeros is a hole), else one data extent.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import queue
import stat
from typing import Iterator, NamedTuple, Optional, Union

from . import nbd, nbdproto
from .errors import SourceError

# Schemes of the NBD URI standard (nbd-server, qemu-nbd, libnbd).
_NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock",
                "nbds+vsock")

# Connections to an NBD export that allows several (nbdcopy's default too).
DEFAULT_CONNECTIONS = 4
# A file is read in pieces small enough to stay in the CPU cache until
# they are hashed.  Measured here, 2 GiB from the page cache: 64 KiB reads
# take 0.3 s, 128 KiB and more 0.9 to 1 s.
FILE_READ_SIZE = 64 * 1024
# Block status is asked for at most this much at a time.
_BLOCK_STATUS_SPAN = 1 << 30


class Extent(NamedTuple):
    offset: int
    length: int
    is_data: bool   # False: a hole, reads as zeros without reading


def is_nbd_uri(name: str) -> bool:
    scheme, sep, _ = name.partition("://")
    return bool(sep) and scheme.lower() in _NBD_SCHEMES


def open_source(name: str, connections: Optional[int] = None
                ) -> Union["FileSource", "NbdSource"]:
    """Open a file, a block device or an NBD export, read-only.

    connections: at most this many NBD connections (default
    DEFAULT_CONNECTIONS); ignored for files.
    """
    if is_nbd_uri(name):
        return NbdSource(name, connections or DEFAULT_CONNECTIONS)
    return FileSource(name)


class FileSource:
    """A regular file or a block device, opened O_RDONLY.

    Read with pread(2), never mapped: an I/O error (a bad sector, a
    shrinking LV, a file truncated under us) in a mapping kills the process
    with SIGBUS, which Python cannot turn back into an error; a read returns
    it, or a short read, as one SourceError line.  The copy costs little:
    a digest of 2 GiB in the page cache took 9 to 14 % more CPU time than
    hashing the mapped pages (2.10 s against 1.91 s on one thread).
    """

    read_size = FILE_READ_SIZE
    connections = 1

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

    def will_need(self, offset: int, length: int) -> None:
        """Tell the kernel these bytes are read soon (a hint, never an
        error): scattered reads then overlap instead of waiting one by
        one, as an incremental manifest's do."""
        try:
            os.posix_fadvise(self._fd, offset, length,
                             os.POSIX_FADV_WILLNEED)
        except OSError:
            pass

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
                    # No data after pos: the rest is a hole, unless the
                    # file ended before it (it shrank while we read it).
                    self._check_size()
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

    def _check_size(self) -> None:
        try:
            size = os.fstat(self._fd).st_size
        except OSError as e:
            raise SourceError(
                f"cannot size {self.name}: {e.strerror}") from None
        if size < self.size:
            raise SourceError(
                f"{self.name} shrank to {size} bytes while being read "
                f"(expected size {self.size})")

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


class NbdSource:
    """An NBD export, over one connection or several (multi-connection)."""

    def __init__(self, uri: str, connections: int = DEFAULT_CONNECTIONS,
                 timeout: float = nbd.DEFAULT_TIMEOUT):
        self.name = uri
        first = nbd.Client(uri, timeout)
        clients = [first]
        try:
            if first.can_multi_conn and connections > 1:
                clients += connect_more(uri, timeout, connections - 1)
            for c in clients[1:]:
                if c.size != first.size:
                    raise nbd.NbdError(
                        f"{uri}: the export changed size between "
                        f"connections ({first.size}, then {c.size} bytes)")
        except BaseException:
            for c in clients:
                c.close()
            raise
        self.size = first.size
        self.connections = len(clients)
        # A worker reads as much as one connection keeps in flight.
        self.read_size = first.request_size * nbd.DEPTH
        self._first = first
        # Each used by one thread at a time: read_into() takes an idle
        # one; nbd-pull's transfer gives each to a worker of its own.
        self.clients = clients
        self._idle = queue.SimpleQueue()
        for c in clients:
            self._idle.put(c)

    @property
    def has_block_status(self) -> bool:
        return self._first.has_block_status

    def read_into(self, offset: int, buf) -> None:
        """Fill buf with the bytes at offset, on the first idle connection."""
        client = self._idle.get()
        try:
            client.read_into(offset, buf)
        finally:
            self._idle.put(client)

    def extents(self) -> Iterator[Extent]:
        """Data and zeros covering [0, size), merged, in order."""
        if not self.has_block_status:
            if self.size:
                yield Extent(0, self.size, True)
            return
        run = None      # [offset, length, is_data], grown while alike
        pos = 0
        while pos < self.size:
            client = self._idle.get()
            try:
                status = client.block_status(
                    pos, min(self.size - pos, _BLOCK_STATUS_SPAN))
            finally:
                self._idle.put(client)
            for length, state in status:
                # Only "reads as zeros" lets us skip the read; a hole
                # without it has undefined contents, read it.
                is_data = not state & nbdproto.STATE_ZERO
                if run and run[2] == is_data:
                    run[1] += length
                else:
                    if run:
                        yield Extent(*run)
                    run = [pos, length, is_data]
                pos += length
        if run:
            yield Extent(*run)

    def close(self) -> None:
        for c in self.clients:
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"<NbdSource {self.name!r} size={self.size} "
                f"connections={self.connections}>")


def connect_more(uri: str, timeout: float, count: int) -> list:
    """count more connections, at once: a server hook may run per connection."""
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(nbd.Client, uri, timeout)
                   for _ in range(count)]
    clients, error = [], None
    for f in futures:
        try:
            clients.append(f.result())
        except SourceError as e:       # NbdError, TlsError
            error = error or e
    if error:
        for c in clients:
            c.close()
        raise error
    return clients
