"""COPY: the file or block device a pull writes, and how we write it.

Three things beyond pwrite:

- Zeros: a block that became zeros is punched out of a file
  (FALLOC_FL_PUNCH_HOLE, so a copy stays as sparse as its source) and
  zeroed on a block device (BLKZEROOUT, which thin devices turn into
  discards); written as zeros where neither works.
- A fingerprint (device, inode, size, mtime, ctime) taken after every
  complete pull: the next run trusts COPY's record only while it is
  unchanged, so a COPY written behind the tool's back (a standby booted
  from it, a dd) is read again, not trusted.
- QEMU's image locks.  QEMU takes OFD read locks on bytes 100 + i of an
  image for each permission i it uses and 200 + i for each it does not
  share (block/file-posix.c).  A pull takes all of them while it writes,
  so that a standby started from COPY meanwhile fails ("Failed to get
  write lock") instead of booting a half-applied image, and refuses to
  write a COPY that a running QEMU holds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct

# QEMU's permission bits: consistent read, write, write unchanged, resize,
# and graph-mod (QEMU before 7.1).
_PERMS = ("consistent read", "write", "write unchanged", "resize",
          "graph-mod")
_PERM_BASE, _SHARED_BASE = 100, 200
_FLOCK = struct.Struct("hhxxxxqqixxxx")     # struct flock, x86-64 and arm64
BLKZEROOUT = 0x127f
_PUNCH = 0x02 | 0x01            # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_ZEROS = bytes(1 << 20)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                            ctypes.c_int64]


class DiskError(Exception):
    """COPY cannot be used: one line, said to the user as it is."""


class InUse(DiskError):
    """Another process (a QEMU) holds COPY's image locks: try later."""


class Disk:
    """COPY, open read-write."""

    def __init__(self, path: str, fd: int):
        self.path = path
        self.fd = fd
        st = os.fstat(fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        self._can_punch = not self.is_block

    @property
    def size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)

    def pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def zero(self, offset: int, length: int) -> None:
        """Make [offset, offset + length) read as zeros."""
        if self.is_block:
            try:
                fcntl.ioctl(self.fd, BLKZEROOUT,
                            struct.pack("QQ", offset, length))
                return
            except OSError:
                pass
        elif self._can_punch:
            if _libc.fallocate(self.fd, _PUNCH, offset, length) == 0:
                return
            if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS):
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e), self.path)
            self._can_punch = False
        end = offset + length
        while offset < end:
            n = min(len(_ZEROS), end - offset)
            self.pwrite(memoryview(_ZEROS)[:n], offset)
            offset += n

    def resize(self, size: int) -> None:
        """Make COPY size bytes: a file is cut or grown (the new part a
        hole); a block device must be that size already."""
        if self.is_block:
            if self.size != size:
                raise DiskError(
                    f"{self.path}: the block device holds {self.size} "
                    f"bytes, the source {size}: grow or replace it")
        elif self.size != size:
            os.ftruncate(self.fd, size)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def fingerprint(self) -> dict:
        """What changes when anything writes COPY (see the docstring)."""
        st = os.fstat(self.fd)
        return {"dev": st.st_dev, "ino": st.st_ino, "rdev": st.st_rdev,
                "size": self.size, "mtime_ns": st.st_mtime_ns,
                "ctime_ns": st.st_ctime_ns}

    def lock(self) -> None:
        """Take QEMU's image locks, all of them; DiskError if a QEMU (or
        another tool that speaks them) holds COPY."""
        for base in (_PERM_BASE, _SHARED_BASE):
            for i, perm in enumerate(_PERMS):
                if _held_by_other(self.fd, base + i):
                    raise InUse(
                        f"{self.path} is in use: another process holds "
                        f"its {perm} image lock (a running QEMU, e.g. a "
                        f"standby started from it?)")
        for base in (_PERM_BASE, _SHARED_BASE):
            for i in range(len(_PERMS)):
                _ofd(self.fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, base + i)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)       # the OFD locks go with it
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ofd(fd: int, cmd: int, kind: int, byte: int) -> bytes:
    return fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))


def _held_by_other(fd: int, byte: int) -> bool:
    """Would a write lock on byte conflict with another open file's?"""
    got = _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte)
    return _FLOCK.unpack(got)[0] != fcntl.F_UNLCK


def kind(path: str) -> str:
    """"missing", "file" or "block" for COPY's path (symlinks followed:
    /dev/VG/LV is one); DiskError for anything else."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        raise DiskError(f"{path}: {e.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISBLK(st.st_mode):
        return "block"
    raise DiskError(f"{path}: not a regular file or a block device")


def open_disk(path: str, create: bool = False, ours: bool = False) -> Disk:
    """COPY, read-write.  create: a new file (never over one, never
    through a symlink).  ours: a file of our own making (the hidden part
    file of a first pull): no symlink, a regular file, our user's, so
    that nothing planted beside COPY redirects root's writes."""
    flags = os.O_RDWR | os.O_CLOEXEC
    if create:
        flags |= os.O_CREAT | os.O_EXCL
    if create or ours:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        raise DiskError(f"cannot open {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if ours and (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()):
        os.close(fd)
        raise DiskError(f"{path}: not a file of ours; remove it")
    return Disk(path, fd)
