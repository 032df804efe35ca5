"""A gate in front of libvirtd that holds one call: a race made on purpose.

A test that needs a hook stopped between two libvirt calls (the commit job
ready, the pivot not yet asked for) cannot get there by sending SIGSTOP at
the right moment: the hook may pass the point first.  Instead the hook
talks to libvirtd through this gate (its own LIBVIRT_DEFAULT_URI,
``qemu+unix:///system?socket=GATE``), which forwards every byte both ways
but keeps back the first call that matches, until the test releases it::

    hook ──► gate.sock ──► (first matching call kept) ──► libvirt-sock
         ◄──────────────── replies and events, as sent ◄──

libvirtd has then not seen the call: whatever the test does meanwhile
happens strictly before it.  The hook waits for its reply as it would
for a slow libvirtd.

The wire format (libvirt's src/rpc/virnetprotocol.x, remote_protocol.x):
every message is a 4-byte big-endian length (counting itself), then a
header of six 32-bit words: program, version, procedure, type, serial,
status, then the XDR arguments.  A held call must be released within
libvirt's keepalive (5 s x 5 missed answers): the hook's keepalive pings
queue behind it, and libvirtd answers nothing it has not received.
"""

import contextlib
import os
import socket
import struct
import threading

LIBVIRT_SOCK = "/run/libvirt/libvirt-sock"
REMOTE_PROGRAM = 0x20008086
CALL = 0
# remote_protocol.x: REMOTE_PROC_DOMAIN_BLOCK_JOB_ABORT = 237; its
# arguments end with the flags, VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT = 2.
BLOCK_JOB_ABORT = 237
ABORT_PIVOT = 2


def is_pivot(proc, body):
    """The call virDomainBlockJobAbort(..., VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)."""
    return (proc == BLOCK_JOB_ABORT and len(body) >= 4
            and struct.unpack(">I", body[-4:])[0] & ABORT_PIVOT)


class CallGate:
    """Forwards connections to libvirtd; holds the first call where
    match(procedure, arguments) is true until release().

    held is set once that call has arrived (and been kept back).
    """

    def __init__(self, folder, match, upstream=LIBVIRT_SOCK):
        self.path = os.path.join(folder, "libvirt-gate.sock")
        self.match = match
        self.upstream = upstream
        self.held = threading.Event()
        self._released = threading.Event()
        self._socks = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(8)
        self._socks.append(self._listener)
        self._thread(self._accept)

    @property
    def uri(self):
        return "qemu+unix:///system?socket=%s" % self.path

    def release(self):
        self._released.set()

    def close(self):
        self.release()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _thread(self, target, *args):
        threading.Thread(target=target, args=args, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return              # closed
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(self.upstream)
            self._socks += [client, server]
            self._thread(self._bytes, server, client)
            self._thread(self._calls, client, server)

    @staticmethod
    def _bytes(src, dst):
        """libvirtd to the hook: replies and events, untouched."""
        with contextlib.suppress(OSError):
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _calls(self, src, dst):
        """The hook to libvirtd, one whole message at a time."""
        with contextlib.suppress(OSError):
            while True:
                head = _read(src, 4)
                if head is None:
                    break
                (length,) = struct.unpack(">I", head)
                rest = _read(src, length - 4)
                if rest is None:
                    break
                self._maybe_hold(rest)
                dst.sendall(head + rest)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _maybe_hold(self, message):
        if self.held.is_set() or len(message) < 24:
            return
        prog, _vers, proc, kind = struct.unpack(">IIiI", message[:16])
        if (prog == REMOTE_PROGRAM and kind == CALL
                and self.match(proc, message[24:])):
            self.held.set()
            self._released.wait()


def _read(sock, n):
    """Exactly n bytes, or None at the end of the stream."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data
