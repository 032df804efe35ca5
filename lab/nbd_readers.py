"""One read of an NBD export, by one client, as a process of its own.

lab/bench_client.py runs this file inside a shaped link's namespace
(lab/netns.py), once per case, so that each case's CPU is its own process's
(getrusage(RUSAGE_SELF) covers all its threads) and the clients never share
an interpreter:

    python nbd_readers.py ours|libnbd whole URI CONNECTIONS
    python nbd_readers.py ours|libnbd scattered URI BLOCK OFFSET...
    python nbd_readers.py ours scattered-many URI BLOCK OFFSET...

It prints one JSON line: bytes read, wall seconds and CPU seconds (user +
sys) of the read alone, the interpreter's start-up left out.  The bytes
are discarded: a benchmark of the link and the client, not of a disk.

A standalone script on purpose: libnbd's binding is Debian's
(python3-libnbd), which a virtualenv without system site packages cannot
import, so bench_client may run this file under /usr/bin/python3; it
imports nothing of the lab, and our client (nbdsnap.verify.nbd) only for
"ours".
"""

import functools
import json
import os
import resource
import sys
import threading
import time

# Run as a script, this file's folder (lab/) comes first on sys.path, and
# lab/nbd.py would hide libnbd's module, also named nbd.
if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

MiB = 1 << 20
PIECE = 8 * MiB         # ours: one read_into, 4 requests of 2 MiB
REQUEST = 2 * MiB       # libnbd: one aio_pread
DEPTH = 32              # libnbd: requests in flight per connection


def quarters(size, connections, align=MiB):
    """[(offset, length)]: size split into connections aligned parts."""
    step = -(-size // connections // align) * align
    return [(o, min(step, size - o)) for o in range(0, size, step)]


# -- ours: verify/nbd.py's Client, one per thread ------------------------------

def ours_size(uri):
    from nbdsnap.verify.nbd import Client
    with Client(uri) as c:
        return c.size


def ours_part(uri, offset, length):
    from nbdsnap.verify.nbd import Client
    buf = bytearray(PIECE)
    with Client(uri) as c:
        end = offset + length
        while offset < end:
            n = min(PIECE, end - offset)
            c.read_into(offset, memoryview(buf)[:n])
            offset += n


def ours_scattered(uri, block, offsets):
    """One block per request, each waited for: what a simple changed-block
    loop does with read_into."""
    from nbdsnap.verify.nbd import Client
    buf = bytearray(block)
    with Client(uri) as c:
        for offset in offsets:
            c.read_into(offset, buf)


# -- libnbd: aio_pread, DEPTH requests in flight, as nbdcopy does --------------

def libnbd_handle(uri):
    import nbd
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)    # ?tls-certificates=DIR, as nbdcopy
    h.connect_uri(uri)
    return h


def libnbd_size(uri):
    h = libnbd_handle(uri)
    try:
        return h.get_size()
    finally:
        h.shutdown()        # NBD_CMD_DISC: nbd-server 3.24 spins without it


def libnbd_reads(uri, pieces, depth=DEPTH):
    """pieces: [(offset, length)], read with up to depth in flight; each
    completion returns its buffer to the pool (buffers are reused, as
    nbdcopy's are, not allocated per request)."""
    import nbd
    h = libnbd_handle(uri)
    try:
        pools = {}          # length: [free buffers]
        failed = []

        def done(buf, error):
            if error.value:
                failed.append(error.value)
            pools[len(buf)].append(buf)
            return 1        # retire the command: no aio_command_completed

        pieces = iter(pieces)
        piece = next(pieces, None)
        while piece is not None or h.aio_in_flight():
            while piece is not None and h.aio_in_flight() < depth:
                offset, length = piece
                free = pools.setdefault(length, [])
                buf = free.pop() if free else nbd.Buffer(length)
                h.aio_pread(buf, offset,
                            completion=functools.partial(done, buf))
                piece = next(pieces, None)
            if h.aio_in_flight():
                h.poll(-1)
        if failed:
            raise OSError(failed[0], "libnbd read failed")
    finally:
        h.shutdown()


def libnbd_part(uri, offset, length):
    libnbd_reads(uri, [(o, min(REQUEST, offset + length - o))
                       for o in range(offset, offset + length, REQUEST)])


# -- the case ------------------------------------------------------------------

def whole(client, uri, connections):
    size = (ours_size if client == "ours" else libnbd_size)(uri)
    part = ours_part if client == "ours" else libnbd_part
    errors = []

    def one(offset, length):
        try:
            part(uri, offset, length)
        except BaseException as e:      # noqa: BLE001 -- reported below
            errors.append("%s: %s" % (type(e).__name__, e))
    threads = [threading.Thread(target=one, args=p)
               for p in quarters(size, connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit("%s whole: %s" % (client, errors[0]))
    return size


def ours_many(uri, block, offsets):
    """Every block in one read_many(): 16 requests in flight, as nbd-pull
    reads them."""
    from nbdsnap.verify.nbd import Client
    with Client(uri) as c:
        c.read_many([(o, bytearray(block)) for o in offsets])


def scattered(client, uri, block, offsets, many=False):
    if client == "ours" and many:
        ours_many(uri, block, offsets)
    elif client == "ours":
        ours_scattered(uri, block, offsets)
    else:
        libnbd_reads(uri, [(o, block) for o in offsets])
    return block * len(offsets)


def main(argv):
    client, kind, uri = argv[:3]
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    if kind == "whole":
        read = whole(client, uri, int(argv[3]))
    else:
        read = scattered(client, uri, int(argv[3]),
                         [int(x) for x in argv[4:]],
                         many=kind == "scattered-many")
    wall = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(json.dumps({"bytes": read, "wall": wall, "cpu": cpu,
                      "pid": os.getpid()}))


if __name__ == "__main__":
    main(sys.argv[1:])
