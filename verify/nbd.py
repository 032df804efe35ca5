"""A small NBD client of our own: read-only, made to read whole exports fast.

It speaks the client side of the NBD protocol (NetworkBlockDevice/nbd,
doc/proto.md) that digest, compare and check need, and nothing else:

- fixed newstyle handshake; NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE, with
  NBD_OPT_EXPORT_NAME as the fallback the protocol asks for;
- NBD_OPT_STRUCTURED_REPLY and NBD_OPT_SET_META_CONTEXT "base:allocation"
  when the server offers them (qemu-nbd and nbdkit do; nbd-server 3.24 does
  not), so block_status() can tell holes from data;
- NBD_CMD_READ, pipelined: one read_into() of a large buffer sends up to
  DEPTH requests of REQUEST_SIZE (bounded by the server's maximum block
  size) before it waits, and each reply lands straight in its place in
  the caller's buffer::

      buffer  |  req 0  |  req 1  |  req 2  |  ...  |  req 15 |
      send    h0 h1 h2 ... h15            (one write, 28 bytes each)
      receive       reply h1 -> req 1, reply h0 -> req 0, ...
      send                    h16 as soon as one reply is complete

- NBD_CMD_DISC on close().

One Client is one connection, used by one thread at a time.  Several
connections to one export are the caller's business (sources.NbdSource
opens them when the server advertises NBD_FLAG_CAN_MULTI_CONN).

URIs follow the NBD URI standard: ``nbd://host[:port]/export`` (port 10809
by default) and ``nbd+unix:///export?socket=PATH``.  TLS (nbds) and vsock
are refused.  Every failure is an NbdError with a one-line message.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple, Optional
from urllib.parse import parse_qs, unquote, urlsplit

from .errors import NbdError, SourceError, UnsupportedSource

DEFAULT_PORT = 10809
# Seconds one send or receive may wait: a hung server must not hang a cron job.
DEFAULT_TIMEOUT = 60.0
# Read requests: 2 MiB each, 16 in flight per connection.
REQUEST_SIZE = 2 * 1024 * 1024
DEPTH = 16

# Magic numbers.
NBDMAGIC = 0x4E42444D41474943           # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054           # "IHAVEOPT"
CLISERV_MAGIC = 0x00420281861253        # oldstyle negotiation
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_CAN_MULTI_CONN = 1 << 8

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10

# Option replies; errors have bit 31 set.
REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERRORS = {
    REP_ERR | 1: "unsupported option",
    REP_ERR | 2: "forbidden by the server's policy",
    REP_ERR | 3: "invalid request",
    REP_ERR | 4: "not supported on the server's platform",
    REP_ERR | 5: "TLS required",
    REP_ERR | 6: "no such export",
    REP_ERR | 7: "server shutting down",
    REP_ERR | 8: "block size negotiation required",
    REP_ERR | 9: "request too big",
}

# NBD_REP_INFO types.
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# Commands.
CMD_READ = 0
CMD_DISC = 2
CMD_BLOCK_STATUS = 7

# Structured reply chunks.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15

# base:allocation flags.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
BASE_ALLOCATION = b"base:allocation"

# Transmission errors (the protocol's own values, errno-like).
ERRORS = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC",
          75: "EOVERFLOW", 95: "ENOTSUP", 108: "ESHUTDOWN"}

# Largest option reply we accept: info, context names and messages are small.
MAX_OPTION_REPLY = 64 * 1024

_REQUEST = struct.Struct(">IHHQQI")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_SIMPLE_REST = struct.Struct(">IQ")             # error, handle
_STRUCTURED_REST = struct.Struct(">HHQI")       # flags, type, handle, length

_SCHEMES = ("nbd", "nbd+unix")
_UNSUPPORTED_SCHEMES = ("nbds", "nbds+unix", "nbd+vsock", "nbds+vsock")


class Address(NamedTuple):
    """Where an export is: a TCP host and port, or a Unix socket."""

    export: str
    host: Optional[str] = None
    port: int = DEFAULT_PORT
    socket_path: Optional[str] = None

    def __str__(self):
        if self.socket_path is not None:
            return self.socket_path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_uri(uri: str) -> Address:
    """nbd://host[:port]/export or nbd+unix:///export?socket=PATH."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as e:
        raise SourceError(f"{uri}: invalid NBD URI: {e}") from None
    scheme = parts.scheme.lower()
    if scheme in _UNSUPPORTED_SCHEMES:
        raise UnsupportedSource(
            f"{uri}: {scheme}:// is not supported (no TLS, no vsock); use "
            f"nbd:// or nbd+unix://")
    if scheme not in _SCHEMES:
        raise SourceError(f"{uri}: not an NBD URI")
    export = unquote(parts.path[1:] if parts.path.startswith("/")
                     else parts.path)
    query = parse_qs(parts.query)
    if scheme == "nbd+unix":
        paths = query.get("socket")
        if parts.netloc or not paths or not paths[0]:
            raise SourceError(
                f"{uri}: nbd+unix needs no host and a socket: "
                f"nbd+unix:///EXPORT?socket=PATH")
        return Address(export, socket_path=paths[0])
    if not parts.hostname:
        raise SourceError(f"{uri}: no host: nbd://HOST[:PORT]/EXPORT")
    return Address(export, host=parts.hostname,
                   port=port if port is not None else DEFAULT_PORT)


class _Read:
    """One NBD_CMD_READ in flight: where its bytes go, how many came."""

    __slots__ = ("offset", "view", "received", "error")

    def __init__(self, offset: int, view: memoryview):
        self.offset = offset
        self.view = view
        self.received = 0
        self.error = None


class Client:
    """One connection to one export, handshake done, ready to read."""

    def __init__(self, uri: str, timeout: float = DEFAULT_TIMEOUT):
        self.uri = uri
        self.address = parse_uri(uri)
        self.size = 0
        self.flags = 0
        # Block size constraints; the protocol's defaults until the server
        # says otherwise (and 32 MiB, the safe maximum, for requests).
        self.min_block = 1
        self.preferred_block = 4096
        self.max_block = 32 * 1024 * 1024
        self.structured = False
        self._meta_id = None    # context id of base:allocation, if selected
        self._handle = 0
        # The first failure, once the connection is in an unknown state.
        self._failure = None
        self._header = bytearray(20)
        self._sock = self._connect(timeout)
        try:
            self._handshake()
        except BaseException:
            self._sock.close()
            raise
        # Requests never cross these limits (see "Block size constraints").
        size = min(REQUEST_SIZE, self.max_block)
        self.request_size = max(self.min_block,
                                size - size % self.min_block)

    # Properties of the export.

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & FLAG_CAN_MULTI_CONN)

    @property
    def has_block_status(self) -> bool:
        return self._meta_id is not None

    # Connection.

    def _connect(self, timeout: float) -> socket.socket:
        addr = self.address
        try:
            if addr.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(timeout)
                    sock.connect(addr.socket_path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((addr.host, addr.port),
                                                timeout=timeout)
                # The protocol asks for it: no delay for small requests.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except socket.gaierror as e:
            raise NbdError(
                f"{self.uri}: cannot resolve {addr.host}: {e.strerror}") \
                from None
        except socket.timeout:
            raise NbdError(
                f"{self.uri}: cannot connect to {addr}: timed out") from None
        except OSError as e:
            raise NbdError(
                f"{self.uri}: cannot connect to {addr}: "
                f"{e.strerror or e}") from None
        return sock

    def _fail(self, what: str) -> NbdError:
        """The error to raise; the connection is not used again after it."""
        if self._failure is None:
            self._failure = what
        return NbdError(f"{self.uri}: {what}")

    def _recv_into(self, view: memoryview, during: str) -> None:
        """Fill view from the socket, or fail with a one-line error."""
        done, total = 0, len(view)
        recv_into = self._sock.recv_into
        try:
            while done < total:
                n = recv_into(view[done:])
                if n == 0:
                    raise self._fail(
                        f"the server closed the connection {during}")
                done += n
        except socket.timeout:
            raise self._fail(f"timed out {during}") from None
        except NbdError:
            raise
        except OSError as e:
            raise self._fail(f"connection lost {during}: "
                             f"{e.strerror or e}") from None

    def _recv(self, n: int, during: str) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf), during)
        return bytes(buf)

    def _send(self, data, during: str) -> None:
        try:
            self._sock.sendall(data)
        except socket.timeout:
            raise self._fail(f"timed out {during}") from None
        except OSError as e:
            raise self._fail(f"connection lost {during}: "
                             f"{e.strerror or e}") from None

    # Handshake.

    def _handshake(self) -> None:
        during = "during the handshake"
        magic, second, hflags = struct.unpack(
            ">QQH", self._recv(18, during))
        if magic != NBDMAGIC:
            raise self._fail(f"{self.address} is not an NBD server")
        if second == CLISERV_MAGIC:
            raise self._fail(
                "the server speaks the oldstyle handshake, not supported")
        if second != IHAVEOPT:
            raise self._fail("unknown NBD handshake")
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise self._fail(
                "the server does not support the fixed newstyle handshake")
        self._no_zeroes = bool(hflags & FLAG_NO_ZEROES)
        cflags = FLAG_C_FIXED_NEWSTYLE
        if self._no_zeroes:
            cflags |= FLAG_C_NO_ZEROES
        self._send(struct.pack(">I", cflags), during)

        rtype, _ = self._option(OPT_STRUCTURED_REPLY, b"")
        self.structured = rtype == REP_ACK
        if self.structured:
            self._select_base_allocation()
        self._go()

    def _option(self, option: int, data: bytes) -> tuple[int, bytes]:
        """Send one option and return its first reply (type, data)."""
        self._send(_OPTION.pack(IHAVEOPT, option, len(data)) + data,
                   "during the handshake")
        return self._option_reply(option)

    def _option_reply(self, option: int) -> tuple[int, bytes]:
        during = "during the handshake"
        magic, opt, rtype, length = _OPTION_REPLY.unpack(
            self._recv(_OPTION_REPLY.size, during))
        if magic != OPTION_REPLY_MAGIC or opt != option:
            raise self._fail("protocol error: bad option reply")
        if length > MAX_OPTION_REPLY:
            raise self._fail(
                f"protocol error: option reply of {length} bytes")
        return rtype, self._recv(length, during) if length else b""

    def _select_base_allocation(self) -> None:
        export = self.address.export.encode()
        query = BASE_ALLOCATION
        data = (struct.pack(">I", len(export)) + export
                + struct.pack(">II", 1, len(query)) + query)
        rtype, payload = self._option(OPT_SET_META_CONTEXT, data)
        found = None
        while rtype == REP_META_CONTEXT:
            if len(payload) >= 4:
                (context_id,) = struct.unpack_from(">I", payload)
                if payload[4:] == BASE_ALLOCATION:
                    found = context_id
            rtype, payload = self._option_reply(OPT_SET_META_CONTEXT)
        # An error (or no context) only means: no block status.
        self._meta_id = found if rtype == REP_ACK else None

    def _go(self) -> None:
        name = self.address.export.encode()
        data = (struct.pack(">I", len(name)) + name
                + struct.pack(">HH", 1, INFO_BLOCK_SIZE))
        rtype, payload = self._option(OPT_GO, data)
        have_export = False
        while rtype == REP_INFO:
            if len(payload) >= 2:
                (info,) = struct.unpack_from(">H", payload)
                if info == INFO_EXPORT and len(payload) >= 12:
                    self.size, self.flags = struct.unpack_from(
                        ">QH", payload, 2)
                    have_export = True
                elif info == INFO_BLOCK_SIZE and len(payload) >= 14:
                    self._block_sizes(*struct.unpack_from(">III", payload, 2))
            rtype, payload = self._option_reply(OPT_GO)
        if rtype == REP_ERR_UNSUP:
            self._export_name()
            return
        if rtype != REP_ACK:
            reason = REP_ERRORS.get(rtype, f"error {rtype:#x}")
            message = payload.decode("utf-8", "replace").strip()
            if message:
                reason = f"{reason}: {message}"
            raise self._fail(
                f"the server refused export {self.address.export!r} "
                f"({reason})")
        if not have_export:
            raise self._fail("protocol error: no export size from the server")

    def _export_name(self) -> None:
        """The old way in, for servers without NBD_OPT_GO."""
        name = self.address.export.encode()
        self._send(_OPTION.pack(IHAVEOPT, OPT_EXPORT_NAME, len(name)) + name,
                   "during the handshake")
        # A server that refuses an export here can only hang up.
        during = (f"during the handshake (export "
                  f"{self.address.export!r} refused?)")
        self.size, self.flags = struct.unpack(">QH", self._recv(10, during))
        if not self._no_zeroes:
            self._recv(124, during)

    def _block_sizes(self, minimum: int, preferred: int,
                     maximum: int) -> None:
        # Keep the defaults for values the protocol does not allow.
        if 1 <= minimum <= 65536 and minimum & (minimum - 1) == 0:
            self.min_block = minimum
        if preferred >= self.min_block:
            self.preferred_block = preferred
        if maximum >= self.min_block:
            self.max_block = maximum

    # Transmission.

    def _next_handle(self) -> int:
        self._handle = (self._handle + 1) & 0xFFFFFFFFFFFFFFFF
        return self._handle

    def _check_usable(self) -> None:
        if self._failure is not None:
            # Another thread may be the first to see it: name the cause.
            raise NbdError(f"{self.uri}: {self._failure}")
        if self._sock is None:
            raise NbdError(f"{self.uri}: the connection is closed")

    def read_into(self, offset: int, buf) -> None:
        """Fill buf with the export's bytes at offset, many requests at once."""
        self._check_usable()
        view = memoryview(buf).cast("B")
        end = offset + len(view)
        if offset < 0 or end > self.size:
            raise ValueError(
                f"read of {len(view)} bytes at {offset} is outside "
                f"{self.uri} (size {self.size})")
        inflight = {}
        pos = offset
        step = self.request_size
        while pos < end or inflight:
            if pos < end and len(inflight) < DEPTH:
                requests = []
                while pos < end and len(inflight) < DEPTH:
                    n = min(step, end - pos)
                    handle = self._next_handle()
                    inflight[handle] = _Read(
                        pos, view[pos - offset:pos - offset + n])
                    requests.append(_REQUEST.pack(
                        REQUEST_MAGIC, 0, CMD_READ, handle, pos, n))
                    pos += n
                self._send(b"".join(requests),
                           f"while sending reads at offset {offset}")
            self._receive_read(inflight)

    def _receive_read(self, inflight: dict) -> None:
        """Take one reply (simple) or one chunk (structured) off the wire."""
        header = memoryview(self._header)
        self._recv_into(header[:4], "while waiting for a read reply")
        (magic,) = struct.unpack_from(">I", header)
        if magic == SIMPLE_REPLY_MAGIC:
            self._recv_into(header[4:16], "while receiving a read reply")
            error, handle = _SIMPLE_REST.unpack_from(header, 4)
            req = inflight.pop(handle, None)
            if req is None:
                raise self._fail("protocol error: reply to an unknown request")
            if error:
                raise self._fail(self._read_error(req, error))
            self._recv_into(req.view,
                            f"while reading {len(req.view)} bytes at "
                            f"offset {req.offset}")
            return
        if magic != STRUCTURED_REPLY_MAGIC or not self.structured:
            raise self._fail(f"protocol error: bad reply magic {magic:#x}")
        self._recv_into(header[4:20], "while receiving a read reply")
        flags, rtype, handle, length = _STRUCTURED_REST.unpack_from(header, 4)
        req = inflight.get(handle)
        if req is None:
            raise self._fail("protocol error: reply to an unknown request")
        size = len(req.view)
        during = f"while reading {size} bytes at offset {req.offset}"
        if rtype == REPLY_TYPE_OFFSET_DATA:
            if length < 9:
                raise self._fail("protocol error: short data chunk")
            (start,) = struct.unpack(">Q", self._recv(8, during))
            begin = start - req.offset
            n = length - 8
            if begin < 0 or begin + n > size:
                raise self._fail("protocol error: data outside the request")
            self._recv_into(req.view[begin:begin + n], during)
            req.received += n
        elif rtype == REPLY_TYPE_OFFSET_HOLE:
            if length != 12:
                raise self._fail("protocol error: bad hole chunk")
            start, n = struct.unpack(">QI", self._recv(12, during))
            begin = start - req.offset
            if begin < 0 or begin + n > size:
                raise self._fail("protocol error: hole outside the request")
            _fill_zeros(req.view[begin:begin + n])
            req.received += n
        elif rtype & REPLY_TYPE_ERROR_BIT:
            req.error = self._error_chunk(length, during)
        elif rtype != REPLY_TYPE_NONE or length:
            raise self._fail(f"protocol error: unexpected chunk type {rtype}")
        if flags & REPLY_FLAG_DONE:
            del inflight[handle]
            if req.error:
                raise self._fail(f"the server failed {during}: {req.error}")
            if req.received != size:
                raise self._fail(
                    f"short reply to a read of {size} bytes at offset "
                    f"{req.offset}: the server sent {req.received} bytes")

    def _read_error(self, req: _Read, error: int) -> str:
        return (f"the server failed reading {len(req.view)} bytes at offset "
                f"{req.offset}: {ERRORS.get(error, f'error {error}')}")

    def _error_chunk(self, length: int, during: str) -> str:
        payload = self._recv(length, during)
        if len(payload) < 6:
            raise self._fail("protocol error: short error chunk")
        error, mlen = struct.unpack_from(">IH", payload)
        message = payload[6:6 + mlen].decode("utf-8", "replace").strip()
        name = ERRORS.get(error, f"error {error}")
        return f"{name}: {message}" if message else name

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """[(length, flags)] of base:allocation from offset, in order.

        The extents may cover less than length (the server decides), never
        more: the last one is cut at offset + length.  At least one.
        """
        self._check_usable()
        if not self.has_block_status:
            raise ValueError(f"{self.uri}: no block status negotiated")
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise ValueError(f"block status of {length} bytes at {offset} is "
                             f"outside {self.uri} (size {self.size})")
        handle = self._next_handle()
        during = f"while asking for block status at offset {offset}"
        self._send(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_BLOCK_STATUS, handle,
                                 offset, length), during)
        extents = []
        error = None
        header = memoryview(self._header)
        while True:
            self._recv_into(header[:4], during)
            (magic,) = struct.unpack_from(">I", header)
            if magic == SIMPLE_REPLY_MAGIC:
                # Allowed only for an error without payload.
                self._recv_into(header[4:16], during)
                err, got = _SIMPLE_REST.unpack_from(header, 4)
                if got != handle or not err:
                    raise self._fail("protocol error: bad block status reply")
                raise self._fail(f"the server failed {during}: "
                                 f"{ERRORS.get(err, f'error {err}')}")
            if magic != STRUCTURED_REPLY_MAGIC:
                raise self._fail(f"protocol error: bad reply magic {magic:#x}")
            self._recv_into(header[4:20], during)
            flags, rtype, got, size = _STRUCTURED_REST.unpack_from(header, 4)
            if got != handle:
                raise self._fail("protocol error: reply to an unknown request")
            if rtype == REPLY_TYPE_BLOCK_STATUS:
                if size < 12 or (size - 4) % 8:
                    raise self._fail("protocol error: bad block status chunk")
                payload = self._recv(size, during)
                (context,) = struct.unpack_from(">I", payload)
                if context == self._meta_id:
                    extents = list(struct.iter_unpack(">II", payload[4:]))
            elif rtype & REPLY_TYPE_ERROR_BIT:
                error = self._error_chunk(size, during)
            elif rtype != REPLY_TYPE_NONE or size:
                raise self._fail(
                    f"protocol error: unexpected chunk type {rtype}")
            if flags & REPLY_FLAG_DONE:
                break
        if error:
            raise self._fail(f"the server failed {during}: {error}")
        if not extents or any(n == 0 for n, _ in extents):
            raise self._fail("protocol error: empty block status")
        # The last extent may reach past the request: cut it there.
        out, pos, end = [], offset, offset + length
        for n, state in extents:
            n = min(n, end - pos)
            if n <= 0:
                break
            out.append((n, state))
            pos += n
        return out

    def close(self) -> None:
        """Say goodbye (NBD_CMD_DISC) if the connection is sound, then close."""
        if self._sock is None:
            return
        try:
            if self._failure is None:
                self._sock.sendall(_REQUEST.pack(
                    REQUEST_MAGIC, 0, CMD_DISC, self._next_handle(), 0, 0))
        except OSError:
            pass
        finally:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"<nbd.Client {self.uri!r} size={self.size} "
                f"flags={self.flags:#x}>")


_ZEROS = bytes(REQUEST_SIZE)


def _fill_zeros(view: memoryview) -> None:
    for start in range(0, len(view), len(_ZEROS)):
        part = view[start:start + len(_ZEROS)]
        part[:] = _ZEROS[:len(part)]
