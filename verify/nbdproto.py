"""The NBD protocol's wire format, as far as our client speaks it.

Numbers and layouts from NetworkBlockDevice/nbd, doc/proto.md; URIs from
its doc/uri.md, with libnbd's TLS query parameters (nbd_connect_uri(3)).
Nothing here does I/O: these functions build the bytes the client sends
and read the bytes it receives, so they are tested with fixed answers.
Every integer on the wire is big-endian::

    request        magic:4  flags:2  type:2  handle:8  offset:8  length:4
    option         IHAVEOPT:8  option:4  length:4  data
    option reply   magic:8  option:4  type:4  length:4  data
    simple reply   magic:4  error:4  handle:8  [data]
    chunk          magic:4  flags:2  type:2  handle:8  length:4  payload
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Optional
from urllib.parse import unquote, urlsplit

from .errors import SourceError, UnsupportedSource

DEFAULT_PORT = 10809

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
OPT_STARTTLS = 5
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10

# Option replies; errors have bit 31 set.
REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_UNKNOWN = REP_ERR | 6
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
BASE_ALLOCATION = "base:allocation"
# qemu:dirty-bitmap:NAME flags (QEMU's docs/interop/nbd.txt).
STATE_DIRTY = 1 << 0
DIRTY_BITMAP = "qemu:dirty-bitmap:"

# Transmission errors (the protocol's own values, errno-like).
ERRORS = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC",
          75: "EOVERFLOW", 95: "ENOTSUP", 108: "ESHUTDOWN"}

# Largest option reply we accept: info, context names and messages are small.
MAX_OPTION_REPLY = 64 * 1024

REQUEST = struct.Struct(">IHHQQI")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")   # magic, option, type, length
SIMPLE_REST = struct.Struct(">IQ")      # after the magic: error, handle
STRUCTURED_REST = struct.Struct(">HHQI")    # flags, type, handle, length

_TCP_SCHEMES = ("nbd", "nbds")
_UNIX_SCHEMES = ("nbd+unix", "nbds+unix")
_UNSUPPORTED_SCHEMES = ("nbd+vsock", "nbds+vsock")
# libnbd's booleans (tls-verify-peer=...).
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class Address(NamedTuple):
    """Where an export is: a TCP host and port, or a Unix socket; and
    whether to speak TLS there (nbds), with which certificate folder
    (None: libnbd's defaults, see tls.py)."""

    export: str
    host: Optional[str] = None
    port: int = DEFAULT_PORT
    socket_path: Optional[str] = None
    tls: bool = False
    certificates: Optional[str] = None
    verify_peer: bool = True

    def __str__(self):
        if self.socket_path is not None:
            return self.socket_path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_uri(uri: str) -> Address:
    """nbd[s]://host[:port]/export or nbd[s]+unix:///export?socket=PATH,
    with libnbd's tls-certificates=DIR and tls-verify-peer=BOOL."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as e:
        raise SourceError(f"{uri}: invalid NBD URI: {e}") from None
    scheme = parts.scheme.lower()
    if scheme in _UNSUPPORTED_SCHEMES:
        raise UnsupportedSource(
            f"{uri}: {scheme}:// is not supported (no vsock); use "
            f"nbd[s]:// or nbd[s]+unix://")
    if scheme not in _TCP_SCHEMES + _UNIX_SCHEMES:
        raise SourceError(f"{uri}: not an NBD URI")
    export = unquote(parts.path[1:] if parts.path.startswith("/")
                     else parts.path)
    query = _query(parts.query)
    tls = _tls(uri, scheme.startswith("nbds"), query)
    if scheme in _UNIX_SCHEMES:
        paths = query.get("socket")
        if parts.hostname or not paths or not paths[0]:
            raise SourceError(
                f"{uri}: {scheme} needs no host and a socket: "
                f"{scheme}:///EXPORT?socket=PATH")
        return Address(export, socket_path=paths[0], **tls)
    if not parts.hostname:
        raise SourceError(f"{uri}: no host: {scheme}://HOST[:PORT]/EXPORT")
    return Address(export, host=parts.hostname,
                   port=port if port is not None else DEFAULT_PORT, **tls)


def _query(text: str) -> dict:
    """{name: [values]} as libnbd reads a query: split on "&", each part
    %-unquoted, "+" kept (it is no space in a path)."""
    query = {}
    for part in text.split("&") if text else ():
        name, _, value = part.partition("=")
        query.setdefault(unquote(name), []).append(unquote(value))
    return query


def _tls(uri: str, tls: bool, query: dict) -> dict:
    """Address's TLS fields from the query; PSK refused.  TLS settings on
    a plain nbd:// are refused: libnbd ignores them, and whoever wrote
    them believes the copy goes encrypted."""
    if not tls:
        given = sorted(k for k in query if k.startswith("tls-"))
        if given:
            raise SourceError(
                f"{uri}: {', '.join(given)} with a plain-text URI: use "
                f"nbds:// for TLS")
        return {}
    if "tls-psk-file" in query or "tls-username" in query:
        raise UnsupportedSource(
            f"{uri}: TLS with a pre-shared key (tls-psk-file, tls-username) "
            f"is not supported; use certificates (tls-certificates=DIR)")
    certificates = query.get("tls-certificates", [None])[-1]
    verify = query.get("tls-verify-peer", ["true"])[-1].lower()
    if verify not in _TRUE + _FALSE:
        raise SourceError(f"{uri}: tls-verify-peer={verify}: not a boolean "
                          f"(true or false)")
    return {"tls": True, "certificates": certificates or None,
            "verify_peer": verify in _TRUE}


def request(command: int, handle: int, offset: int = 0,
            length: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, 0, command, handle, offset, length)


def option(opt: int, data: bytes = b"") -> bytes:
    return OPTION.pack(IHAVEOPT, opt, len(data)) + data


def go_data(export: str) -> bytes:
    """NBD_OPT_GO's data: the export, and NBD_INFO_BLOCK_SIZE asked for."""
    name = export.encode()
    return (struct.pack(">I", len(name)) + name
            + struct.pack(">HH", 1, INFO_BLOCK_SIZE))


def meta_context_data(export: str,
                      context: str = BASE_ALLOCATION) -> bytes:
    """NBD_OPT_SET_META_CONTEXT's data: one context (base:allocation
    unless told) of the export."""
    name = export.encode()
    query = context.encode()
    return (struct.pack(">I", len(name)) + name
            + struct.pack(">II", 1, len(query)) + query)


def error_name(error: int) -> str:
    """EIO for 5: the name of a transmission error."""
    return ERRORS.get(error, f"error {error}")


def error_chunk(payload: bytes) -> Optional[str]:
    """The "EIO: message" of an error chunk's payload; None if too short."""
    if len(payload) < 6:
        return None
    error, mlen = struct.unpack_from(">IH", payload)
    message = printable(payload[6:6 + mlen])
    name = error_name(error)
    return f"{name}: {message}" if message else name


def printable(payload: bytes, limit: int = 200) -> str:
    """A server's text as one line of ours: before TLS anyone on the way
    may write it, so no newline, no terminal escape, and not too long."""
    text = payload.decode("utf-8", "replace").strip()
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def refusal(rtype: int, payload: bytes) -> str:
    """Why an option failed: the error reply's name and its message."""
    reason = REP_ERRORS.get(rtype, f"error {rtype:#x}")
    message = printable(payload)
    return f"{reason}: {message}" if message else reason


def clip_extents(extents: list, offset: int,
                 length: int) -> list[tuple[int, int]]:
    """[(length, flags)] cut at offset + length: the last extent of a block
    status reply may reach past the range asked for."""
    out, pos, end = [], offset, offset + length
    for n, state in extents:
        n = min(n, end - pos)
        if n <= 0:
            break
        out.append((n, state))
        pos += n
    return out
