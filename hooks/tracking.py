"""A freeze's part of change tracking: decide, swap the bitmaps, read one.

Runs in prerun right after the snapshot, under the domain's lock: the base
takes no write until the commit, which this disk's lock (held) keeps away,
so the previous bitmap holds every write to the base since the previous
freeze, and the new one starts at the frozen base.  The lock also keeps
two disks of one domain from wanting QEMU's one NBD server at once.

    chain.decide ─► incremental: swap (new recording, previous disabled),
                    read the previous one's map, remove it
               └──► full: remove this node's old bitmaps, start the new one

Any failure of QEMU or libvirt here makes the manifest full, never wrong,
and never fails the freeze: the copy is served either way.
"""

import logging
import secrets
import time

from . import bitmaps, chain
from .errors import Error

log = logging.getLogger(__name__)


class Tracked:
    """What the digest needs: the plan, and the dirty ranges if incremental."""

    def __init__(self, plan, dirty=None):
        self.plan = plan
        self.dirty = dirty


def new_chain_id():
    return secrets.token_hex(6)


def offline(config, previous, why=None, now=None):
    """A full digest with no bitmap: a shut-off domain (no QEMU tracks its
    writes), or why there is none."""
    now = time.time() if now is None else now
    plan = chain.decide(previous, (), False, now, config.digest_full_days,
                        new_chain_id(), algorithm=config.digest_algorithm)
    return Tracked(plan._replace(why=why) if why else plan)


def online(config, dom, base, previous, size, what, now=None):
    """Swap the frozen base's bitmaps and read the previous map."""
    now = time.time() if now is None else now
    try:
        # A prerun killed while it read a map left QEMU's NBD server, an
        # export and a read-only node of ours: none can be in use now,
        # under the domain lock.
        left = bitmaps.remove_leftovers(dom)
        if left:
            log.warning("%s: removed what an interrupted map read left in "
                        "QEMU: %s", what, ", ".join(left))
    except Error as e:
        log.warning("%s: cannot look for what an interrupted map read left "
                    "in QEMU: %s", what, e)
    try:
        node, found = bitmaps.find(dom, base)
        if node is None:
            raise Error("QEMU has no block node of %s" % base)
    except Error as e:
        plan = chain.decide(previous, (), True, now, config.digest_full_days,
                            new_chain_id())
        plan = plan._replace(bitmap=None, why="cannot track changes: %s" % e)
        log.warning("%s: %s; a full digest, and the next one too",
                    what, plan.why)
        return Tracked(plan)
    # Only a recording bitmap continues a chain: one a killed prerun
    # disabled stopped seeing writes then.
    recording = [name for name, on in found.items() if on]
    names = list(found)
    plan = chain.decide(previous, recording, True, now,
                        config.digest_full_days, new_chain_id(),
                        algorithm=config.digest_algorithm)
    if plan.kind == chain.INCREMENTAL:
        try:
            bitmaps.swap(dom, node, plan.bitmap, plan.previous_bitmap)
            dirty = bitmaps.dirty(dom, base, node, plan.previous_bitmap,
                                  size)
            bitmaps.remove(dom, node, plan.previous_bitmap)
            return Tracked(plan, dirty)
        except Error as e:
            plan = plan.as_full("cannot read bitmap %s: %s"
                                % (plan.previous_bitmap, e),
                                new_chain_id(), now)
            names = _names(dom, node)
    try:
        # The base is frozen: bitmaps replaced now lose no write.
        for name in names:
            if name.startswith(chain.PREFIX):
                bitmaps.remove(dom, node, name)
        bitmaps.swap(dom, node, plan.bitmap)
    except Error as e:
        log.warning("%s: cannot start bitmap %s, the next digest is full "
                    "too: %s", what, plan.bitmap, e)
        plan = plan._replace(bitmap=None)
    return Tracked(plan)


def _names(dom, node):
    try:
        return bitmaps.names(dom, node)
    except Error:
        return ()
