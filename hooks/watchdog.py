"""The hooks' watchdog: end a hook that libvirt or QEMU left hanging.

A hook holds a disk's lock and an NBD client while it runs; if libvirt or
QEMU stop answering, the watchdog ends it instead of holding both without
end.  Its bound is the sum of every wait the hook can make, each at the
bound of its setting, plus MARGIN (nbd-prerun(8), nbd-postrun(8)).
"""

import logging
import os
import threading

log = logging.getLogger(__name__)

# What a hook may need beyond the waits its settings bound: libvirt's calls,
# qemu-img, the state files.
MARGIN = 300


def seconds(config, prog):
    """How long hook prog ("nbd-prerun" or "nbd-postrun") may run.

    Both hooks wait for the disk's lock.  A freeze waits for the domain's
    lock and the agent three times (ping, freeze, thaw); a commit waits for
    the digest, the block job and the domain's lock.  A prerun with
    stale = recover commits the stale session before it freezes: were its
    bound shorter than that commit, every client would restart the same
    commit and be refused when the watchdog ended it.
    """
    lock = config.lock_timeout
    commit = config.digest_timeout + config.commit_timeout + lock
    if prog == "nbd-postrun":
        return lock + commit + MARGIN
    freeze = lock + 3 * config.quiesce_timeout
    if config.stale == "recover":
        freeze += commit
    return lock + freeze + MARGIN


def arm(prog, limit):
    """End this process with status 1 after limit seconds.

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
    timer = threading.Timer(limit, expire)
    timer.daemon = True
    timer.start()
