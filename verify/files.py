"""Files written whole or not at all.

write_atomic() is the one way the project replaces a file: session states,
the history, manifests, nbd-server sections and authfiles.  A reader (or a
crash at any instant) sees the old file or the new one, never a part::

    FOLDER/.NAME.<random>.tmp   O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600
        write, fchmod(mode), fsync      the data is on disk
    rename over FOLDER/NAME             atomic on one file system
    fsync FOLDER                        the rename is on disk too

The temporary file lives in the same folder (rename cannot cross file
systems), is created exclusively (never over a planted file or symlink),
starts 0600 so that nothing reads a half-written secret, and ends in
``.tmp`` (nbd-server's includedir reads only ``*.conf``).  On any failure
it is removed and the error raised as it came.

It lives in verify/ because verify/ (manifests) needs it and must never
import hooks/; hooks/ imports it from here.
"""

import contextlib
import os
import secrets

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_atomic(path, data, mode=0o600):
    """Replace path with data (bytes, or str as UTF-8), file mode mode.

    Raises OSError (with the temporary file removed) when it cannot.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_file(path, mode) as fd:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]


@contextlib.contextmanager
def atomic_file(path, mode=0o600):
    """Replace path with what the body writes to the descriptor it gets.

    For a file too big to hold in memory (a manifest of every block's
    digest): the body writes anywhere in it (os.pwrite), path keeps its
    old content until the body returns, then the steps above run.  An
    exception in the body removes the temporary file and goes on up.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, ".%s.%s.tmp" % (os.path.basename(path),
                                               secrets.token_hex(4)))
    fd = os.open(tmp, _FLAGS, 0o600)
    try:
        try:
            yield fd
            if mode != 0o600:
                os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(folder)


def fsync_dir(path):
    """fsync a folder: what was renamed or removed in it stays so."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
