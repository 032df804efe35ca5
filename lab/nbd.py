"""nbd-server with our hooks, nbdcopy, and a tiny client that holds a
connection."""

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys

from .host import VENV_BIN, wait_until


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NbdServer:
    """nbd-server with our hooks on a loopback port of its own.

    exports: {name: (path, extra settings dict)}.  Hooks are the venv's
    entry points, by absolute path, as an operator would write them.
    wrap: a command prefix for nbd-server, e.g. ShapedLink.argv([]) to
    run it inside a network namespace (lab/netns.py); the pid it writes
    is global, so stop() works from outside all the same.  generic: more
    [generic] settings (e.g. TLS's certfile, keyfile, cacertfile).
    """

    def __init__(self, folder, exports, env, prerun=None, postrun=None,
                 wrap=None, generic=None):
        self.folder = folder
        self.exports = exports
        self.env = env
        self.port = free_port()
        self.conf = os.path.join(folder, "nbd-server.conf")
        self.pidfile = os.path.join(folder, "nbd-server.pid")
        self.prerun = prerun or os.path.join(VENV_BIN, "nbd-prerun") + " %s"
        self.postrun = postrun or os.path.join(VENV_BIN, "nbd-postrun") + " %s"
        self.wrap = list(wrap or [])
        self.generic = dict(generic or {})
        self.pid = None

    def write_config(self):
        lines = ["[generic]", "    listenaddr = 127.0.0.1",
                 "    port = %d" % self.port]
        lines += ["    %s = %s" % kv for kv in self.generic.items()]
        for name, (path, extra) in self.exports.items():
            lines += ["[%s]" % name, "    exportname = %s" % path,
                      "    readonly = true"]
            settings = {"prerun": self.prerun, "postrun": self.postrun}
            settings.update(extra or {})
            lines += ["    %s = %s" % kv for kv in settings.items() if kv[1]]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self):
        self.write_config()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pidfile)
        env = dict(os.environ, **self.env)
        log = open(os.path.join(self.folder, "nbd-server.log"), "ab")
        subprocess.run(self.wrap + ["nbd-server", "-C", self.conf,
                                    "-p", self.pidfile],
                       env=env, check=True, stdout=log, stderr=log)
        wait_until(lambda: os.path.exists(self.pidfile)
                   and open(self.pidfile).read().strip(), 10,
                   what="nbd-server's pid file")
        self.pid = int(open(self.pidfile).read())
        wait_until(self._accepts, 10, what="nbd-server to listen")

    def _accepts(self):
        if self.wrap:       # its loopback is not ours: knock from inside
            return subprocess.run(
                self.wrap + [sys.executable, "-c", _KNOCK, str(self.port)],
                stdin=subprocess.DEVNULL, capture_output=True,
                timeout=30).returncode == 0
        try:
            socket.create_connection(("127.0.0.1", self.port), 1).close()
            return True
        except OSError:
            return False

    def uri(self, name):
        return "nbd://127.0.0.1:%d/%s" % (self.port, name)

    def children(self):
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.pid)],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self, sig=signal.SIGTERM):
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not os.path.exists("/proc/%d" % self.pid), 10)
        self.pid = None


_KNOCK = ("import socket, sys; "
          "socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)"
          ".close()")


def nbdcopy(uri, dest, connections=4, timeout=300):
    # nbdcopy caps its connections at its threads, which default to the
    # number of cores (2 here): ask for both to get real multi-connection.
    subprocess.run(["nbdcopy", "--connections=%d" % connections,
                    "--threads=%d" % connections, uri, dest],
                   check=True, timeout=timeout)


# -- a client that holds a connection ------------------------------------------

NBD_MAGIC = 0x4e42444d41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3e889045565a9
NBD_OPT_GO = 7
NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_CMD_READ = 0
NBD_CMD_DISC = 2


class RefusedError(Exception):
    pass


class HeldConnection:
    """One NBD connection, opened with NBD_OPT_GO and held until close().

    nbd-server runs prerun while it handles NBD_OPT_GO, so once open()
    returns, this connection's prerun has finished and succeeded.
    """

    def __init__(self, port, name, host="127.0.0.1"):
        self.sock = socket.create_connection((host, port), 30)
        self.size = None
        self._handshake(name.encode())

    def _recv(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise RefusedError("server closed the connection")
            buf += chunk
        return buf

    def _handshake(self, name):
        magic, opt, _flags = struct.unpack(">QQH", self._recv(18))
        assert magic == NBD_MAGIC and opt == IHAVEOPT
        self.sock.sendall(struct.pack(">I", 3))   # FIXED_NEWSTYLE|NO_ZEROES
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, NBD_OPT_GO, len(data))
                          + data)
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII",
                                                       self._recv(20))
            payload = self._recv(length)
            if rtype == NBD_REP_ACK:
                return
            if rtype & 0x80000000:
                raise RefusedError("export refused (reply 0x%x): %r"
                                   % (rtype, payload))
            if rtype == NBD_REP_INFO and payload[:2] == b"\0\0":
                self.size = struct.unpack(">Q", payload[2:10])[0]

    def read(self, offset, length):
        self.sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0,
                                      NBD_CMD_READ, 1, offset, length))
        magic, error, _handle = struct.unpack(">IIQ", self._recv(16))
        assert magic == NBD_SIMPLE_REPLY_MAGIC
        if error:
            raise OSError(error, "NBD read error")
        return self._recv(length)

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0,
                                          NBD_CMD_DISC, 2, 0, 0))
        self.sock.close()

    def drop(self):
        """Vanish without NBD_CMD_DISC, as a killed client does."""
        self.sock.close()
