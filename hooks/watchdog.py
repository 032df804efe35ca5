"""The hooks' watchdog: end a hook that libvirt or QEMU left hanging.

A hook holds a disk's lock and an NBD client while it runs; if libvirt or
QEMU stop answering, the watchdog ends it instead of holding both without
end.  Its bound is the sum of every wait the hook can make, each at the
bound of its setting, plus MARGIN (nbd-prerun(8), nbd-postrun(8)).
"""

import logging
import os
import threading
import time

log = logging.getLogger(__name__)

# What a hook may need beyond the waits below: libvirt's calls that have
# no bound of their own (the snapshot, the pivot), the state files.
MARGIN = 300

# The fixed bounds of the commit's waits, each the value of the module that
# waits (tests/unit/test_hook_cli.py checks that they agree).  Copied, not
# imported: a hook arms the watchdog first, and a join must not load
# libvirt or lxml for it (lazy.py).
STOP_GRACE = 5          # digest.STOP_GRACE, twice: after SIGTERM, SIGKILL
JOB_WAIT = 60           # plan.JOB_WAIT: a snapshot job of a killed prerun,
LIBVIRT_JOB_WAIT = 30   # ... and libvirt's own wait for its job lock
CANCEL_WAIT = 60        # virt.CANCEL_WAIT: a block job a killed commit left
QEMU_IMG_INFO = 60      # qemu_img.INFO_WAIT: the overlay's backing file
QEMU_IMG_LOCKS = 30     # qemu_img.LOCK_WAIT: image locks a QEMU still holds
# With digest = on, a freeze reads the previous dirty bitmap through
# QEMU's NBD server: bitmaps.NBD_TIMEOUT for the client, TEARDOWN_WAIT
# for the temporary node.
MAP_READ = 60 + 10


def seconds(config, prog, disks=1):
    """How long hook prog ("nbd-prerun" or "nbd-postrun") may run, for a
    freeze of disks disks (a group's, see extend()).

    Both hooks wait for the disk's lock.  A freeze waits for the domain's
    lock and the agent four times (ping, guest-fsfreeze-status, and the
    snapshot's freeze and thaw) and, with digest = on, the read of the
    previous dirty bitmap (MAP_READ).  A commit waits for the digest (then
    stops it, STOP_GRACE twice), a libvirt job's end (JOB_WAIT, and
    libvirt's LIBVIRT_JOB_WAIT), then either a block job left behind
    (CANCEL_WAIT) and the block commit, or qemu-img info (QEMU_IMG_INFO),
    its image locks (QEMU_IMG_LOCKS) and qemu-img commit: both are counted,
    each commit at commit_timeout; then the domain's lock.  Not counted:
    qemu-img compare (only when the domain is back on its base, read-only:
    a hook ended during it changes nothing).

    A prerun with stale = recover commits the stale session before it
    freezes: were its bound shorter than that commit, every client would
    restart the same commit and be refused when the watchdog ended it.

    A group's disks are committed one after the other, and each reads its
    previous dirty bitmap: the commit and MAP_READ count once a disk.
    """
    lock = config.lock_timeout
    commit = (config.digest_timeout + 2 * STOP_GRACE
              + JOB_WAIT + LIBVIRT_JOB_WAIT
              + CANCEL_WAIT + QEMU_IMG_INFO + QEMU_IMG_LOCKS
              + config.commit_timeout + lock)
    if prog == "nbd-postrun":
        return lock + disks * commit + MARGIN
    freeze = lock + 4 * config.quiesce_timeout
    if config.digest:
        freeze += disks * MAP_READ
    if config.stale == "recover":
        freeze += disks * commit
    return lock + freeze + MARGIN


_armed = {}     # prog: (its timer, when it was armed), once arm() ran


def extend(prog, limit):
    """A hook that learns it serves a group: its bound is now limit, from
    when it was armed.  Nothing when prog's watchdog was never armed (the
    hooks' code run by a test, or by recover)."""
    if prog not in _armed:
        return
    timer, started = _armed.pop(prog)
    timer.cancel()
    arm(prog, limit, started)


def arm(prog, limit, started=None):
    """End this process with status 1 limit seconds after started (now).

    A thread, because the main one may be blocked inside a libvirt call
    (which releases the GIL); the session's intent or committing phase
    tells recover where the hook was.
    """
    def expire():
        log.critical("%s ran for more than %d s (libvirt or QEMU not "
                     "answering?); stopping, the session is left for "
                     "'nbdsnap recover'", prog, limit)
        logging.shutdown()
        os._exit(1)
    started = time.monotonic() if started is None else started
    timer = threading.Timer(max(1, limit - (time.monotonic() - started)),
                            expire)
    timer.daemon = True
    timer.start()
    _armed[prog] = (timer, started)
