"""A shaped link (lab/netns.py): nbd-server inside a namespace of its own.

A plain nbd-server (no hooks, read-only) started inside the namespace
serves clients inside it and nobody outside; the namespace's loopback
counts every byte read; stopping the server by its pid works from outside;
the namespace is gone after close, also when the with block raised.
No timed assertions: the shaping's speed is the benchmark's business.
"""

import hashlib
import os
import socket
import subprocess

import pytest

import lab
from lab.netns import ShapedLink

MiB = 1 << 20
SIZE = 32 * MiB


def namespaces():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True,
                         text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.fixture
def image():
    with lab.scratch("nbdsnap-netns-") as folder:
        path = os.path.join(folder, "data.raw")
        with open(path, "wb") as f:
            f.write(os.urandom(SIZE))
        yield folder, path


def test_server_inside_serves_inside_only(image):
    folder, path = image
    with ShapedLink("1gbit") as link:
        assert link.name in namespaces()
        qdisc = subprocess.run(["tc", "-n", link.name, "qdisc", "show",
                                "dev", "lo"], capture_output=True, text=True,
                               check=True).stdout
        assert "tbf" in qdisc and "1Gbit" in qdisc
        server = lab.NbdServer(folder, {"plain": (path, {"prerun": "",
                                                         "postrun": ""})},
                               {}, wrap=link.argv([]))
        try:
            server.start()
            pid = server.pid
            # Not from outside: nothing listens on the host's loopback port.
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", server.port), 2)
            before = link.tx_bytes()
            copy = os.path.join(folder, "copy.raw")
            link.run(["nbdcopy", server.uri("plain"), copy],
                     capture_output=True)
            sent = link.tx_bytes() - before
        finally:
            server.stop()
        assert not os.path.exists("/proc/%d" % pid), "stopped from outside"
    assert sha256(copy) == sha256(path)
    assert sent >= SIZE, "lo counted %d bytes for a %d byte read" % (sent,
                                                                     SIZE)
    assert link.name not in namespaces()


def test_gone_after_failure_and_twice_closed():
    with pytest.raises(RuntimeError, match="the body failed"):
        with ShapedLink(rate=None) as link:
            qdisc = subprocess.run(["tc", "-n", link.name, "qdisc", "show",
                                    "dev", "lo"], capture_output=True,
                                   text=True, check=True).stdout
            assert "tbf" not in qdisc
            raise RuntimeError("the body failed")
    assert link.name not in namespaces()
    link.close()                                   # tolerant: already gone
    other = ShapedLink().open()
    subprocess.run(["ip", "netns", "delete", other.name], check=True)
    other.close()                                  # deleted behind its back
    assert other.name not in namespaces()


def test_names_are_unique():
    a, b = ShapedLink(), ShapedLink()
    assert a.name != b.name
    assert a.name.startswith("nbdsnap-%d-" % os.getpid())


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()
