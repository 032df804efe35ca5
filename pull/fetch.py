"""The transfer: blocks read from the export over every connection at once,
each checked against the manifest as it arrives, then written: by the
worker into COPY (no order needed), or in the caller's thread into the
journal (one writer).

    batches (ranges + their expected block digests)
        │  feeder thread, from the plan, never far ahead
        ▼
    worker per connection:  read_many (pipelined) ─► digests ─► equal?
        │                                             no: read again once,
        ▼                                             then Corrupt
    sink(offset, data):  the worker (COPY), or the caller's thread
                         (the journal)

A block that does not match its digest twice is never handed on: the
pull stops with Corrupt and nothing of it reaches COPY.  --bwlimit is a
token bucket shared by the workers, counted in bytes of block data.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import NamedTuple

from nbdsnap.verify import blkhash

# Bytes of blocks one worker asks for at once (one pipeline of reads).
BATCH = 8 << 20


class Corrupt(Exception):
    """A block from the export does not match the manifest."""


class Batch(NamedTuple):
    ranges: list        # [(offset, length)]
    digests: bytes      # their expected block digests, in order


class Limiter:
    """At most rate bytes per second, on average, for every caller."""

    def __init__(self, rate: float, clock=time.monotonic, sleep=time.sleep):
        self.rate, self.clock, self.sleep = rate, clock, sleep
        self._lock = threading.Lock()
        self._next = clock()

    def take(self, n: int) -> None:
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + n / self.rate
        if start > now:
            self.sleep(start - now)


def batches(ranges, digests_of, limit: int = BATCH):
    """Batches of ranges up to limit bytes, each with its expected block
    digests (digests_of(offset, length))."""
    group, size = [], 0
    for offset, length in ranges:
        if group and size + length > limit:
            yield _batch(group, digests_of)
            group, size = [], 0
        group.append((offset, length))
        size += length
    if group:
        yield _batch(group, digests_of)


def _batch(group, digests_of) -> Batch:
    return Batch(group, b"".join(digests_of(o, n) for o, n in group))


def run(clients, work, sink, *, algorithm: str, block_size: int,
        limiter=None, progress=None, sink_anywhere: bool = False) -> int:
    """Fetch every batch of work with clients (one thread each), check
    it, and call sink(offset, data) for each range in this thread, or,
    sink_anywhere, in the worker's (pwrite into COPY needs no order; a
    journal does); progress(bytes) after each batch.  Returns the bytes
    fetched."""
    md = blkhash.digest_size(algorithm)
    todo = queue.Queue(maxsize=2 * len(clients))
    # Two batches per connection may wait for the sink: a slow write
    # (measured: the page cache at 200 MiB/s) must not stall the reads.
    done = queue.Queue(maxsize=2 * len(clients))
    stop = threading.Event()

    def feed():
        try:
            for batch in work:
                while not stop.is_set():
                    try:
                        todo.put(batch, timeout=0.2)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
        except BaseException as e:      # reading the target failed
            done.put(("error", e))
        finally:
            for _ in clients:
                todo.put(None)

    def worker(client):
        try:
            while not stop.is_set():
                try:
                    # Not a plain get(): a stopped run drains the queue,
                    # sentinels included.
                    batch = todo.get(timeout=0.2)
                except queue.Empty:
                    continue
                if batch is None:
                    break
                if limiter:
                    limiter.take(sum(n for _, n in batch.ranges))
                    if stop.is_set():       # stopped while it waited
                        break
                items = _read_checked(client, batch, algorithm, block_size,
                                      md)
                if sink_anywhere:
                    for offset, data in items:
                        sink(offset, data)
                    done.put(("sunk", sum(len(d) for _, d in items)))
                else:
                    done.put(("data", items))
        except BaseException as e:
            done.put(("error", e))
        finally:
            done.put(("end", None))

    threads = [threading.Thread(target=feed, daemon=True)]
    threads += [threading.Thread(target=worker, args=(c,), daemon=True)
                for c in clients]
    for t in threads:
        t.start()
    fetched, ended, error = 0, 0, None
    try:
        while ended < len(clients):
            what, value = done.get()
            if what == "end":
                ended += 1
            elif what == "error":
                error = error or value
                stop.set()
            elif error is None:
                if what == "sunk":
                    fetched += value
                else:
                    for offset, data in value:
                        sink(offset, data)
                        fetched += len(data)
                if progress:
                    progress(fetched)
    except BaseException as e:
        error = error or e
        raise
    finally:
        stop.set()
        while any(t.is_alive() for t in threads):
            _drain(todo, done)
            for t in threads:
                t.join(0.05)
    if error is not None:
        raise error
    return fetched


def _drain(*queues) -> None:
    for q in queues:
        try:
            while True:
                q.get_nowait()
        except queue.Empty:
            pass


def _read_checked(client, batch: Batch, algorithm: str, block_size: int,
                  md: int) -> list:
    """[(offset, data)] of the batch, every block checked; one more read
    of a range that does not match, then Corrupt."""
    bufs = [bytearray(n) for _, n in batch.ranges]
    client.read_many([(o, b) for (o, _), b in zip(batch.ranges, bufs)])
    out, at = [], 0
    for (offset, length), buf in zip(batch.ranges, bufs):
        want = batch.digests[at:at + -(-length // block_size) * md]
        at += len(want)
        if blkhash.block_digests(buf, algorithm, block_size) != want:
            client.read_into(offset, buf)
            if blkhash.block_digests(buf, algorithm, block_size) != want:
                raise Corrupt(
                    f"{client.uri}: the {length} bytes at offset {offset} "
                    f"do not match the manifest's digests (read twice); "
                    f"nothing was applied")
        out.append((offset, buf))
    return out

