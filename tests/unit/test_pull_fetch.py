"""The transfer, with fake connections: checked blocks, errors, the limit."""

import pytest

from nbdsnap.pull import fetch
from nbdsnap.verify import blkhash

BS = 64 * 1024


class FakeClient:
    uri = "nbd://fake/e"

    def __init__(self, image, corrupt=(), fail_at=None):
        self.image, self.corrupt, self.fail_at = image, set(corrupt), fail_at
        self.reads = 0

    def read_many(self, pieces):
        for offset, buf in pieces:
            self.read_into(offset, buf)

    def read_into(self, offset, buf):
        self.reads += 1
        if self.fail_at is not None and offset >= self.fail_at:
            raise OSError("connection lost")
        buf[:] = self.image[offset:offset + len(buf)]
        if offset in self.corrupt:
            buf[0] ^= 1


def image(blocks=16):
    return b"".join(bytes([i + 1]) * BS for i in range(blocks))


def work(img, ranges):
    def digests_of(offset, length):
        return blkhash.block_digests(img[offset:offset + length])
    return fetch.batches(ranges, digests_of, limit=3 * BS)


def test_every_range_arrives_checked_in_the_callers_thread():
    img = image()
    ranges = [(0, 2 * BS), (4 * BS, BS), (9 * BS, 3 * BS)]
    got = {}
    fetched = fetch.run([FakeClient(img), FakeClient(img)], work(img, ranges),
                        lambda o, d: got.__setitem__(o, bytes(d)),
                        algorithm="sha256", block_size=BS)
    assert fetched == 6 * BS
    assert got == {o: img[o:o + n] for o, n in ranges}


def test_a_corrupt_block_is_read_again_then_refused():
    img = image()
    client = FakeClient(img, corrupt={4 * BS})
    sunk = []
    with pytest.raises(fetch.Corrupt, match="offset %d" % (4 * BS)):
        fetch.run([client], work(img, [(0, BS), (4 * BS, BS)]),
                  lambda o, d: sunk.append(o), algorithm="sha256",
                  block_size=BS)
    assert 4 * BS not in sunk


def test_a_lost_connection_stops_the_transfer():
    img = image()
    with pytest.raises(OSError, match="connection lost"):
        fetch.run([FakeClient(img, fail_at=8 * BS)] * 2,
                  work(img, [(i * BS, BS) for i in range(16)]),
                  lambda o, d: None, algorithm="sha256", block_size=BS)


def test_the_limiter_spaces_callers_by_rate():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s
    limiter = fetch.Limiter(1000, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.take(500)
    assert slept == [0.5, 0.5]
    assert now[0] == 1.0


def test_a_sink_that_needs_no_order_runs_in_the_workers():
    import threading
    img = image()
    ranges = [(i * BS, BS) for i in range(16)]
    threads, got = set(), {}

    def sink(offset, data):
        threads.add(threading.current_thread().name)
        got[offset] = bytes(data)
    fetched = fetch.run([FakeClient(img), FakeClient(img)], work(img, ranges),
                        sink, algorithm="sha256", block_size=BS,
                        sink_anywhere=True)
    assert fetched == 16 * BS and len(got) == 16
    assert threading.current_thread().name not in threads
