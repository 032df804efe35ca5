"""One connection to an NBD server: the socket, its errors, the handshake.

Connection wraps the socket so that every failure is one NbdError line,
and so that a connection that failed once (its stream is then in an
unknown state) is not used again.  handshake() opens an export on it, the
fixed newstyle way::

    server  NBDMAGIC IHAVEOPT flags      client  flags
    client  NBD_OPT_STARTTLS                    (nbds:// only)
                                                <- ACK, then the TLS handshake;
                                                   every byte after it is TLS
    client  NBD_OPT_STRUCTURED_REPLY            <- ACK, or else simple replies
    client  NBD_OPT_SET_META_CONTEXT base:allocation    (structured only)
                                                <- META_CONTEXT id ... ACK
    client  NBD_OPT_GO export + NBD_INFO_BLOCK_SIZE
                                                <- INFO export, INFO sizes, ACK
            (NBD_OPT_EXPORT_NAME instead, where GO is unsupported)

Structured replies and base:allocation are asked for whenever the server
offers them (qemu-nbd and nbdkit do; nbd-server 3.24 does not): without
them block status cannot tell holes from data.  A caller may ask for
another context instead (one at a time), such as QEMU's
qemu:dirty-bitmap:NAME, which hooks/bitmaps.py reads.

A server that requires TLS answers a plain client's options with
NBD_REP_ERR_TLS_REQD (nbd-server: every option with force_tls in
[generic], NBD_OPT_GO with force_tls on the export); that is one line
saying to use nbds://.  A server that does not accept our certificate
ends the session right after the TLS handshake (TLS 1.3 checks the
client's certificate after the client has finished): the first option
after it that finds the connection gone says so.
"""

from __future__ import annotations

import socket
import ssl
import struct
from typing import Optional

from . import tls as tlsmod
from .errors import NbdError, TlsError, UnknownExport
from .nbdproto import (BASE_ALLOCATION, CLISERV_MAGIC, FLAG_C_FIXED_NEWSTYLE,
                       FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES,
                       IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT,
                       MAX_OPTION_REPLY, NBDMAGIC, OPT_EXPORT_NAME, OPT_GO,
                       OPT_SET_META_CONTEXT, OPT_STARTTLS,
                       OPT_STRUCTURED_REPLY, OPTION_REPLY, OPTION_REPLY_MAGIC,
                       REP_ACK, REP_ERR_TLS_REQD, REP_ERR_UNKNOWN,
                       REP_ERR_UNSUP, REP_INFO,
                       REP_META_CONTEXT, Address,
                       go_data, meta_context_data, option, refusal)

_DURING = "during the handshake"


class Connection:
    """A socket to an NBD server that fails with one-line NbdErrors."""

    def __init__(self, uri: str, address: Address, timeout: float):
        self.uri = uri
        # The first failure, once the connection is in an unknown state.
        self.failure = None
        # Certificates first: a bad folder is found before the network.
        self.tls = None
        if address.tls:
            try:
                self.tls = tlsmod.setup(address.certificates,
                                        address.verify_peer,
                                        address.socket_path is None)
            except TlsError as e:
                raise TlsError(f"{uri}: {e}") from None
        self._sock = _connect(uri, address, timeout)
        # While set, every receive asks TCP for an immediate ACK (see
        # handshake()).
        self.quickack = False

    def fail(self, what: str) -> NbdError:
        """The error to raise; the connection is not used again after it."""
        if self.failure is None:
            self.failure = what
        return NbdError(f"{self.uri}: {what}")

    def fail_tls(self, what: str) -> TlsError:
        """fail(), for what TLS's configuration must change."""
        return TlsError(str(self.fail(what)))

    @property
    def is_tcp(self) -> bool:
        return self._sock is not None and \
            self._sock.family in (socket.AF_INET, socket.AF_INET6)

    def check_usable(self) -> None:
        if self.failure is not None:
            # Another thread may be the first to see it: name the cause.
            raise NbdError(f"{self.uri}: {self.failure}")
        if self._sock is None:
            raise NbdError(f"{self.uri}: the connection is closed")

    def recv_into(self, view: memoryview, during: str) -> None:
        """Fill view from the socket, or fail with a one-line error."""
        done, total = 0, len(view)
        recv_into = self._sock.recv_into
        try:
            while done < total:
                if self.quickack:
                    self._sock.setsockopt(socket.IPPROTO_TCP,
                                          socket.TCP_QUICKACK, 1)
                n = recv_into(view[done:])
                if n == 0:
                    raise self.fail(
                        f"the server closed the connection {during}")
                done += n
        except socket.timeout:
            raise self.fail(f"timed out {during}") from None
        except NbdError:
            raise
        except ssl.SSLError as e:
            raise self.fail(f"TLS error {during}: "
                            f"{tlsmod.reason(e)}") from None
        except OSError as e:
            raise self.fail(f"connection lost {during}: "
                            f"{e.strerror or e}") from None

    def recv(self, n: int, during: str) -> bytes:
        buf = bytearray(n)
        self.recv_into(memoryview(buf), during)
        return bytes(buf)

    def send(self, data, during: str) -> None:
        try:
            self._sock.sendall(data)
        except socket.timeout:
            raise self.fail(f"timed out {during}") from None
        except OSError as e:
            raise self.fail(f"connection lost {during}: "
                            f"{e.strerror or e}") from None

    def start_tls(self, host: Optional[str]) -> None:
        """The TLS handshake, once the server ACKed NBD_OPT_STARTTLS."""
        try:
            self._sock = tlsmod.wrap(self._sock, self.tls, host,
                                     self.quickack)
        except TlsError as e:
            raise self.fail_tls(str(e)) from None
        except NbdError as e:       # timed out: the connection is done
            raise self.fail(str(e)) from None

    def close(self, goodbye: bytes = b"") -> None:
        """Send goodbye if the connection is sound, then close it."""
        if self._sock is None:
            return
        try:
            if self.failure is None and goodbye:
                self._sock.sendall(goodbye)
        except OSError:
            pass
        finally:
            self._sock.close()
            self._sock = None


def _connect(uri: str, addr: Address, timeout: float) -> socket.socket:
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
            f"{uri}: cannot resolve {addr.host}: {e.strerror}") from None
    except UnicodeError:
        # The idna codec: a label longer than 63 characters, say.
        raise NbdError(f"{uri}: cannot resolve {addr.host}: not a valid "
                       f"host name") from None
    except socket.timeout:
        raise NbdError(
            f"{uri}: cannot connect to {addr}: timed out") from None
    except OSError as e:
        raise NbdError(
            f"{uri}: cannot connect to {addr}: {e.strerror or e}") from None
    return sock


class Export:
    """What the handshake learnt about an export."""

    def __init__(self):
        self.size = 0
        self.flags = 0
        # Block size constraints; the protocol's defaults until the server
        # says otherwise (and 32 MiB, the safe maximum, for requests).
        self.min_block = 1
        self.preferred_block = 4096
        self.max_block = 32 * 1024 * 1024
        self.structured = False
        self.meta_id: Optional[int] = None  # the context's, if selected

    def block_sizes(self, minimum: int, preferred: int, maximum: int) -> None:
        # Keep the defaults for values the protocol does not allow.
        if 1 <= minimum <= 65536 and minimum & (minimum - 1) == 0:
            self.min_block = minimum
        if preferred >= self.min_block:
            self.preferred_block = preferred
        if maximum >= self.min_block:
            self.max_block = maximum


def handshake(conn: Connection, address: Address,
              meta_context: str = BASE_ALLOCATION) -> Export:
    """Negotiate the export at address, and meta_context for block status
    if the server has it; fail in one line if the export cannot be had."""
    # nbd-server 3.24 answers an option in two writes before it sets
    # TCP_NODELAY, and Nagle holds the second until we ACK the first:
    # our delayed ACK cost 41 ms per handshake (strace).  TCP_QUICKACK is
    # not sticky, so it is asked for before every receive until the
    # handshake is done.
    conn.quickack = conn.is_tcp
    try:
        return _handshake(conn, address, meta_context)
    finally:
        conn.quickack = False


def _handshake(conn: Connection, address: Address,
               meta_context: str) -> Export:
    magic, second, hflags = struct.unpack(">QQH", conn.recv(18, _DURING))
    if magic != NBDMAGIC:
        raise conn.fail(f"{address} is not an NBD server")
    if second == CLISERV_MAGIC:
        raise conn.fail(
            "the server speaks the oldstyle handshake, not supported")
    if second != IHAVEOPT:
        raise conn.fail("unknown NBD handshake")
    if not hflags & FLAG_FIXED_NEWSTYLE:
        raise conn.fail(
            "the server does not support the fixed newstyle handshake")
    no_zeroes = bool(hflags & FLAG_NO_ZEROES)
    cflags = FLAG_C_FIXED_NEWSTYLE
    if no_zeroes:
        cflags |= FLAG_C_NO_ZEROES
    conn.send(struct.pack(">I", cflags), _DURING)

    export = Export()
    if conn.tls is not None:
        _starttls(conn, address)
        try:
            rtype, _ = _option(conn, OPT_STRUCTURED_REPLY, b"")
        except NbdError as e:
            if (conn.failure or "").startswith("timed out"):
                raise           # slow, not refused: worth running again
            raise conn.fail_tls(tlsmod.refused_client(
                conn.tls.files, conn.failure or str(e))) from None
    else:
        rtype, _ = _option(conn, OPT_STRUCTURED_REPLY, b"")
    export.structured = rtype == REP_ACK
    if export.structured:
        export.meta_id = _select_context(conn, address.export, meta_context)
    _go(conn, address.export, export, no_zeroes)
    return export


def _starttls(conn: Connection, address: Address) -> None:
    rtype, payload = _option(conn, OPT_STARTTLS, b"")
    if rtype != REP_ACK:
        raise conn.fail_tls(f"the server does not offer TLS "
                            f"({refusal(rtype, payload)})")
    conn.start_tls(address.host)


def _option(conn: Connection, opt: int, data: bytes) -> tuple[int, bytes]:
    """Send one option and return its first reply (type, data)."""
    conn.send(option(opt, data), _DURING)
    return _option_reply(conn, opt)


def _option_reply(conn: Connection, opt: int) -> tuple[int, bytes]:
    magic, got, rtype, length = OPTION_REPLY.unpack(
        conn.recv(OPTION_REPLY.size, _DURING))
    if magic != OPTION_REPLY_MAGIC or got != opt:
        raise conn.fail("protocol error: bad option reply")
    if length > MAX_OPTION_REPLY:
        raise conn.fail(f"protocol error: option reply of {length} bytes")
    return rtype, conn.recv(length, _DURING) if length else b""


def _select_context(conn: Connection, name: str,
                    context: str) -> Optional[int]:
    """The id of the meta context, or None: no block status."""
    rtype, payload = _option(conn, OPT_SET_META_CONTEXT,
                             meta_context_data(name, context))
    wanted = context.encode()
    found = None
    while rtype == REP_META_CONTEXT:
        if len(payload) >= 4:
            (context_id,) = struct.unpack_from(">I", payload)
            if payload[4:] == wanted:
                found = context_id
        rtype, payload = _option_reply(conn, OPT_SET_META_CONTEXT)
    # An error (or no context) only means: no block status.
    return found if rtype == REP_ACK else None


def _go(conn: Connection, name: str, export: Export,
        no_zeroes: bool) -> None:
    rtype, payload = _option(conn, OPT_GO, go_data(name))
    have_export = False
    while rtype == REP_INFO:
        if len(payload) >= 2:
            (info,) = struct.unpack_from(">H", payload)
            if info == INFO_EXPORT and len(payload) >= 12:
                export.size, export.flags = struct.unpack_from(
                    ">QH", payload, 2)
                have_export = True
            elif info == INFO_BLOCK_SIZE and len(payload) >= 14:
                export.block_sizes(*struct.unpack_from(">III", payload, 2))
        rtype, payload = _option_reply(conn, OPT_GO)
    if rtype == REP_ERR_UNSUP:
        _export_name(conn, name, export, no_zeroes)
        return
    if rtype == REP_ERR_TLS_REQD:
        raise conn.fail_tls(
            f"the server requires TLS for export {name!r}: use "
            f"nbds://HOST[:PORT]/EXPORT?tls-certificates=DIR")
    if rtype != REP_ACK:
        error = conn.fail(f"the server refused export {name!r} "
                          f"({refusal(rtype, payload)})")
        if rtype == REP_ERR_UNKNOWN:
            error = UnknownExport(str(error))
        raise error
    if not have_export:
        raise conn.fail("protocol error: no export size from the server")


def _export_name(conn: Connection, name: str, export: Export,
                 no_zeroes: bool) -> None:
    """The old way in, for servers without NBD_OPT_GO."""
    conn.send(option(OPT_EXPORT_NAME, name.encode()), _DURING)
    # A server that refuses an export here can only hang up.
    during = f"during the handshake (export {name!r} refused?)"
    export.size, export.flags = struct.unpack(">QH", conn.recv(10, during))
    if not no_zeroes:
        conn.recv(124, during)
