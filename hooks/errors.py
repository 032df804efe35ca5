"""The project's own errors.

The command line catches only Error and prints ``prog: message``; anything
else is a bug and keeps its traceback.  Each subclass carries the exit status
that the contract in docs/DESIGN.md gives it.
"""

REFUSED = 1     # nbd-prerun: connection refused; nbd-postrun: left for recovery
USAGE = 2       # bad arguments or configuration


class Error(Exception):
    """Base of every error the command line reports in one line."""

    status = REFUSED


class ConfigError(Error):
    status = USAGE


class NotRoot(Error):
    """nbdsnap run by another user: what it reads and changes is root's."""
    status = USAGE


class NotFound(Error):
    """The export is no domain's disk, or the named domain or disk is absent."""


class Ambiguous(Error):
    """The export is the disk of more than one domain or target."""


class Unsupported(Error):
    """The disk exists but cannot be frozen (cdrom, network, foreign overlay)."""


class LockError(Error):
    """The base disk's lock cannot be taken."""


class LockTimeout(LockError):
    """Another nbdsnap process held the base disk's lock for too long."""


class CorruptState(Error):
    """A session state file could not be read."""

    export = None   # the export whose recovery sets it aside, when known


class Stale(Error):
    """A session whose holders are all gone; only recovery may touch it."""


class VirtError(Error):
    """libvirt refused or failed; the message is libvirt's own."""


class CommitFailed(Error):
    """The overlay could not be merged back; it is kept for recovery."""


class BitmapError(Error):
    """A QEMU dirty bitmap could not be added, read or removed (QMP)."""
