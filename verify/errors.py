"""The errors of nbd-verify.

nbd-verify catches Error, prints ``nbd-verify: message`` and exits with
Error.status.  Anything else is a bug: one line "internal error, please
report it", exit status 2 too, and its traceback with NBD_VERIFY_DEBUG=1.
Every error is exit status 2: 1 means "the images differ", which is an
answer, not an error, and a bug must never read as one.
"""

ERROR = 2


class Error(Exception):
    """Base of every error nbd-verify reports (message on one line)."""

    status = ERROR


class UnknownAlgorithm(Error):
    """The digest algorithm is not available on this machine."""


class SourceError(Error):
    """A source cannot be opened, sized or read."""


class UnsupportedSource(SourceError):
    """A source of a kind this version cannot read (nbd+vsock://, TLS with
    a pre-shared key)."""


class NbdError(SourceError):
    """An NBD server, the connection to it, or the protocol failed."""


class TlsError(SourceError):
    """TLS cannot be agreed: the certificate folder is unusable, the
    server requires TLS of a plain client, or one side refuses the
    other's certificate.  A configuration to change, not a network to
    retry: not an NbdError."""


class UnknownExport(NbdError):
    """The server has no export of that name (NBD_REP_ERR_UNKNOWN)."""


class ManifestError(Error):
    """A manifest that cannot be read or written, or is damaged, foreign
    or incomplete."""


class SizeMismatch(Error):
    """Two images that should be equal do not have the same size."""
