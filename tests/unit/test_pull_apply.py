"""Applying a sealed journal: all of it checked before COPY changes."""

import os
from typing import NamedTuple

import pytest

from nbdsnap.pull import apply, disk, journal, local

BLOCK = 64 << 10
SIZE = 4 * BLOCK


class Like(NamedTuple):
    algorithm: str = "sha256"
    block_size: int = BLOCK
    chunk_size: int = 1 << 20


class Folder:
    """What apply needs of a state folder, in a temporary one."""

    def __init__(self, path):
        self.path = str(path)
        self.meta_written = None

    def __getattr__(self, name):
        return os.path.join(self.path, name)

    def read_meta(self):
        return {"source": "nbd://h/e"}

    def write_meta(self, meta):
        self.meta_written = meta

    def forget(self, *names):
        for name in names:
            try:
                os.unlink(getattr(self, name))
            except FileNotFoundError:
                pass


@pytest.fixture
def setup(tmp_path):
    """COPY of 4 blocks of "o", a target whose blocks 1 and 2 are "n" and
    3 zeros, and a sealed journal of those three blocks whose block 2
    went bad on disk."""
    copy = str(tmp_path / "copy")
    with open(copy, "wb") as f:
        f.write(b"o" * SIZE)
    image = str(tmp_path / "image")
    with open(image, "wb") as f:
        f.write(b"o" * BLOCK + b"n" * 2 * BLOCK + bytes(BLOCK))
    folder = Folder(tmp_path / "state")
    os.mkdir(folder.path)
    header = local.scan(image, folder.target, Like(), 1)
    with journal.Writer(folder.journal) as w:
        w.data(BLOCK, b"n" * BLOCK)
        w.data(2 * BLOCK, b"n" * (BLOCK - 1) + b"X")
        w.zero(3 * BLOCK, BLOCK)
        w.commit(SIZE, header.digest)
    return copy, folder


def test_a_bad_block_leaves_copy_as_it_was(setup):
    copy, folder = setup
    fd = journal.open_existing(folder.journal)
    target = local.Local(folder.target)
    try:
        with disk.open_disk(copy) as d, pytest.raises(apply.JournalError):
            apply.replay(fd, journal.read(fd), d, target)
    finally:
        target.close()
        os.close(fd)
    with open(copy, "rb") as f:
        assert f.read() == b"o" * SIZE


def test_recover_discards_a_journal_that_cannot_be_applied(setup):
    # Else every later run fails on it, and COPY stays what it is for
    # ever; discarded, the pull reads COPY again and repairs it.
    copy, folder = setup
    said = apply.recover(folder, copy)
    assert "discarded" in said and "read again" in said
    assert not os.path.exists(folder.journal)
    assert apply.recover(folder, copy) is None
