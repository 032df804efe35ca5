"""Which manifest a freeze makes: incremental from the last one, or full.

A change-tracking chain is a run of manifests of one disk, the first one
full, each later one made from the one before and the dirty bitmap QEMU
kept since it (bitmaps.py).  The bitmap of generation G of chain C is
named ``nbdsnap-C-G``: the manifest's header names the bitmap that holds
every write to the base since it was frozen, so no other state is kept.

    freeze n-1 ──► bitmap C-(n-1) recording ─┐ (commit n-1, guest writes)
    freeze n   ──► swap: C-n recording, C-(n-1) disabled ──► read it,
                   rehash its blocks, manifest n = manifest n-1 + them

The chain breaks, and the freeze makes a full digest and starts a new
chain, whenever it cannot be trusted: no previous manifest, or one that
is damaged, incomplete or of another algorithm; its bitmap gone (QEMU
restarted, managed save, migration, a host reboot); a shut-off domain
(no QEMU to track); and once the chain is older than digest_full_days,
so that a write missed by any means does not live forever.

Pure: decide() gets what was observed and says what to do and why.
"""

import calendar
import time
from typing import NamedTuple, Optional

FULL, INCREMENTAL = "full", "incremental"
PREFIX = "nbdsnap-"
# The manifests' own time format (verify.manifest.now()).
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class Plan(NamedTuple):
    kind: str                       # FULL or INCREMENTAL
    generation: int
    chain_id: str
    chain_started: str              # when the chain's full manifest began
    bitmap: Optional[str]           # the bitmap this freeze starts
    previous_bitmap: Optional[str]  # the one to read (incremental only)
    why: str                        # for syslog and history

    def as_full(self, why, chain_id, now):
        """This online freeze made full, in a new chain: the previous map
        could not be read.  The base is still frozen, so the bitmap just
        started can be replaced by the new chain's without losing a write.
        """
        return Plan(FULL, self.generation, chain_id, format_time(now),
                    bitmap_name(chain_id, self.generation), None, why)


def bitmap_name(chain_id, generation):
    return "%s%s-%d" % (PREFIX, chain_id, generation)


def format_time(seconds):
    return time.strftime(TIME_FORMAT, time.gmtime(seconds))


def parse_time(text):
    """Seconds since the epoch of a manifest time, or None."""
    try:
        return calendar.timegm(time.strptime(text, TIME_FORMAT))
    except (TypeError, ValueError):
        return None


def decide(previous, bitmaps, online, now, full_days, new_chain_id,
           algorithm=None):
    """The Plan of a freeze.

    previous: the previous manifest's header (verify.manifest2.Header), or
    None when there is none, or a string saying why it cannot be used.
    bitmaps: the names of the recording bitmaps on the base's file node
    (empty when not online).  online: a QEMU runs the domain and tracks its writes.
    full_days: the longest a chain may run (0: every freeze is full).
    """
    header = previous if not isinstance(previous, str) else None
    generation = header.generation + 1 if header is not None else 1
    reason = _broken(previous, bitmaps, online, now, full_days, algorithm)
    if reason is None:
        return Plan(INCREMENTAL, generation, header.chain_id,
                    header.chain_started,
                    bitmap_name(header.chain_id, generation),
                    bitmap_name(header.chain_id, header.generation),
                    "incremental from generation %d" % header.generation)
    return Plan(FULL, generation, new_chain_id, format_time(now),
                bitmap_name(new_chain_id, generation) if online else None,
                None, reason)


def _broken(previous, bitmaps, online, now, full_days, algorithm):
    """Why the chain cannot continue, or None."""
    if not online:
        return "the domain is shut off: no QEMU tracks its writes"
    if previous is None:
        return "no previous manifest"
    if isinstance(previous, str):
        return "the previous manifest cannot be used: %s" % previous
    if not previous.complete:
        return "the previous manifest is incomplete"
    if algorithm is not None and previous.algorithm != algorithm:
        return "the previous manifest is of %s, not %s" % (
            previous.algorithm, algorithm)
    if previous.kind not in (FULL, INCREMENTAL):
        return "the previous manifest is of an unknown kind"
    name = bitmap_name(previous.chain_id, previous.generation)
    if name not in bitmaps:
        return ("the bitmap %s is gone or stopped recording (QEMU "
                "restarted, the domain was saved or migrated, its disk "
                "changed, or a freeze was cut short)" % name)
    started = parse_time(previous.chain_started)
    if started is None:
        return "the previous manifest has no chain start time"
    if full_days <= 0:
        return "digest_full_days is 0: every digest is full"
    age = now - started
    if age >= full_days * 86400:
        return "the chain is %.1f days old (digest_full_days %g)" % (
            age / 86400, full_days)
    if age < -3600:
        return "the chain starts in the future (clock changed?)"
    return None
