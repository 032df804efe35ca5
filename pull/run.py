"""One pull: COPY made the frozen base served now, or left as it was.

    recover     a sealed journal a killed run left is applied first,
                with no network (apply.recover)
    manifest    the VM host's, complete (source.read_manifest)
    have        what COPY holds: its record while trusted (state.trust),
                else a scan of COPY, which becomes its record
    target      chunk by chunk, the manifest's run where the chunk
                differs from COPY's, the record's elsewhere; its digest
                must come out as the manifest's
    stage       stage.py: blocks a killed run already staged and checked
                are reused; the rest are fetched, checked, and journaled;
                the journal is sealed
    apply       apply.py: COPY written, the target becomes its record

This module decides what COPY holds and what to fetch; stage.py moves
the blocks.

COPY does not change before the journal is sealed.  Two cases have no
previous image to keep, and are written in place instead of staged
(a first full pull staged whole would need the disk's size twice):

    part        COPY does not exist, or is empty: the pull writes a hidden
                file beside it, renamed to COPY once complete
    direct      COPY holds only zeros (a new logical volume): written in
                place, its record removed first, so that a killed run
                leaves a COPY that the next run reads again
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple, Optional

from nbdsnap.verify import manifest2_pack, sources
from nbdsnap.verify.errors import ManifestError
from nbdsnap.verify.files import atomic_file

from . import apply, disk, local, plan, source, stage, state

class Options(NamedTuple):
    connections: int = 4
    wait: float = 1800.0
    bwlimit: Optional[float] = None     # bytes per second
    state_dir: Optional[str] = None
    rescan: bool = False
    threads: int = 2


class Result(NamedTuple):
    source: str
    copy: str
    kind: str               # "full" or "incremental"
    size: int
    digest: str             # the frozen base's blkhash, hex
    bytes_read: int         # from the VM host: blocks and manifest
    blocks_total: int
    blocks_changed: int     # differed from what COPY held
    blocks_fetched: int     # read over the network
    blocks_zero: int        # changed to zeros: written without a read
    blocks_reused: int      # staged by an interrupted run, not fetched
    seconds: float
    why_scan: Optional[str]     # why COPY was read again, if it was


class Job:
    """One SOURCE COPY pair: COPY's state folder, locked."""

    def __init__(self, uri: str, copy: str, opts: Options):
        self.uri, self.copy, self.opts = uri, copy, opts
        self.started = time.monotonic()     # a pair's seconds count from here
        self.kind = disk.kind(copy)
        # What a failure leaves COPY as: "unchanged", "applying" (a
        # sealed journal: the next run finishes it), "part" or "direct"
        # (written in place: the next run resumes it).
        self.phase = "unchanged"
        self.folder = state.Folder(
            state.folder_for(copy, self.kind, opts.state_dir),
            make_parent=self.kind == "block" or opts.state_dir is not None)

    def recover(self) -> Optional[str]:
        if self.kind == "missing":
            return None
        return apply.recover(self.folder, self.copy)

    def close(self) -> None:
        self.folder.close()


def pull(job: Job, export: sources.NbdSource, say=None,
         progress=None, clock=time.monotonic) -> Result:
    """Pull export into job's COPY (see the module docstring)."""
    start = job.started
    manifest = source.read_manifest(export, job.opts.wait, say)
    try:
        return _pull(job, export, manifest, progress, start, clock)
    finally:
        manifest.close()


def _pull(job, export, manifest, progress, start, clock) -> Result:
    h = manifest.header
    opts, folder = job.opts, job.folder
    job.kind = disk.kind(job.copy)       # recover() may have run
    part = None
    if job.kind == "missing" or (job.kind == "file"
                                 and os.path.getsize(job.copy) == 0):
        part = _part_path(job.copy)
        mode, why = "part", None
        have = None
        if os.path.lexists(part):
            disk.open_disk(part, ours=True).close()     # refuse a plant
            have = _scan(part, folder, h, opts)
    else:
        with disk.open_disk(job.copy) as d:
            if d.is_block and d.size != h.size:
                d.resize(h.size)            # says what is wrong
            # A QEMU running from COPY is refused now, before any
            # transfer, not once the journal is sealed (the locks go
            # with d; the apply takes them again).
            d.lock()
            fingerprint = d.fingerprint()
        why = "--rescan" if opts.rescan else state.trust(
            folder.read_meta(), local.digest_of(folder.record), job.uri,
            fingerprint)
        have = None if why else _record(folder, h)
        if have is None:
            why = why or "its record is of other block sizes"
            have = _rescan(job, folder, h, opts, fingerprint)
        zeros = local.zeros_digest(h.algorithm, h.block_size,
                                   have.header.size)
        mode = "direct" if have.header.digest == zeros else "staged"
    try:
        target, counts, differ = _target(folder, manifest, have)
    except BaseException:
        if have:
            have.close()
        raise
    try:
        if mode == "staged":
            stage.staged(job, export, target, have, differ, counts, progress,
                         fingerprint)
        else:
            stage.in_place(job, export, target, have, differ, counts,
                           progress, part, fresh=have is None)
    finally:
        target.close()
        if have:
            have.close()
    blocks = -(-h.size // h.block_size)
    return Result(
        source=job.uri, copy=job.copy,
        kind="full" if have is None or mode != "staged" else "incremental",
        size=h.size, digest=h.digest.hex(),
        bytes_read=counts.fetched + manifest.bytes_read,
        blocks_total=blocks, blocks_changed=blocks - counts.same,
        blocks_fetched=-(-counts.fetched // h.block_size)
        if counts.fetched else 0, blocks_zero=counts.zero,
        blocks_reused=counts.reused, seconds=clock() - start, why_scan=why)


def _part_path(copy: str) -> str:
    head, name = os.path.split(os.path.abspath(copy))
    return os.path.join(head, ".%s.nbd-pull-part" % name)


def _record(folder, h) -> Optional[local.Local]:
    """COPY's record, if it is of the manifest's algorithm and sizes."""
    try:
        rec = local.Local(folder.record)
    except (OSError, ManifestError):
        return None
    r = rec.header
    if (r.algorithm, r.block_size, r.chunk_size) != \
            (h.algorithm, h.block_size, h.chunk_size):
        rec.close()
        return None
    return rec


def _scan(path, folder, h, opts) -> local.Local:
    local.scan(path, folder.scan, h, opts.threads)
    return local.Local(folder.scan)


def _rescan(job, folder, h, opts, fingerprint) -> local.Local:
    """Read COPY; what it holds becomes its record (trusted while COPY's
    fingerprint stays the one taken before the read)."""
    local.scan(job.copy, folder.scan, h, opts.threads)
    with disk.open_disk(job.copy) as d:
        if d.fingerprint() != fingerprint:
            raise disk.DiskError(f"{job.copy} changed while it was read; "
                                 f"is something writing it?")
    folder.forget("meta")
    os.replace(folder.scan, folder.record)
    rec = local.Local(folder.record)
    folder.write_meta({"source": job.uri, "digest": rec.header.digest.hex(),
                       "fingerprint": fingerprint, "trusted": True,
                       "pulled": None, "scanned": local.now()})
    return rec


def _target(folder, manifest, have):
    """Write the target manifest; count the work; the differing chunks."""
    h = manifest.header
    differ = plan.differing_chunks(manifest.chunks,
                                   have.chunks if have else None)
    todo = set(differ)
    counts = stage.Counts()
    with atomic_file(folder.target) as fd:
        packer = manifest2_pack.Packer(
            manifest2_pack.FileOut(fd), h.size, generation=h.generation,
            kind=h.kind, chain_id=h.chain_id, chain_started=h.chain_started,
            created=h.created, source=h.source,
            domain_xml=manifest.domain_xml(), algorithm=h.algorithm,
            block_size=h.block_size, chunk_size=h.chunk_size)
        runs = manifest.runs(differ)
        for i in range(h.chunk_count):
            if i in todo:
                _, run = next(runs)         # differ is in order
                b = plan.blocks(h, i, run, have.run(i) if have else None)
                counts.fetch_bytes += plan.block_lengths(
                    b.fetch, h.block_size, h.size)
                counts.same += b.same
            else:
                run = have.run(i)
                counts.same += len(run) // h.digest_size
            packer.add_digests(run, h.chunk_length(i))
        made = packer.finish()
    if (made.digest, made.chunk_table_sha256) != \
            (h.digest, h.chunk_table_sha256):
        folder.forget("target")
        raise ManifestError(
            f"{manifest.name}: its block digests do not add up to its "
            f"digest: the manifest is inconsistent")
    return local.Local(folder.target), counts, differ
