"""TLS for our NBD client: libnbd's certificate folder, Python's ssl.

A clone host names its folder as libnbd does, in the URI
(``nbds://HOST/EXPORT?tls-certificates=DIR``), and the folder holds what
libnbd reads there (lib/crypto.c, load_certificates)::

    DIR/ca-cert.pem        the CA the server's certificate must chain to
    DIR/client-cert.pem    ours, shown to the server      } both or neither
    DIR/client-key.pem     its key (not encrypted)        }
    DIR/ca-crl.pem         revoked certificates (optional)

Without tls-certificates, libnbd's defaults (nbd_set_tls_certificates(3)):
/etc/pki/libnbd for root; $HOME/.pki/libnbd, then $HOME/.config/pki/libnbd
for anyone else; the first holding ca-cert.pem counts, and with none the
system's trusted CAs verify the server and no certificate is shown.

Where we are stricter than libnbd, a misconfiguration reads as one line
instead of a later, vaguer refusal: a folder named in the URI must hold
ca-cert.pem (libnbd silently falls back to the system's CAs), and a
client certificate without its key, or the reverse, is an error (libnbd
silently shows none).  TLS 1.2 at least; the server's name is checked
against the URI's host (TCP), as libnbd's gnutls_session_set_verify_cert
does; over a Unix socket only the chain is.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import socket
import ssl
import time
from typing import NamedTuple, Optional

from .errors import NbdError, TlsError

log = logging.getLogger(__name__)

CA = "ca-cert.pem"
CERT = "client-cert.pem"
KEY = "client-key.pem"
CRL = "ca-crl.pem"

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = (62, 64)
# Alerts a server sends when it does not take our certificate.
_CERT_ALERTS = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA",
                "CERTIFICATE_UNKNOWN", "HANDSHAKE_FAILURE", "ACCESS_DENIED",
                "DECRYPT_ERROR")


class Files(NamedTuple):
    """What a certificate folder provides; None where it has nothing."""

    folder: Optional[str]       # None: the system's CAs
    ca: Optional[str]
    cert: Optional[str]
    key: Optional[str]
    crl: Optional[str]


def default_folders(euid: int, home: Optional[str]) -> list[str]:
    """libnbd's folders, in the order it tries them."""
    if euid == 0:
        return ["/etc/pki/libnbd"]
    if not home:
        return []
    return [os.path.join(home, ".pki", "libnbd"),
            os.path.join(home, ".config", "pki", "libnbd")]


def find_files(certificates: Optional[str], exists=os.path.exists,
               euid: Optional[int] = None,
               home: Optional[str] = None) -> Files:
    """The files to use: of the folder named, else of libnbd's first
    default folder that holds ca-cert.pem, else the system's CAs."""
    if certificates is not None:
        return _folder_files(certificates, exists, named=True)
    if euid is None:
        euid, home = os.geteuid(), os.environ.get("HOME")
    for folder in default_folders(euid, home):
        if exists(os.path.join(folder, CA)):
            return _folder_files(folder, exists, named=False)
    log.warning("warning: no %s in %s: the server is checked against "
                "the system's trusted CAs and no client certificate is "
                "shown (name the folder with tls-certificates=DIR)", CA,
                " or ".join(default_folders(euid, home)) or "no folder")
    return Files(None, None, None, None, None)


def _folder_files(folder: str, exists, named: bool) -> Files:
    def have(name):
        path = os.path.join(folder, name)
        return path if exists(path) else None

    if named and not exists(folder):
        raise TlsError(f"{folder}: no such folder (tls-certificates=)")
    ca, cert, key, crl = have(CA), have(CERT), have(KEY), have(CRL)
    if ca is None and named:
        raise TlsError(f"{os.path.join(folder, CA)}: no such file (the CA "
                       f"the server's certificate must chain to)")
    if (cert is None) != (key is None):
        missing = os.path.join(folder, CERT if cert is None else KEY)
        raise TlsError(f"{missing}: no such file (a client certificate "
                       f"needs both {CERT} and {KEY})")
    return Files(folder, ca, cert, key, crl)


class Tls(NamedTuple):
    """A connection's TLS: the files it uses and the context made of them."""

    files: Files
    context: ssl.SSLContext


def setup(certificates: Optional[str], verify_peer: bool = True,
          check_hostname: bool = True) -> Tls:
    """The client side of TLS for a URI's settings (one line if the files
    cannot be used).  The context is made once per process and settings:
    every connection of a pull shares it."""
    files = find_files(certificates)
    return Tls(files, _context(files, verify_peer, check_hostname))


@functools.lru_cache(maxsize=8)
def _context(files: Files, verify_peer: bool,
             check_hostname: bool) -> ssl.SSLContext:
    if not verify_peer:
        log.warning("warning: tls-verify-peer=false: the server's "
                    "certificate is not checked, anyone in the middle can "
                    "read and change what is read")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # The name must be in subjectAltName: never the CN's fallback.
    ctx.hostname_checks_common_name = False
    ctx.check_hostname = verify_peer and check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    try:
        if files.ca is None:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            _load(files.ca, "a CA certificate", ctx.load_verify_locations,
                  files.ca)
        if files.crl is not None:
            _load(files.crl, "a CRL", ctx.load_verify_locations, files.crl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if files.cert is not None:
            _load(files.key, "the client certificate and its key",
                  ctx.load_cert_chain, files.cert, files.key,
                  password=_no_password)
    except OSError as e:
        # The file that could not be read is in e.filename, or is the
        # key (load_cert_chain does not say which of its two).
        raise TlsError(f"{e.filename or files.key}: cannot read: "
                       f"{e.strerror}") from None
    return ctx


def _load(path: str, what: str, load, *args, **kwargs) -> None:
    try:
        load(*args, **kwargs)
    except _Encrypted:
        raise TlsError(f"{path}: the key is encrypted; nbd-verify and "
                       f"nbd-pull need it unencrypted, as libnbd "
                       f"does") from None
    except ssl.SSLError as e:
        # Often no more than "PEM lib"; sometimes the reason (a key too
        # small).
        raise TlsError(f"{path}: not {what} in PEM form, or the two do "
                       f"not match ({reason(e)})") from None
    except OSError as e:
        # load_verify_locations' error names no file: this one.
        raise TlsError(f"{e.filename or path}: cannot read: "
                       f"{e.strerror or e}") from None


class _Encrypted(Exception):
    pass


def _no_password():
    # Never let OpenSSL prompt on the terminal of a cron job.
    raise _Encrypted()


def wrap(sock: socket.socket, tls: Tls, host: Optional[str],
         quickack: bool = False) -> ssl.SSLSocket:
    """sock after the TLS handshake, or a one-line TlsError; host is the
    name the server's certificate must hold (None over a Unix socket).

    The handshake is driven here, not by wrap_socket(): nbd-server 3.24
    writes its handshake records before it sets TCP_NODELAY, so Nagle
    holds each next one until we ACK, and our delayed ACK cost 43 ms per
    connection (measured).  With quickack, TCP_QUICKACK is asked for
    before every wait for the server, as nbdconn does for the options.
    """
    timeout = sock.gettimeout()
    ssock = tls.context.wrap_socket(sock, server_hostname=host,
                                    do_handshake_on_connect=False)
    try:
        ssock.settimeout(0.0)
        _handshake(ssock, timeout, quickack)
        ssock.settimeout(timeout)
        return ssock
    except ssl.SSLError as e:
        ssock.close()
        raise TlsError(describe(e, tls.files, host)) from None
    except TimeoutError:
        # A slow network or server, not a refusal: worth running again.
        ssock.close()
        raise NbdError("timed out during the TLS handshake") from None
    except OSError as e:
        ssock.close()
        raise TlsError(refused_client(
            tls.files, f"connection lost during the TLS handshake: "
                       f"{e.strerror or e}")) from None
    except BaseException:
        ssock.close()
        raise


def _handshake(ssock: ssl.SSLSocket, timeout: Optional[float],
               quickack: bool) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            ssock.do_handshake()
            return
        except ssl.SSLWantReadError:
            if quickack:
                ssock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            event = select.POLLIN
        except ssl.SSLWantWriteError:
            event = select.POLLOUT
        # poll, not select: a process with many files may hold fds
        # beyond select's 1024.
        poller = select.poll()
        poller.register(ssock, event)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0 or not poller.poll(
                None if left is None else left * 1000):
            raise TimeoutError()


def reason(e: ssl.SSLError) -> str:
    """OpenSSL's reason in words: "tlsv13 alert certificate required"."""
    if e.reason:
        return e.reason.lower().replace("_", " ")
    return str(e.strerror or e)


def describe(e: ssl.SSLError, files: Files, host: Optional[str]) -> str:
    """One line for a failed TLS handshake: what it means to the operator."""
    if isinstance(e, ssl.SSLCertVerificationError):
        if e.verify_code in _NAME_MISMATCH:
            return (f"the server's certificate is not valid for {host} "
                    f"(the URI's host must be a name in it)")
        ca = files.ca or "the system's trusted CAs"
        return (f"the server's certificate was refused: "
                f"{e.verify_message} (checked against {ca})")
    words = reason(e)
    upper = (e.reason or "")
    if isinstance(e, ssl.SSLEOFError) or "EOF" in upper or any(
            alert in upper for alert in _CERT_ALERTS):
        return refused_client(files, words)
    return f"TLS handshake failed: {words}"


def refused_client(files: Files, detail: str) -> str:
    """The server took the TLS handshake no further, or ended the
    session right after it: it did not accept our certificate."""
    if files.cert is None:
        shown = ("no client certificate was shown "
                 f"({files.folder or 'no certificate folder'} has none)")
    else:
        shown = f"it did not accept {files.cert}"
    return f"the server refused the TLS session: {shown} ({detail})"
