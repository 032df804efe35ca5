"""COPY as a file: holes punched, fingerprints, QEMU's image locks."""

import fcntl
import os
import struct

import pytest

from nbdsnap.pull import disk

FLOCK = struct.Struct("hhxxxxqqixxxx")


def new_copy(tmp_path, data=b"x" * (1 << 20)):
    path = str(tmp_path / "copy")
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_zero_punches_a_hole(tmp_path):
    path = new_copy(tmp_path)
    with disk.open_disk(path) as d:
        d.zero(256 << 10, 512 << 10)
    with open(path, "rb") as f:
        data = f.read()
    assert data == b"x" * (256 << 10) + bytes(512 << 10) + b"x" * (256 << 10)
    assert os.stat(path).st_blocks * 512 <= 600 << 10


def test_resize_a_file_and_refuse_a_new_file_over_an_old(tmp_path):
    path = new_copy(tmp_path)
    with disk.open_disk(path) as d:
        d.resize(3 << 20)
        assert d.size == 3 << 20
        before = d.fingerprint()
        d.pwrite(b"y", 0)
        d.fsync()
        assert d.fingerprint() != before
    with pytest.raises(disk.DiskError, match="cannot open"):
        disk.open_disk(path, create=True)


def test_kind(tmp_path):
    assert disk.kind(str(tmp_path / "none")) == "missing"
    assert disk.kind(new_copy(tmp_path)) == "file"
    with pytest.raises(disk.DiskError, match="not a regular file"):
        disk.kind(str(tmp_path))


def hold_qemu_lock(path, byte):
    """What a QEMU that uses the image holds: an OFD read lock."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))
    return fd


@pytest.mark.parametrize("byte, perm", [(101, "write"), (203, "resize")])
def test_a_copy_that_qemu_holds_is_refused(tmp_path, byte, perm):
    path = new_copy(tmp_path)
    fd = hold_qemu_lock(path, byte)
    try:
        with disk.open_disk(path) as d:
            with pytest.raises(disk.DiskError, match="in use.*%s" % perm):
                d.lock()
    finally:
        os.close(fd)


def test_our_locks_keep_a_writer_out(tmp_path):
    path = new_copy(tmp_path)
    with disk.open_disk(path) as d:
        d.lock()
        # A QEMU that wants to write tests byte 201 (write not shared).
        fd = os.open(path, os.O_RDONLY)
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, FLOCK.pack(
            fcntl.F_WRLCK, os.SEEK_SET, 201, 1, 0))
        os.close(fd)
        assert FLOCK.unpack(got)[0] == fcntl.F_RDLCK


def test_a_planted_part_file_is_refused(tmp_path):
    target = new_copy(tmp_path)
    part = str(tmp_path / ".c.nbd-pull-part")
    os.symlink(target, part)
    with pytest.raises(disk.DiskError, match="cannot open"):
        disk.open_disk(part, ours=True)
    os.unlink(part)
    with open(part, "wb"):
        pass
    os.chown(part, 65534, 65534)
    with pytest.raises(disk.DiskError, match="not a file of ours"):
        disk.open_disk(part, ours=True)
