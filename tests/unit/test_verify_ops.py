"""nbdsnap.verify.ops: the parallel digest and compare, in order."""

import random
import threading
import time

import pytest

from nbdsnap.verify import blkhash, ops
from nbdsnap.verify.errors import SizeMismatch, SourceError
from nbdsnap.verify.ops import Piece
from nbdsnap.verify.sources import Extent
from verifykit import random_data, reference

BS = 64 * 1024
MiB = 1024 * 1024


class MemorySource:
    """An image in memory with the extents we say, read from any thread."""

    connections = 1

    def __init__(self, data, extents=None, read_size=4 * MiB, delay=None,
                 fail_at=None):
        self.name = "memory"
        self.data = bytes(data)
        self.size = len(data)
        self._extents = extents
        self.read_size = read_size
        self.delay = delay          # seconds, random up to, per read
        self.fail_at = fail_at
        self.reads = []
        self._lock = threading.Lock()

    def extents(self):
        if self._extents is None:
            return iter([Extent(0, self.size, True)] if self.size else [])
        return iter(self._extents)

    def read_into(self, offset, buf):
        view = memoryview(buf).cast("B")
        assert 0 <= offset and offset + len(view) <= self.size
        if self.fail_at is not None and \
                offset <= self.fail_at < offset + len(view):
            raise SourceError(f"cannot read memory at offset {self.fail_at}")
        if self.delay:
            time.sleep(random.random() * self.delay)
        view[:] = self.data[offset:offset + len(view)]
        with self._lock:
            self.reads.append((offset, len(view)))


def extents_of(size, holes):
    out, pos = [], 0
    for start, end in sorted(holes):
        if start > pos:
            out.append(Extent(pos, start - pos, True))
        out.append(Extent(start, end - start, False))
        pos = end
    if pos < size:
        out.append(Extent(pos, size - pos, True))
    return out


# scan() and checksum(): the same answer however it is cut and scheduled.

@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("read_size", [BS, 3 * BS, 4 * MiB])
def test_checksum_equals_reference(threads, read_size):
    size = 9 * MiB + 12345
    holes = [(MiB + 1000, 3 * MiB + 7), (5 * MiB, 6 * MiB),
             (8 * MiB, size)]
    data = random_data(size, holes)
    src = MemorySource(data, extents_of(size, holes), read_size=read_size,
                       delay=0.002)
    assert ops.checksum(src, threads=threads) == reference(data)
    # The holes were not read, but for the blocks they share with data.
    read = sum(n for _, n in src.reads)
    assert read <= size - (2 * MiB + 1 * MiB + size - 8 * MiB) + 4 * BS


def test_checksum_zero_blocks_in_data():
    data = random_data(3 * MiB, [(BS, 40 * BS)])
    assert ops.checksum(MemorySource(data), threads=2) == reference(data)


@pytest.mark.parametrize("algorithm", ["sha1", "blake2b"])
def test_checksum_algorithm(algorithm):
    data = random_data(MiB + 3)
    assert ops.checksum(MemorySource(data), algorithm, threads=2) \
        == reference(data, algorithm)


def test_checksum_of_nothing():
    assert ops.checksum(MemorySource(b""), threads=2) == reference(b"")


def test_read_error_propagates():
    data = random_data(20 * MiB)
    src = MemorySource(data, read_size=MiB, fail_at=13 * MiB + 5)
    with pytest.raises(SourceError, match="offset 13631493"):
        ops.checksum(src, threads=2)


def test_default_threads():
    assert ops.default_threads() >= 1
    src = MemorySource(b"")
    src.connections = 64
    assert ops.default_threads(src) == 64


# compare().

@pytest.mark.parametrize("threads", [1, 2, 4])
def test_compare_finds_and_places_every_difference(threads):
    size = 10 * MiB + 99
    data = random_data(size)
    copy = bytearray(data)
    for offset in (0, BS - 1, BS, 5 * MiB, size - 1):
        copy[offset] ^= 0x01
    ranges = list(ops.compare(MemorySource(data, delay=0.002),
                              MemorySource(copy, read_size=MiB),
                              threads=threads))
    assert ranges == [(0, 2 * BS), (5 * MiB, BS),
                      (size - size % BS, size % BS)]


def test_compare_equal_and_holes():
    size = 6 * MiB
    holes = [(MiB, 5 * MiB)]
    data = random_data(size, holes)
    a = MemorySource(data, extents_of(size, holes))
    b = MemorySource(data)
    assert list(ops.compare(a, b, threads=2)) == []
    # A hole in both is not read.
    a = MemorySource(data, extents_of(size, holes))
    b = MemorySource(data, extents_of(size, holes))
    assert list(ops.compare(a, b, threads=2)) == []
    assert sum(n for _, n in a.reads) == 2 * MiB


def test_compare_size_mismatch_reads_nothing():
    a, b = MemorySource(bytes(10)), MemorySource(bytes(11))
    with pytest.raises(SizeMismatch):
        list(ops.compare(a, b))
    assert a.reads == b.reads == []


def test_results_come_in_order_whatever_finishes_first():
    pieces = [Piece(i % 3 != 1, i * BS, BS) for i in range(40)]

    def job(offset, length):
        time.sleep(random.random() * 0.003)
        return offset

    out = list(ops._run(iter(pieces), job, 4))
    assert [p for p, _ in out] == pieces
    assert [r for p, r in out] == [p.offset if p.is_data else None
                                   for p in pieces]


def test_block_size_is_a_parameter():
    data = random_data(100000)
    h = blkhash.Hasher(block_size=4096)
    h.update(data)
    src = MemorySource(data, read_size=8192)
    assert ops.checksum(src, block_size=4096, threads=2) == h.hexdigest()
