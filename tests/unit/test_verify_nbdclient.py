"""nbdsnap.verify.nbd: structured read replies, crafted byte for byte.

The server is a script in a thread on the other end of a socket pair:
the handshake negotiates structured replies, then each test answers one
read with the chunks it wants.  Real servers are in
tests/real/test_verify_nbd.py.
"""

import socket
import struct
import threading

import pytest

from nbdsnap.verify import nbd, nbdconn, nbdproto
from verifykit import recv_exactly, serve_handshake

KiB = 1024
SIZE = 1024 * KiB
READ = 64 * KiB


def data_chunk(handle, offset, payload, done=False):
    return struct.pack(
        ">IHHQIQ", nbdproto.STRUCTURED_REPLY_MAGIC,
        nbdproto.REPLY_FLAG_DONE if done else 0,
        nbdproto.REPLY_TYPE_OFFSET_DATA, handle, 8 + len(payload),
        offset) + payload


def hole_chunk(handle, offset, length, done=False):
    return struct.pack(
        ">IHHQIQI", nbdproto.STRUCTURED_REPLY_MAGIC,
        nbdproto.REPLY_FLAG_DONE if done else 0,
        nbdproto.REPLY_TYPE_OFFSET_HOLE, handle, 12, offset, length)


def done_chunk(handle):
    return struct.pack(">IHHQI", nbdproto.STRUCTURED_REPLY_MAGIC,
                       nbdproto.REPLY_FLAG_DONE, nbdproto.REPLY_TYPE_NONE,
                       handle, 0)


@pytest.fixture
def client(monkeypatch):
    """client(reply) -> an nbd.Client whose server answers its first read
    with reply(handle, offset, length): the bytes of the chunks (reply None:
    no request but the goodbye).  With
    meta_context, the client asks for that context, the server offers
    contexts ({name: id}) and expects a block status request instead;
    asked holds what the client asked for."""
    threads = []

    def make(reply, meta_context=None, contexts=None,
             command=nbdproto.CMD_READ):
        ours, theirs = socket.socketpair()
        ours.settimeout(10)
        theirs.settimeout(10)

        def serve():
            with theirs:
                try:
                    asked.extend(serve_handshake(
                        theirs, SIZE, structured=True, contexts=contexts))
                    _, _, cmd, handle, offset, length = struct.unpack(
                        ">IHHQQI", recv_exactly(theirs, 28))
                    if reply is None:   # no request expected: goodbye
                        assert cmd == nbdproto.CMD_DISC
                        return
                    assert cmd == command
                    theirs.sendall(reply(handle, offset, length))
                    recv_exactly(theirs, 28)    # NBD_CMD_DISC, or gone
                except OSError:
                    pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        monkeypatch.setattr(nbdconn, "_connect", lambda *args: ours)
        if meta_context is None:
            c = nbd.Client("nbd://fake/x", timeout=10)
        else:
            c = nbd.Client("nbd://fake/x", timeout=10,
                           meta_context=meta_context)
        assert c.structured
        return c

    asked = []
    make.asked = asked
    yield make
    for thread in threads:
        thread.join(10)


PATTERN = bytes(range(256)) * (READ // 256)


def read(c):
    buf = bytearray(b"\xee" * READ)
    with c:
        c.read_into(0, buf)
    return bytes(buf)


def test_data_and_hole_in_any_order(client):
    half = READ // 2

    def reply(handle, offset, length):
        return (hole_chunk(handle, half, half)
                + data_chunk(handle, 0, PATTERN[:half], done=True))

    assert read(client(reply)) == PATTERN[:half] + bytes(half)


def test_many_chunks_out_of_order(client):
    cuts = [(i * 4 * KiB, 4 * KiB) for i in range(READ // (4 * KiB))]
    order = cuts[1::2] + cuts[0::2]

    def reply(handle, offset, length):
        return b"".join(data_chunk(handle, start, PATTERN[start:start + n])
                        for start, n in order) + done_chunk(handle)

    assert read(client(reply)) == PATTERN


@pytest.mark.parametrize("chunks", [
    # Overlap + gap of the same size: the byte count is right, the bytes
    # from 48 KiB on never came.
    [("data", 0, 32), ("data", 16, 32)],
    [("data", 32, 32), ("data", 16, 32)],     # out of order: bisect
    [("hole", 0, 32), ("data", 24, 16), ("data", 48, 16)],
    [("data", 8, 8), ("data", 32, 32), ("hole", 0, 8), ("hole", 0, 16)],
])
def test_overlapping_chunks_are_refused(client, chunks):
    def reply(handle, offset, length):
        out = []
        for kind, start, n in chunks:
            start, n = start * KiB, n * KiB
            if kind == "data":
                out.append(data_chunk(handle, start, PATTERN[start:start + n]))
            else:
                out.append(hole_chunk(handle, start, n))
        return b"".join(out) + done_chunk(handle)

    assert sum(n for _, _, n in chunks) * KiB == READ
    with pytest.raises(nbd.NbdError, match="overlapping chunks"):
        read(client(reply))


def test_a_gap_is_a_short_reply(client):
    def reply(handle, offset, length):
        return (data_chunk(handle, 0, PATTERN[:16 * KiB])
                + hole_chunk(handle, 32 * KiB, 32 * KiB, done=True))

    with pytest.raises(nbd.NbdError, match="short reply"):
        read(client(reply))


def test_an_empty_hole_is_refused(client):
    def reply(handle, offset, length):
        return (hole_chunk(handle, 0, 0)
                + data_chunk(handle, 0, PATTERN, done=True))

    with pytest.raises(nbd.NbdError, match="empty hole chunk"):
        read(client(reply))


def status_chunk(handle, context, extents, done=True):
    payload = struct.pack(">I", context) + b"".join(
        struct.pack(">II", n, flags) for n, flags in extents)
    return struct.pack(">IHHQI", nbdproto.STRUCTURED_REPLY_MAGIC,
                       nbdproto.REPLY_FLAG_DONE if done else 0,
                       nbdproto.REPLY_TYPE_BLOCK_STATUS, handle,
                       len(payload)) + payload


def test_base_allocation_is_asked_for_by_default(client):
    def reply(handle, offset, length):
        return status_chunk(handle, 3, [(READ, nbdproto.STATE_ZERO)])

    c = client(reply, contexts={"base:allocation": 3},
               command=nbdproto.CMD_BLOCK_STATUS)
    with c:
        assert c.has_block_status
        assert c.block_status(0, READ) == [(READ, nbdproto.STATE_ZERO)]
    assert client.asked == ["base:allocation"]


def test_another_meta_context(client):
    """A dirty bitmap's context: only its extents count, the last one cut
    at the end of the range asked for."""
    bitmap = nbdproto.DIRTY_BITMAP + "b1"

    def reply(handle, offset, length):
        # A context the client did not select comes first: ignored.
        return (status_chunk(handle, 3, [(SIZE, 0)], done=False)
                + status_chunk(handle, 9, [(16 * KiB, 0),
                                           (SIZE, nbdproto.STATE_DIRTY)]))

    c = client(reply, meta_context=bitmap,
               contexts={bitmap: 9, "base:allocation": 3},
               command=nbdproto.CMD_BLOCK_STATUS)
    with c:
        assert c.has_block_status
        assert c.block_status(0, READ) == [
            (16 * KiB, 0), (READ - 16 * KiB, nbdproto.STATE_DIRTY)]
    assert client.asked == [bitmap]


def test_a_context_the_server_lacks_means_no_block_status(client):
    c = client(None, meta_context=nbdproto.DIRTY_BITMAP + "gone",
               contexts={"base:allocation": 3})
    with c:
        assert not c.has_block_status
        with pytest.raises(ValueError, match="qemu:dirty-bitmap:gone"):
            c.block_status(0, READ)
