"""Writing COPY: staged (a journal sealed, then applied) or in place.

    staged      blocks a killed run already staged and checked are reused
                (journal.old); the rest are fetched and checked (fetch.py)
                into a new journal; COPY, locked, must still be what its
                record says; the journal is sealed, then applied
                (apply.py) and the target becomes COPY's record
    in place    a part file (COPY missing or empty) or an all-zero COPY:
                written by the workers as the blocks arrive, fsynced,
                the part file renamed to COPY

run.py decides which, and what to fetch; this module moves the blocks.
"""

from __future__ import annotations

import os
from typing import Optional

from nbdsnap.verify import blkhash
from nbdsnap.verify.files import fsync_dir

from . import apply, disk, fetch, journal, plan

# Fetched ranges are merged up to this many bytes.
RANGE = 2 << 20


class Counts:
    """What a pull moved, counted as it goes."""

    def __init__(self):
        self.fetch_bytes = self.fetched = self.zero = self.reused = 0
        self.same = 0



def _work(target, have, differ, counts, reuse=None, zero=None) -> list:
    """The ranges to fetch; zero(offset, length) called for the ranges to
    zero and reuse(index) -> True for a block staged already, here, in
    this thread, before any fetch begins (the journal has one writer)."""
    h = target.header
    out = []
    for i in differ:
        b = plan.blocks(h, i, target.run(i), have.run(i) if have else None)
        for offset, length in plan.ranges(b.zero, h.block_size, h.size,
                                          1 << 62):
            if zero:
                zero(offset, length)
        counts.zero += len(b.zero)
        fetch = b.fetch
        if reuse:
            fetch = [j for j in b.fetch if not reuse(j)]
            counts.reused += len(b.fetch) - len(fetch)
        out += plan.ranges(fetch, h.block_size, h.size, RANGE)
    return out


def _transfer(job, export, target, work, sink, progress,
              sink_anywhere=False) -> int:
    h = target.header
    rate = job.opts.bwlimit
    total = sum(n for _, n in work)
    if progress:
        progress(0, total)
    return fetch.run(
        export.clients, fetch.batches(work, target.digests), sink,
        algorithm=h.algorithm, block_size=h.block_size,
        limiter=fetch.Limiter(rate) if rate else None,
        progress=progress and (lambda done: progress(done, total)),
        sink_anywhere=sink_anywhere)


def staged(job, export, target, have, differ, counts, progress,
            fingerprint) -> None:
    folder, h = job.folder, target.header
    old = _old_journal(folder, target)
    _check_space(folder.path, counts.fetch_bytes, job.copy)
    try:
        with journal.Writer(folder.journal) as writer:
            work = _work(target, have, differ, counts,
                         reuse=lambda j: old.copy(j, writer),
                         zero=writer.zero)
            counts.fetched = _transfer(job, export, target, work,
                                       writer.data, progress)
            d = _still_as_read(job.copy, fingerprint)
            try:
                writer.commit(h.size, h.digest)
            except BaseException:
                d.close()
                raise
    finally:
        old.close()
    job.phase = "applying"
    fd = journal.open_existing(folder.journal)
    try:
        with d:
            apply.replay(fd, journal.read(fd), d, target, precheck=False)
            apply.finish(folder, d, job.uri, h.digest)
    finally:
        os.close(fd)
    job.phase = "unchanged"


def _still_as_read(copy: str, fingerprint: dict) -> disk.Disk:
    """COPY, locked before the journal is sealed, and still what its
    record (have) says: COPY is not locked during the transfer (a standby
    may be booted from it then), and a journal applied over what that
    standby wrote would leave a mixed COPY trusted as the target.
    Refused, the journal stays unsealed: the next run reads COPY again
    and reuses the blocks."""
    d = disk.open_disk(copy)
    try:
        d.lock()
        if d.fingerprint() != fingerprint:
            raise disk.DiskError(
                f"{copy} was written while the pull fetched (a standby "
                f"booted from it?); not applied: the next run reads it "
                f"again")
    except BaseException:
        d.close()
        raise
    return d


def in_place(job, export, target, have, differ, counts, progress, part,
              fresh) -> None:
    folder, h = job.folder, target.header
    folder.forget("journal", "journal_old", "meta")
    job.phase = "part" if part else "direct"
    dest = part or job.copy
    with disk.open_disk(dest, create=fresh, ours=part is not None) as d:
        d.lock()
        d.resize(h.size)
        work = _work(target, have, differ, counts,
                     zero=None if fresh else d.zero)
        counts.fetched = _transfer(
            job, export, target, work,
            lambda offset, data: d.pwrite(data, offset), progress,
            sink_anywhere=True)
        d.fsync()
        if part:
            os.replace(part, job.copy)
            fsync_dir(os.path.dirname(os.path.abspath(job.copy)))
        folder.forget("scan")
        apply.finish(folder, d, job.uri, h.digest)
    job.phase = "unchanged"


class _OldJournal:
    """The blocks a killed run staged, checked against this target."""

    def __init__(self, path: Optional[str], target):
        self.blocks, self.fd = {}, None
        if path is None:
            return
        self.fd = journal.open_existing(path)
        os.unlink(path)
        h = target.header
        for rec in journal.read(self.fd).records:
            if rec.kind != journal.DATA:
                continue
            data = os.pread(self.fd, rec.length, rec.pos)
            got = blkhash.block_digests(data, h.algorithm,
                                              h.block_size)
            want = target.digests(rec.offset, rec.length)
            md = h.digest_size
            for k in range(len(got) // md):
                if got[k * md:(k + 1) * md] == want[k * md:(k + 1) * md]:
                    index = rec.offset // h.block_size + k
                    self.blocks[index] = (rec.pos + k * h.block_size,
                                          min(h.block_size,
                                              rec.length - k * h.block_size))
        self.block_size = h.block_size

    def copy(self, index: int, writer) -> bool:
        where = self.blocks.get(index)
        if where is None:
            return False
        writer.data(index * self.block_size,
                    os.pread(self.fd, where[1], where[0]))
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _old_journal(folder, target) -> _OldJournal:
    """A journal left by a run killed while it fetched, moved aside (or
    one a run killed just after moving it aside left there)."""
    aside = folder.journal_old
    if os.path.exists(folder.journal):
        os.replace(folder.journal, aside)
    elif not os.path.exists(aside):
        return _OldJournal(None, target)
    return _OldJournal(aside, target)


def _check_space(folder: str, need: int, copy: str) -> None:
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if need + (64 << 20) > free:
        raise disk.DiskError(
            f"{folder}: {free >> 20} MiB free, the blocks to stage need "
            f"{need >> 20} MiB; {copy} is unchanged")
