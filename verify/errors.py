"""The errors of nbd-verify.

nbd-verify catches only Error, prints ``nbd-verify: message`` and exits with
Error.status; anything else is a bug and keeps its traceback.  Every error is
exit status 2: 1 means "the images differ", which is an answer, not an error.
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
    """A source of a kind this version cannot read (e.g. nbds://, TLS)."""


class NbdError(SourceError):
    """An NBD server, the connection to it, or the protocol failed."""


class ManifestError(Error):
    """A manifest that cannot be read or written, or is damaged, foreign
    or incomplete."""


class SizeMismatch(Error):
    """Two images that should be equal do not have the same size."""
