"""Our NBD client against real servers: nbd-server, qemu-nbd and nbdkit.

Each server runs on loopback (or a Unix socket) for the module and is
stopped afterwards.  Digests over nbd:// must be bit-exact with the file's;
block status must be used where it is offered; a one-byte difference must
be found and placed; every failure is one line and exit status 2.  A fake
server in a thread plays the failures real servers do not make on demand
(a reset, a short read, an I/O error, a server that is not NBD at all).
"""

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from nbdsnap.verify import blkhash, nbd, nbdproto, ops, sources
from verifykit import (assert_one_error_line, flip, free_port, make_sparse,
                       random_data, ranges, recv_exactly, reference, run,
                       serve_handshake)

BS = 64 * 1024
MiB = 1024 * 1024
# A multiple of 512 (qemu-nbd rounds exports up to sectors) but not of the
# block size: the last block is short.
SIZE = 5 * MiB + 4608
HOLES = [(MiB, 3 * MiB)]
GiB = 1024 * MiB
SPARSE_DATA_AT = 700 * MiB + 4096


def need(program):
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed")


def wait_until_listening(address, proc=None, timeout=15.0):
    """Connect to address (a port, or a Unix socket path) until it answers."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        family = socket.AF_UNIX if isinstance(address, str) else \
            socket.AF_INET
        target = address if isinstance(address, str) else \
            ("127.0.0.1", address)
        with socket.socket(family) as s:
            try:
                s.connect(target)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nothing listens on {address}")
        time.sleep(0.05)


def stop(proc):
    """terminate, wait, kill: the server must not outlive the tests."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Servers:
    """Servers started on demand, one per (kind, file), stopped at the end."""

    KINDS = ("nbd-server", "qemu-nbd", "qemu-nbd-tcp", "nbdkit")
    PROGRAM = {"nbd-server": "nbd-server", "qemu-nbd": "qemu-nbd",
               "qemu-nbd-tcp": "qemu-nbd", "nbdkit": "nbdkit",
               "nbd-server-refusing": "nbd-server"}

    def __init__(self, folder):
        self.folder = folder
        self.uris = {}
        self.procs = []
        self.pidfiles = []

    def uri(self, kind, path):
        key = (kind, os.fspath(path))
        if key not in self.uris:
            need(self.PROGRAM[kind])
            self.uris[key] = getattr(self, "_" + kind.replace("-", "_"))(
                os.fspath(path), len(self.uris))
        return self.uris[key]

    def _nbd_server_refusing(self, path, n):
        """A prerun hook that fails, as nbd-prerun does when it refuses."""
        return self._nbd_server(path, n, "    prerun = /bin/false\n")

    def _nbd_server(self, path, n, more=""):
        port = free_port()
        conf = os.path.join(self.folder, f"nbd-server-{n}.conf")
        pidfile = os.path.join(self.folder, f"nbd-server-{n}.pid")
        with open(conf, "w") as f:
            f.write(f"[generic]\n    listenaddr = 127.0.0.1\n"
                    f"    port = {port}\n"
                    f"[image]\n    exportname = {path}\n"
                    f"    readonly = true\n{more}")
        subprocess.run(["nbd-server", "-C", conf, "-p", pidfile],
                       check=True, timeout=30, capture_output=True)
        self.pidfiles.append(pidfile)
        wait_until_listening(port)
        return f"nbd://127.0.0.1:{port}/image"

    def _qemu_nbd(self, path, n):
        sock = os.path.join(self.folder, f"qemu-nbd-{n}.sock")
        proc = subprocess.Popen(
            ["qemu-nbd", "-r", "-f", "raw", "-t", "--shared=4", "-k", sock,
             path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        wait_until_listening(sock, proc)
        return f"nbd+unix:///?socket={sock}"

    def _qemu_nbd_tcp(self, path, n):
        port = free_port()
        proc = subprocess.Popen(
            ["qemu-nbd", "-r", "-f", "raw", "-t", "--shared=4", "-b",
             "127.0.0.1", "-p", str(port), "-x", "image", path],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        wait_until_listening(port, proc)
        return f"nbd://127.0.0.1:{port}/image"

    def _nbdkit(self, path, n):
        port = free_port()
        proc = subprocess.Popen(
            ["nbdkit", "-f", "-r", "-p", str(port), "-i", "127.0.0.1",
             "file", path],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        wait_until_listening(port, proc)
        return f"nbd://127.0.0.1:{port}/"

    def stop(self):
        # Signal them all first: nbd-server takes 2 s to go on SIGTERM.
        pids = []
        for pidfile in self.pidfiles:
            with contextlib.suppress(OSError, ValueError):
                with open(pidfile) as f:
                    pid = int(f.read())
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            stop(proc)
        deadline = time.monotonic() + 10
        for pid in pids:
            with contextlib.suppress(OSError):
                while time.monotonic() < deadline:
                    os.kill(pid, 0)
                    time.sleep(0.05)
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("nbd")


@pytest.fixture(scope="module")
def servers(folder):
    s = Servers(os.fspath(folder))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def data():
    return random_data(SIZE, HOLES, seed=9)


@pytest.fixture(scope="module")
def image(folder, data):
    """data, with its zeros as a real hole from 1 MiB to 3 MiB."""
    path = folder / "image.raw"
    make_sparse(path, data, HOLES)
    return path


@pytest.fixture(scope="module")
def sparse(folder):
    """1 GiB, all hole but 1 MiB of data at SPARSE_DATA_AT."""
    path = folder / "sparse.raw"
    chunk = random_data(MiB, seed=3)
    with open(path, "wb") as f:
        f.truncate(GiB)
        f.seek(SPARSE_DATA_AT)
        f.write(chunk)
    expected = blkhash.Hasher()
    expected.zero(SPARSE_DATA_AT)
    expected.update(chunk)
    expected.zero(GiB - SPARSE_DATA_AT - MiB)
    return path, expected.hexdigest()


# Bit-exact digests, every server.

@pytest.mark.parametrize("kind", Servers.KINDS)
def test_digest_is_bit_exact(servers, image, data, kind):
    uri = servers.uri(kind, image)
    cp = run("digest", uri, image)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.splitlines() == [f"{reference(data)}  {uri}",
                                      f"{reference(data)}  {image}"]


@pytest.mark.parametrize("kind", Servers.KINDS)
@pytest.mark.parametrize("connections,threads", [(1, 1), (1, 3), (4, None)])
def test_digest_one_or_many_connections(servers, image, data, kind,
                                        connections, threads):
    with sources.open_source(servers.uri(kind, image), connections) as src:
        assert src.connections == connections
        assert src.size == SIZE
        assert ops.checksum(src, threads=threads) == reference(data)


@pytest.mark.parametrize("kind,structured", [
    ("nbd-server", False), ("qemu-nbd", True), ("nbdkit", True)])
def test_what_each_server_offers(servers, image, kind, structured):
    with nbd.Client(servers.uri(kind, image)) as c:
        assert c.size == SIZE
        assert c.structured is structured
        assert c.has_block_status is structured
        assert c.can_multi_conn
        assert c.flags & nbdproto.FLAG_READ_ONLY


def test_small_reads_and_offsets(servers, image, data):
    with nbd.Client(servers.uri("qemu-nbd", image)) as c:
        for offset, length in [(0, 1), (5, 4091), (MiB - 10, 20),
                               (SIZE - 7, 7), (2 * MiB, 3 * MiB)]:
            buf = bytearray(length)
            c.read_into(offset, buf)
            assert buf == data[offset:offset + length]
        with pytest.raises(ValueError):
            c.read_into(SIZE - 1, bytearray(2))


# Block status.

@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
def test_block_status_skips_holes(servers, sparse, kind):
    path, expected = sparse
    with sources.open_source(servers.uri(kind, path)) as src:
        assert src.has_block_status
        extents = list(src.extents())
        assert sum(e.length for e in extents) == GiB
        data = [e for e in extents if e.is_data]
        assert sum(e.length for e in data) <= 2 * MiB
        read = []
        real_read_into = src.read_into

        def counting(offset, buf):
            read.append(len(memoryview(buf)))
            real_read_into(offset, buf)

        src.read_into = counting
        started = time.monotonic()
        assert ops.checksum(src) == expected
        assert sum(read) <= 2 * MiB
        assert time.monotonic() - started < 10


def test_no_block_status_reads_everything(servers, image, data):
    with sources.open_source(servers.uri("nbd-server", image)) as src:
        assert not src.has_block_status
        assert list(src.extents()) == [sources.Extent(0, SIZE, True)]


def test_block_status_of_the_image(servers, image):
    with nbd.Client(servers.uri("qemu-nbd", image)) as c:
        status = []
        pos = 0
        while pos < SIZE:
            got = c.block_status(pos, SIZE - pos)
            status += got
            pos += sum(n for n, _ in got)
        assert pos == SIZE
        zero = [n for n, flags in status if flags & nbdproto.STATE_ZERO]
        assert sum(zero) == 2 * MiB
        # Never past what was asked.
        assert sum(n for n, _ in c.block_status(0, 4096)) == 4096


def test_sparse_digest_over_nbd_server_reads_it_all(servers, sparse):
    path, expected = sparse
    cp = run("digest", servers.uri("nbd-server", path))
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split()[0] == expected


# Differences found and placed.

@pytest.mark.parametrize("kind", ["nbd-server", "qemu-nbd", "nbdkit"])
@pytest.mark.parametrize("offset", [0, MiB + 5, SIZE - 1])
def test_compare_finds_one_byte(servers, image, copy, kind, offset):
    uri = servers.uri(kind, image)
    cp = run("compare", uri, copy)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    flip(copy, offset)
    cp = run("compare", uri, copy)
    assert cp.returncode == 1, (cp.stdout, cp.stderr)
    start = offset // BS * BS
    assert ranges(cp.stdout) == [(start, min(BS, SIZE - start))]
    cp = run("compare", copy, uri)
    assert ranges(cp.stdout) == [(start, min(BS, SIZE - start))], cp.stderr


def test_compare_two_exports(servers, image):
    cp = run("compare", servers.uri("nbd-server", image),
             servers.uri("nbdkit", image))
    assert cp.returncode == 0, cp.stderr


@pytest.mark.parametrize("kind", ["nbd-server", "qemu-nbd-tcp"])
@pytest.mark.parametrize("offset", [7, 2 * MiB + 3, SIZE - 1])
def test_manifest_of_an_export_checks_a_copy(servers, image, copy, tmp_path,
                                             kind, offset):
    m = tmp_path / "image.manifest"
    cp = run("digest", "--manifest", m, "--chunk-size", "1M",
             servers.uri(kind, image))
    assert cp.returncode == 0, cp.stderr
    assert run("check", m, copy).returncode == 0
    flip(copy, offset)
    cp = run("check", m, copy)
    assert cp.returncode == 1
    start = offset // MiB * MiB
    assert ranges(cp.stdout) == [(start, min(MiB, SIZE - start))]


def test_manifest_served_over_nbd(servers, image, copy, tmp_path, folder):
    m = folder / "served.manifest"
    assert run("digest", "--manifest", m, image).returncode == 0
    # qemu-nbd pads the file to 512 bytes with zeros: that must not matter.
    for kind in ("nbdkit", "qemu-nbd"):
        served = servers.uri(kind, m)
        assert run("check", served, copy).returncode == 0
        flip(copy, 100)
        assert run("check", served, copy).returncode == 1
        flip(copy, 100)


# Failures: one line, exit status 2.

def test_unknown_export(servers, image):
    uri = servers.uri("nbd-server", image)
    cp = run("digest", uri.rsplit("/", 1)[0] + "/nope")
    assert_one_error_line(cp, "refused export 'nope'", "no such export")


def test_unknown_export_qemu(servers, image):
    uri = servers.uri("qemu-nbd-tcp", image)
    cp = run("compare", uri.rsplit("/", 1)[0] + "/nope", image)
    assert_one_error_line(cp, "refused export 'nope'")


def test_export_refused_by_a_hook(servers, image):
    cp = run("digest", servers.uri("nbd-server-refusing", image))
    assert_one_error_line(cp, "refused export 'image'", "policy")


def test_connection_refused(image):
    uri = f"nbd://127.0.0.1:{free_port()}/x"
    assert_one_error_line(run("digest", uri), uri, "Connection refused")


def test_missing_unix_socket(tmp_path):
    uri = f"nbd+unix:///x?socket={tmp_path}/none.sock"
    assert_one_error_line(run("digest", uri), "No such file")


@pytest.mark.parametrize("uri,words", [
    ("nbds://127.0.0.1/x?tls-psk-file=/k", "pre-shared key"),
    ("nbds://127.0.0.1/x?tls-certificates=/nowhere", "no such folder"),
    ("nbd+vsock:///x", "not supported"),
    ("nbd:///x", "no host"),
    ("nbd+unix:///x", "socket"),
    ("nbd://127.0.0.1:99999/x", "invalid NBD URI"),
])
def test_bad_uris(uri, words):
    assert_one_error_line(run("digest", uri), words)


class FakeServer:
    """One connection, served in a thread by a script of ours."""

    def __init__(self, script):
        self.script = script
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(30)
        self.uri = f"nbd://127.0.0.1:{self.listener.getsockname()[1]}/fake"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            with contextlib.suppress(OSError):
                self.script(conn)

    def close(self):
        self.listener.close()
        self.thread.join(30)


@pytest.fixture
def fake():
    made = []

    def start(script):
        server = FakeServer(script)
        made.append(server)
        return server.uri

    yield start
    for server in made:
        server.close()


def handshake(conn, size=4 * MiB):
    """Fixed newstyle; every option unsupported but GO, which succeeds."""
    serve_handshake(conn, size)


def next_read(conn):
    """(handle, offset, length) of the next read; None on NBD_CMD_DISC."""
    magic, _, cmd, handle, offset, length = struct.unpack(
        ">IHHQQI", recv_exactly(conn, 28))
    assert magic == nbdproto.REQUEST_MAGIC
    if cmd == nbdproto.CMD_DISC:
        return None
    assert cmd == nbdproto.CMD_READ
    return handle, offset, length


def test_fake_server_works(fake):
    def script(conn):
        handshake(conn)
        while True:
            request = next_read(conn)
            if request is None:
                return
            handle, _, length = request
            conn.sendall(struct.pack(">IIQ", nbdproto.SIMPLE_REPLY_MAGIC, 0,
                                     handle) + bytes(length))

    cp = run("digest", fake(script))
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split()[0] == reference(bytes(4 * MiB))


def test_connection_reset_during_read(fake):
    def script(conn):
        handshake(conn)
        next_read(conn)
        # SO_LINGER 0: close with a reset, not a goodbye.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                        struct.pack("ii", 1, 0))

    assert_one_error_line(run("digest", fake(script)), "connection lost",
                          "reset")


def test_short_read(fake):
    def script(conn):
        handshake(conn)
        handle, _, length = next_read(conn)
        conn.sendall(struct.pack(">IIQ", nbdproto.SIMPLE_REPLY_MAGIC, 0, handle)
                     + bytes(length // 2))
        # End of stream, not a reset: unread requests are still queued.
        conn.shutdown(socket.SHUT_WR)
        time.sleep(1)

    assert_one_error_line(run("digest", fake(script)),
                          "the server closed the connection while reading")


def test_read_error(fake):
    def script(conn):
        handshake(conn)
        handle, _, _ = next_read(conn)
        conn.sendall(struct.pack(">IIQ", nbdproto.SIMPLE_REPLY_MAGIC, 5, handle))
        time.sleep(1)

    assert_one_error_line(run("digest", fake(script)), "EIO", "offset 0")


def test_closed_during_handshake(fake):
    # As nbd-server does when a prerun hook refuses the connection.
    def script(conn):
        conn.sendall(struct.pack(">QQH", nbdproto.NBDMAGIC, nbdproto.IHAVEOPT,
                                 nbdproto.FLAG_FIXED_NEWSTYLE))
        recv_exactly(conn, 4)
        _, _, length = struct.unpack(">QII", recv_exactly(conn, 16))
        recv_exactly(conn, length)
        conn.shutdown(socket.SHUT_WR)
        time.sleep(1)

    assert_one_error_line(run("digest", fake(script)),
                          "closed the connection during the handshake")


def test_not_an_nbd_server(fake):
    def script(conn):
        conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n" + bytes(20))
        time.sleep(1)

    assert_one_error_line(run("digest", fake(script)), "not an NBD server")


def test_timeout(fake):
    def script(conn):
        handshake(conn)
        next_read(conn)
        time.sleep(1.5)

    uri = fake(script)
    with nbd.Client(uri, timeout=0.5) as c:
        with pytest.raises(nbd.NbdError, match="timed out"):
            c.read_into(0, bytearray(4096))
        # The connection is not used again after a failure, which is
        # named again to whoever tries.
        with pytest.raises(nbd.NbdError, match="timed out"):
            c.read_into(0, bytearray(4096))
