"""Applying a sealed journal to COPY, and finishing one a killed run left.

    journal, sealed (COMMIT: size S, digest D)
        │  COPY locked (QEMU's image locks), made S bytes,
        │  every record written in order, each checked first against
        │  the target's block digests; fsync
        ▼
    target ──rename──► record     record.json: D, COPY's fingerprint
    journal removed

Every step can be done again with the same result, so a run killed
anywhere in it leaves the sealed journal, and the next run, before it
does anything else and with no network, replays it whole (recover()).
COPY is then the new image; as nothing proves what happened to it in
between, its record is marked not trusted and the pull that follows
reads COPY again.  A journal that is not sealed is never applied: COPY
still holds the previous complete pull, and the journal's blocks serve
the next run instead of a new transfer (run.py).
"""

from __future__ import annotations

import os

from nbdsnap.verify import blkhash
from nbdsnap.verify.files import fsync_dir

from . import journal, local, plan
from .disk import open_disk


class JournalError(Exception):
    """A sealed journal whose blocks do not match its manifest."""


def replay(fd: int, contents: journal.Contents, disk,
           target: local.Local, precheck: bool = True) -> int:
    """Write the journal's records into disk; the bytes written.  Every
    record is checked as it is written and, precheck, before the first
    write too, so that a record gone bad on disk leaves COPY as it was
    (JournalError).  A pull applying the journal it has just written and
    fsynced, every block checked on arrival, skips that first pass (it
    would hash the whole journal twice); a recovery after a crash does
    not."""
    for rec in contents.records if precheck else ():
        _checked(fd, rec, target)
    disk.resize(contents.size)
    written = 0
    for rec in contents.records:
        data = _checked(fd, rec, target)
        if rec.kind == journal.DATA:
            disk.pwrite(data, rec.offset)
        else:
            disk.zero(rec.offset, rec.length)
        written += rec.length
    disk.fsync()
    return written


def _checked(fd: int, rec: journal.Record, target: local.Local):
    """A DATA record's bytes, or None for ZERO, checked against the
    target's block digests."""
    h = target.header
    want = target.digests(rec.offset, rec.length)
    if rec.kind == journal.DATA:
        data = os.pread(fd, rec.length, rec.pos)
        if blkhash.block_digests(data, h.algorithm, h.block_size) != want:
            raise JournalError(
                f"the staged block at offset {rec.offset} does not match "
                f"its manifest: not applied")
        return data
    # Zeros by block, not by byte: a ZERO record may span a whole chunk.
    full, tail = divmod(rec.length, h.block_size)
    zeros = h.zero_digest * full
    if tail:
        zeros += plan.zero_digest(h.algorithm, h.block_size, tail)
    if zeros != want:
        raise JournalError(
            f"the staged zeros at offset {rec.offset} are not zeros "
            f"in the manifest: not applied")
    return None


def finish(folder, disk, source: str, digest: bytes,
           trusted: bool = True) -> None:
    """COPY holds the target now: it becomes the record."""
    if os.path.exists(folder.target):
        os.replace(folder.target, folder.record)
        fsync_dir(folder.path)
    folder.write_meta({"source": source, "digest": digest.hex(),
                       "fingerprint": disk.fingerprint(),
                       "trusted": trusted, "pulled": local.now()})
    folder.forget("journal")


def recover(folder, copy: str):
    """Finish a sealed journal a killed run left; a line saying what was
    done, or None when there was nothing to finish."""
    fd = journal.open_existing(folder.journal)
    if fd is None:
        return None
    try:
        contents = journal.read(fd)
        if contents.digest is None:
            return None
        for name in ("target", "record"):
            path = getattr(folder, name)
            if local.digest_of(path) == contents.digest:
                break
        else:
            folder.forget("journal", "meta")
            return ("an interrupted pull left a journal of no known "
                    "manifest: discarded; the copy will be read again")
        target = local.Local(path)
        try:
            with open_disk(copy) as disk:
                disk.lock()
                try:
                    replay(fd, contents, disk, target)
                except JournalError as e:
                    # Kept, it would fail every run to come; the killed
                    # apply may have written part of it.
                    folder.forget("journal", "meta")
                    return (f"an interrupted pull left a journal that "
                            f"cannot be applied ({e}): discarded; the copy "
                            f"may be mixed: it will be read again")
                target.close()
                finish(folder, disk, (folder.read_meta() or {}).get(
                    "source", ""), contents.digest, trusted=False)
        finally:
            target.close()
    finally:
        os.close(fd)
    return ("finished applying the pull that was interrupted while it "
            "applied (%s)" % contents.digest.hex()[:16])
