"""Helpers shared by the tests of nbd-verify, in tests/unit and tests/real.

Plain functions: nbd-verify run as a program and what it prints read back,
blkhash computed the slow, obvious way (hashlib straight on bytes, sharing
no code with nbdsnap.verify) to check its digests against, images of
seeded random data with zeros, or real holes, where a test wants them, and
the server's side of an NBD handshake for a fake server.

tests/conftest.py puts this folder on sys.path: ``from verifykit import run``.
"""

import hashlib
import os
import random
import re
import socket
import struct
import subprocess
import sys

from nbdsnap.verify import nbdproto

# blkhash's block size, written out here: the reference must not take it
# from the code it checks.
BLOCK_SIZE = 64 * 1024

_RANGE = re.compile(r"^differ: offset (\d+) length (\d+)$")


def run(*args):
    """nbd-verify ARGS as a program: the CompletedProcess, text, no check."""
    return subprocess.run(
        [sys.executable, "-m", "nbdsnap.verify.cli", *map(os.fspath, args)],
        capture_output=True, text=True, timeout=120)


def ranges(stdout):
    """[(offset, length)] of the "differ: offset O length L" lines."""
    return [(int(m.group(1)), int(m.group(2)))
            for m in map(_RANGE.match, stdout.splitlines()) if m]


def assert_one_error_line(cp, *words):
    """Exit status 2 and one "nbd-verify: ..." line holding every word."""
    assert cp.returncode == 2, (cp.stdout, cp.stderr)
    lines = cp.stderr.splitlines()
    assert len(lines) == 1, cp.stderr
    assert lines[0].startswith("nbd-verify: ")
    for word in words:
        assert word in lines[0], lines[0]


def reference(data, algorithm="sha256", block_size=BLOCK_SIZE):
    """blkhash the slow, obvious way: hashlib straight on bytes."""
    outer = hashlib.new(algorithm)
    for i in range(0, len(data), block_size):
        outer.update(hashlib.new(algorithm, data[i:i + block_size]).digest())
    outer.update(len(data).to_bytes(8, "little"))
    return outer.hexdigest()


def chunk_reference(data, chunk_size, algorithm="sha256"):
    """The manifest's chunks: reference() of every chunk_size piece."""
    return [reference(data[i:i + chunk_size], algorithm)
            for i in range(0, len(data), chunk_size)]


def random_data(size, holes=(), seed=1):
    """size random bytes (the same for the same seed), zeros in the
    (start, end) ranges of holes."""
    data = bytearray(random.Random(seed).randbytes(size))
    for start, end in holes:
        data[start:end] = bytes(end - start)
    return bytes(data)


def make_sparse(path, data, holes):
    """Write data to path, leaving the (start, end) ranges unallocated."""
    with open(path, "wb") as f:
        f.truncate(len(data))
        pos = 0
        for start, end in sorted(holes) + [(len(data), len(data))]:
            f.seek(pos)
            f.write(data[pos:start])
            pos = end


def flip(path, offset):
    """Invert the byte at offset of the file at path."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def free_port():
    """A loopback TCP port nobody listens on (for now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recv_exactly(conn, n):
    """n bytes from the socket conn; OSError if the peer goes away."""
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            raise OSError("client went away")
        data += more
    return data


def serve_handshake(conn, size, structured=False, contexts=None):
    """A fake server's fixed newstyle handshake, up to NBD_OPT_GO, which
    succeeds with an export of size bytes.  Every other option is refused
    as unsupported, or, with structured, acknowledged (structured replies
    then).  SET_META_CONTEXT selects, of the contexts asked for, those in
    contexts ({name: id}; none without it).  Returns the context names the
    client asked for."""
    conn.sendall(struct.pack(
        ">QQH", nbdproto.NBDMAGIC, nbdproto.IHAVEOPT,
        nbdproto.FLAG_FIXED_NEWSTYLE | nbdproto.FLAG_NO_ZEROES))
    recv_exactly(conn, 4)
    asked = []
    while True:
        _, option, length = struct.unpack(">QII", recv_exactly(conn, 16))
        data = recv_exactly(conn, length)
        if option == nbdproto.OPT_GO:
            _option_reply(conn, option, nbdproto.REP_INFO, struct.pack(
                ">HQH", nbdproto.INFO_EXPORT, size,
                nbdproto.FLAG_HAS_FLAGS | nbdproto.FLAG_READ_ONLY))
            _option_reply(conn, option, nbdproto.REP_ACK)
            return asked
        if option == nbdproto.OPT_SET_META_CONTEXT and structured:
            for name in _queries(data):
                asked.append(name)
                if contexts and name in contexts:
                    _option_reply(conn, option, nbdproto.REP_META_CONTEXT,
                                  struct.pack(">I", contexts[name])
                                  + name.encode())
        _option_reply(conn, option, nbdproto.REP_ACK if structured
                      else nbdproto.REP_ERR_UNSUP)


def _queries(data):
    """The context names of NBD_OPT_SET_META_CONTEXT's data."""
    (n,) = struct.unpack_from(">I", data)
    pos = 4 + n
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    names = []
    for _ in range(count):
        (n,) = struct.unpack_from(">I", data, pos)
        names.append(data[pos + 4:pos + 4 + n].decode())
        pos += 4 + n
    return names


def _option_reply(conn, option, rtype, data=b""):
    conn.sendall(struct.pack(">QIII", nbdproto.OPTION_REPLY_MAGIC, option,
                             rtype, len(data)) + data)
