"""COPY's state folder: what COPY holds, and a pull under way.

    /srv/clones/vm1-vda.raw                   COPY, a file
    /srv/clones/.vm1-vda.raw.nbd-pull/        its state, beside it (same
                                              file system, moves with it)
    /dev/vg/vm1-vda                           COPY, a block device
    /var/lib/nbd-pull/dev-vg-vm1\\x2dvda/      its state (--state-dir DIR:
                                              DIR/dev-vg-vm1\\x2dvda/)

        lock         one pull of COPY at a time (flock; holds the pid)
        record       v2 manifest of COPY as the last complete pull left it
        record.json  the source, the record's digest, COPY's fingerprint
        target       v2 manifest of what this pull makes COPY: the frozen
                     base's, whole (its runs from the source or the record)
        journal      the blocks fetched, until applied (journal.py)
        journal.old  a killed run's journal, its blocks reused, then removed
        scan         a manifest of COPY being made by reading it

The record is trusted only while record.json says it is this record, of
this source, and COPY's fingerprint has not changed since (trust()); else
COPY is read again and a new record made from what it holds.  Folder and
files are root's, 0700 and 0600: block digests let whoever reads them
confirm a guess of a block's content.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from typing import Optional

from nbdsnap.verify.files import fsync_dir, write_atomic

DEFAULT_DIR = "/var/lib/nbd-pull"
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class StateError(Exception):
    """The state folder cannot be used (one line)."""


class Busy(StateError):
    """Another nbd-pull works on this COPY."""


def folder_for(copy: str, kind: str, state_dir: Optional[str]) -> str:
    """Where COPY's state lives (see the picture)."""
    path = os.path.abspath(copy)
    if state_dir is None and kind != "block":
        head, name = os.path.split(path)
        return os.path.join(head, ".%s.nbd-pull" % name)
    # systemd-escape's way, which no two paths share: "-" becomes
    # "\x2d", then "/" becomes "-".
    name = path.strip("/").replace("-", "\\x2d").replace("/", "-")
    return os.path.join(state_dir or DEFAULT_DIR, name)


def prepare(folder: str, make_parent: bool = False) -> None:
    """Create folder (0700) or check it: a folder, not a symlink, ours,
    not writable by others.  make_parent: create the folder it is in too
    (a state_dir), never a mistyped COPY's folder."""
    try:
        if make_parent:
            os.makedirs(os.path.dirname(folder), mode=0o755, exist_ok=True)
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise StateError(f"cannot create {folder}: {e.strerror}") from None
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"{folder}: not a folder (a symlink?); remove it")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise StateError(f"{folder}: not {os.geteuid()}'s or writable by "
                         f"others; fix its owner and mode (0700)")


class Folder:
    """One COPY's state folder, locked for this process."""

    def __init__(self, path: str, make_parent: bool = False):
        self.path = path
        prepare(path, make_parent)
        self._lock = self._take_lock()
        self._sweep()

    def __getattr__(self, name):
        # folder.record, folder.target ... are paths in it.
        if name in ("record", "target", "journal", "scan"):
            return os.path.join(self.path, name)
        if name == "journal_old":
            return os.path.join(self.path, "journal.old")
        if name == "meta":
            return os.path.join(self.path, "record.json")
        raise AttributeError(name)

    def _take_lock(self) -> int:
        path = os.path.join(self.path, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Busy(f"another nbd-pull (pid {holder or '?'}) is "
                           f"pulling into this copy; try later") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        return fd

    def _sweep(self) -> None:
        """Remove the temporary files (atomic_file's .NAME.*.tmp) of a
        run killed while it wrote one: nothing else would, and a target
        or a scan is 512 MiB per TiB of COPY.  None is in use: this
        process holds the lock."""
        for name in os.listdir(self.path):
            if name.startswith(".") and name.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(self.path, name))
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def read_meta(self) -> Optional[dict]:
        """record.json, or None when missing or unreadable (then the
        record is not trusted: COPY is read again)."""
        try:
            fd = os.open(self.meta, _OPEN)
        except FileNotFoundError:
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                meta = json.loads(f.read(1 << 20))
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def write_meta(self, meta: dict) -> None:
        write_atomic(self.meta, json.dumps(meta, sort_keys=True, indent=2)
                     + "\n")

    def forget(self, *names) -> None:
        """Remove these files, for good (the folder fsynced): a record.json
        that a power cut brought back would trust a COPY being written."""
        for name in names:
            try:
                os.unlink(getattr(self, name))
            except FileNotFoundError:
                pass
        fsync_dir(self.path)


def trust(meta: Optional[dict], record_digest: Optional[bytes],
          source: str, fingerprint: dict) -> Optional[str]:
    """None when COPY's record says what COPY holds, else why not.
    Pure: record_digest is the record's header digest (None: no record
    or a damaged one)."""
    if record_digest is None:
        return "it has no record of a complete pull"
    if meta is None:
        return "its record has no record.json"
    if meta.get("digest") != record_digest.hex():
        return "its record.json is not its record's"
    if not meta.get("trusted", False):
        return "its last pull was interrupted while it applied"
    if meta.get("source") != source:
        return "its record is of another source (%s)" % meta.get("source")
    if meta.get("fingerprint") != fingerprint:
        return "it changed since the last pull"
    return None
