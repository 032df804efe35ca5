"""The stage: records written, read back, torn tails, the seal."""

import os

from nbdsnap.pull import journal


def written(path, *steps):
    with journal.Writer(path) as w:
        for step in steps:
            step(w)
    fd = os.open(path, os.O_RDONLY)
    try:
        return journal.read(fd), os.path.getsize(path)
    finally:
        os.close(fd)


def test_records_come_back_in_order_and_the_seal_with_them(tmp_path):
    path = str(tmp_path / "j")
    contents, size = written(
        path, lambda w: w.zero(0, 4096), lambda w: w.data(65536, b"abc"),
        lambda w: w.commit(1 << 20, b"D" * 32))
    assert [(r.kind, r.offset, r.length) for r in contents.records] == [
        (journal.ZERO, 0, 4096), (journal.DATA, 65536, 3)]
    assert (contents.size, contents.digest) == (1 << 20, b"D" * 32)
    assert contents.end == size
    fd = os.open(path, os.O_RDONLY)
    assert os.pread(fd, 3, contents.records[1].pos) == b"abc"
    os.close(fd)


def test_an_unsealed_journal_is_not_committed(tmp_path):
    contents, _ = written(str(tmp_path / "j"),
                          lambda w: w.data(0, b"x" * 100))
    assert contents.digest is None and len(contents.records) == 1


def test_a_torn_tail_ends_the_journal_where_it_tore(tmp_path):
    path = str(tmp_path / "j")
    _, size = written(path, lambda w: w.data(0, b"x" * 100),
                      lambda w: w.data(4096, b"y" * 100),
                      lambda w: w.commit(8192, b"D" * 32))
    for cut in (size - 1, size - 40, 132 + 50, 132 + 10):
        with open(path, "r+b") as f:
            f.truncate(cut)
        fd = os.open(path, os.O_RDONLY)
        contents = journal.read(fd)
        os.close(fd)
        assert contents.digest is None
        assert len(contents.records) == (1 if cut < 264 else 2)


def test_a_damaged_header_ends_the_journal(tmp_path):
    path = str(tmp_path / "j")
    written(path, lambda w: w.data(0, b"x" * 100),
            lambda w: w.data(4096, b"y" * 100),
            lambda w: w.commit(8192, b"D" * 32))
    with open(path, "r+b") as f:
        f.seek(132 + 20)        # the second record's offset field
        f.write(b"\xff")
    fd = os.open(path, os.O_RDONLY)
    contents = journal.read(fd)
    os.close(fd)
    assert len(contents.records) == 1 and contents.digest is None


def test_a_new_journal_never_replaces_a_file_or_follows_a_link(tmp_path):
    path = tmp_path / "j"
    os.symlink(tmp_path / "elsewhere", path)
    try:
        journal.Writer(str(path))
    except FileExistsError:
        pass
    else:
        raise AssertionError("wrote through a symlink")
    assert not (tmp_path / "elsewhere").exists()
    assert journal.open_existing(str(tmp_path / "none")) is None
