"""A small NBD client of our own: read-only, made to read whole exports fast.

It speaks the client side of the NBD protocol (NetworkBlockDevice/nbd,
doc/proto.md) that digest, compare and check need, and nothing else:

- fixed newstyle handshake; NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE, with
  NBD_OPT_EXPORT_NAME as the fallback the protocol asks for;
- NBD_OPT_STRUCTURED_REPLY and NBD_OPT_SET_META_CONTEXT "base:allocation"
  when the server offers them (qemu-nbd and nbdkit do; nbd-server 3.24 does
  not), so block_status() can tell holes from data; or, if the caller asks,
  another single context, e.g. "qemu:dirty-bitmap:NAME" for QEMU's dirty
  bitmaps (flag 1 = dirty);
- NBD_CMD_READ, pipelined: one read_into() of a large buffer (or one
  read_many() of scattered pieces) sends up to
  DEPTH requests of REQUEST_SIZE (bounded by the server's maximum block
  size) before it waits, and each reply lands straight in its place in
  the caller's buffer::

      buffer  |  req 0  |  req 1  |  req 2  |  ...  |  req 15 |
      send    h0 h1 h2 ... h15            (one write, 28 bytes each)
      receive       reply h1 -> req 1, reply h0 -> req 0, ...
      send                    h16 as soon as one reply is complete

- NBD_OPT_STARTTLS first for nbds:// (nbdconn.py, tls.py);
- NBD_CMD_DISC on close(), always while the connection is sound: over
  TLS, nbd-server 3.24 spins at full CPU behind a client that sends TLS's
  close_notify without it (measured; we never send close_notify, and a
  connection that failed is closed bare, which ends the server's child).

This module is the transmission phase; nbdconn.py holds the socket and the
handshake, nbdproto.py the wire format and the URIs.

One Client is one connection, used by one thread at a time.  Several
connections to one export are the caller's business (sources.NbdSource
opens them when the server advertises NBD_FLAG_CAN_MULTI_CONN).

URIs follow the NBD URI standard: ``nbd://host[:port]/export`` (port 10809
by default) and ``nbd+unix:///export?socket=PATH``; TLS in libnbd's form,
``nbds://host[:port]/export?tls-certificates=DIR`` and ``nbds+unix://``
(NBD_OPT_STARTTLS, then Python's ssl: tls.py).  vsock and TLS with a
pre-shared key are refused.  Every failure is an NbdError with a one-line
message (a TlsError, its kind, for what TLS's set-up must change).
"""

from __future__ import annotations

import bisect
import struct

from . import nbdconn
from .errors import NbdError
from .nbdproto import (BASE_ALLOCATION, CMD_BLOCK_STATUS, CMD_DISC,
                       CMD_READ, FLAG_CAN_MULTI_CONN, REPLY_FLAG_DONE,
                       REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR_BIT,
                       REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
                       REPLY_TYPE_OFFSET_HOLE, SIMPLE_REPLY_MAGIC, SIMPLE_REST,
                       STRUCTURED_REPLY_MAGIC, STRUCTURED_REST, Address,
                       clip_extents, error_chunk, error_name, parse_uri,
                       request)

__all__ = ["Address", "Client", "NbdError", "parse_uri", "DEFAULT_TIMEOUT",
           "REQUEST_SIZE", "DEPTH"]

# Seconds one send or receive may wait: a hung server must not hang a cron job.
DEFAULT_TIMEOUT = 60.0
# Read requests: 2 MiB each, 16 in flight per connection.
REQUEST_SIZE = 2 * 1024 * 1024
DEPTH = 16


class _Read:
    """One NBD_CMD_READ in flight: where its bytes go, which came.

    The chunks of a structured reply may come in any order but must not
    overlap (doc/proto.md, "Structured reply chunk message types"), so
    counting bytes is not enough: two chunks over one range plus a range
    that no chunk filled add up to the right count.  ``spans`` holds the
    ranges received, relative to offset, sorted and merged where they
    touch; with no overlap, ``received == len(view)`` means every byte.
    """

    __slots__ = ("offset", "view", "received", "error", "spans")

    def __init__(self, offset: int, view: memoryview):
        self.offset = offset
        self.view = view
        self.received = 0
        self.error = None
        self.spans = []     # [[begin, end]], sorted, disjoint

    def cover(self, begin: int, end: int) -> bool:
        """Record [begin, end) as received; False if it overlaps a range
        already received (then nothing is recorded)."""
        spans = self.spans
        if not spans or begin >= spans[-1][1]:
            # In order, the usual case: a server sends chunks ascending.
            if spans and begin == spans[-1][1]:
                spans[-1][1] = end
            else:
                spans.append([begin, end])
        else:
            i = bisect.bisect_right(spans, [begin, end])
            if i and spans[i - 1][1] > begin:
                return False
            if i < len(spans) and spans[i][0] < end:
                return False
            spans.insert(i, [begin, end])
        self.received += end - begin
        return True


class Client:
    """One connection to one export, handshake done, ready to read."""

    def __init__(self, uri: str, timeout: float = DEFAULT_TIMEOUT,
                 meta_context: str = BASE_ALLOCATION):
        self.uri = uri
        self.address = parse_uri(uri)
        self.meta_context = meta_context
        self._conn = nbdconn.Connection(uri, self.address, timeout)
        try:
            self.export = nbdconn.handshake(self._conn, self.address,
                                            meta_context)
        except BaseException:
            self._conn.close()
            raise
        self.size = self.export.size
        self.flags = self.export.flags
        self.structured = self.export.structured
        self._handle = 0
        self._header = bytearray(20)
        # Requests never cross the server's limits (see "Block size
        # constraints").
        size = min(REQUEST_SIZE, self.export.max_block)
        self.request_size = max(self.export.min_block,
                                size - size % self.export.min_block)

    # Properties of the export.

    @property
    def name(self) -> str:
        """What errors call it: a source's name (readers.SourceReader)."""
        return self.uri

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & FLAG_CAN_MULTI_CONN)

    @property
    def has_block_status(self) -> bool:
        return self.export.meta_id is not None

    def _next_handle(self) -> int:
        self._handle = (self._handle + 1) & 0xFFFFFFFFFFFFFFFF
        return self._handle

    # Reads.

    def read_into(self, offset: int, buf) -> None:
        """Fill buf with the export's bytes at offset, many requests at
        once."""
        self.read_many([(offset, buf)])

    def read_many(self, pieces) -> None:
        """Fill each (offset, buf) of pieces, in one pipeline: scattered
        blocks cost one round trip per DEPTH requests, not one each."""
        self._conn.check_usable()
        todo = []
        for offset, buf in pieces:
            view = memoryview(buf).cast("B")
            if offset < 0 or offset + len(view) > self.size:
                raise ValueError(
                    f"read of {len(view)} bytes at {offset} is outside "
                    f"{self.uri} (size {self.size})")
            step = self.request_size
            for start in range(0, len(view), step):
                todo.append((offset + start, view[start:start + step]))
        todo.reverse()
        inflight = {}
        while todo or inflight:
            if todo and len(inflight) < DEPTH:
                requests = []
                first = todo[-1][0]
                while todo and len(inflight) < DEPTH:
                    pos, part = todo.pop()
                    handle = self._next_handle()
                    inflight[handle] = _Read(pos, part)
                    requests.append(request(CMD_READ, handle, pos,
                                            len(part)))
                self._conn.send(b"".join(requests),
                                f"while sending reads at offset {first}")
            self._receive_read(inflight)

    def _receive_read(self, inflight: dict) -> None:
        """Take one reply (simple) or one chunk (structured) off the wire."""
        conn = self._conn
        header = memoryview(self._header)
        conn.recv_into(header[:4], "while waiting for a read reply")
        (magic,) = struct.unpack_from(">I", header)
        if magic == SIMPLE_REPLY_MAGIC:
            conn.recv_into(header[4:16], "while receiving a read reply")
            error, handle = SIMPLE_REST.unpack_from(header, 4)
            req = inflight.pop(handle, None)
            if req is None:
                raise conn.fail("protocol error: reply to an unknown request")
            if error:
                raise conn.fail(
                    f"the server failed reading {len(req.view)} bytes at "
                    f"offset {req.offset}: {error_name(error)}")
            conn.recv_into(req.view, f"while reading {len(req.view)} bytes "
                                     f"at offset {req.offset}")
            return
        if magic != STRUCTURED_REPLY_MAGIC or not self.structured:
            raise conn.fail(f"protocol error: bad reply magic {magic:#x}")
        conn.recv_into(header[4:20], "while receiving a read reply")
        flags, rtype, handle, length = STRUCTURED_REST.unpack_from(header, 4)
        req = inflight.get(handle)
        if req is None:
            raise conn.fail("protocol error: reply to an unknown request")
        size = len(req.view)
        during = f"while reading {size} bytes at offset {req.offset}"
        if rtype == REPLY_TYPE_OFFSET_DATA:
            if length < 9:
                raise conn.fail("protocol error: short data chunk")
            (start,) = struct.unpack(">Q", conn.recv(8, during))
            begin = start - req.offset
            n = length - 8
            if begin < 0 or begin + n > size:
                raise conn.fail("protocol error: data outside the request")
            if not req.cover(begin, begin + n):
                raise conn.fail(f"protocol error: overlapping chunks {during}")
            conn.recv_into(req.view[begin:begin + n], during)
        elif rtype == REPLY_TYPE_OFFSET_HOLE:
            if length != 12:
                raise conn.fail("protocol error: bad hole chunk")
            start, n = struct.unpack(">QI", conn.recv(12, during))
            begin = start - req.offset
            if n == 0:
                raise conn.fail("protocol error: empty hole chunk")
            if begin < 0 or begin + n > size:
                raise conn.fail("protocol error: hole outside the request")
            if not req.cover(begin, begin + n):
                raise conn.fail(f"protocol error: overlapping chunks {during}")
            _fill_zeros(req.view[begin:begin + n])
        elif rtype & REPLY_TYPE_ERROR_BIT:
            req.error = self._error_chunk(length, during)
        elif rtype != REPLY_TYPE_NONE or length:
            raise conn.fail(f"protocol error: unexpected chunk type {rtype}")
        if flags & REPLY_FLAG_DONE:
            del inflight[handle]
            if req.error:
                raise conn.fail(f"the server failed {during}: {req.error}")
            if req.received != size:
                raise conn.fail(
                    f"short reply to a read of {size} bytes at offset "
                    f"{req.offset}: the server sent {req.received} bytes")

    def _error_chunk(self, length: int, during: str) -> str:
        message = error_chunk(self._conn.recv(length, during))
        if message is None:
            raise self._conn.fail("protocol error: short error chunk")
        return message

    # Block status.

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """[(length, flags)] of the meta context from offset, in order.

        The extents may cover less than length (the server decides), never
        more: the last one is cut at offset + length.  At least one.
        """
        conn = self._conn
        conn.check_usable()
        if not self.has_block_status:
            raise ValueError(f"{self.uri}: no block status negotiated "
                             f"({self.meta_context})")
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise ValueError(f"block status of {length} bytes at {offset} is "
                             f"outside {self.uri} (size {self.size})")
        handle = self._next_handle()
        during = f"while asking for block status at offset {offset}"
        conn.send(request(CMD_BLOCK_STATUS, handle, offset, length), during)
        extents = []
        error = None
        header = memoryview(self._header)
        while True:
            conn.recv_into(header[:4], during)
            (magic,) = struct.unpack_from(">I", header)
            if magic == SIMPLE_REPLY_MAGIC:
                # Allowed only for an error without payload.
                conn.recv_into(header[4:16], during)
                err, got = SIMPLE_REST.unpack_from(header, 4)
                if got != handle or not err:
                    raise conn.fail("protocol error: bad block status reply")
                raise conn.fail(
                    f"the server failed {during}: {error_name(err)}")
            if magic != STRUCTURED_REPLY_MAGIC:
                raise conn.fail(f"protocol error: bad reply magic {magic:#x}")
            conn.recv_into(header[4:20], during)
            flags, rtype, got, size = STRUCTURED_REST.unpack_from(header, 4)
            if got != handle:
                raise conn.fail("protocol error: reply to an unknown request")
            if rtype == REPLY_TYPE_BLOCK_STATUS:
                if size < 12 or (size - 4) % 8:
                    raise conn.fail("protocol error: bad block status chunk")
                payload = conn.recv(size, during)
                (context,) = struct.unpack_from(">I", payload)
                if context == self.export.meta_id:
                    extents = list(struct.iter_unpack(">II", payload[4:]))
            elif rtype & REPLY_TYPE_ERROR_BIT:
                error = self._error_chunk(size, during)
            elif rtype != REPLY_TYPE_NONE or size:
                raise conn.fail(
                    f"protocol error: unexpected chunk type {rtype}")
            if flags & REPLY_FLAG_DONE:
                break
        if error:
            raise conn.fail(f"the server failed {during}: {error}")
        if not extents or any(n == 0 for n, _ in extents):
            raise conn.fail("protocol error: empty block status")
        return clip_extents(extents, offset, length)

    def close(self) -> None:
        """Say goodbye (NBD_CMD_DISC) if the connection is sound, then close."""
        self._conn.close(request(CMD_DISC, self._next_handle()))

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
