"""The libvirt qemu hook: no start of a domain that is being copied shut off.

When a client copies a shut-off domain's disk, nbdsnap takes no snapshot:
the disk is frozen because nothing runs.  Starting the domain during the
copy would make the copy inconsistent, so libvirtd's ``prepare begin`` hook
refuses it while such a session has a live holder.

libvirtd runs hooks with a bare environment (HOME, PATH, LC_ALL) and the
domain XML on stdin, and a hook must not call back into libvirt; so this
reads only the XML and the session files.  It never stops a start for a
reason of its own (a broken configuration, an unreadable state file): it
says so in syslog and lets the domain start.  The one exception is a disk
lock that another hook holds past a short bound while the domain's offline
session is under it: a copy may be under way, so the start is refused.
"""

import dataclasses
import logging

from . import config as config_mod
from . import domxml, procs, sessions
from .errors import CorruptState, Error, LockTimeout

log = logging.getLogger(__name__)


# libvirtd waits for its hooks, and the start waits with it: a short bound.
LOCK_SECONDS = 10


def blocking_sessions(uuid, config):
    """The first live offline session of the domain with this UUID, in a
    list (empty: none).

    Each is read again under its disk's lock, so that a hook working on it
    (a postrun ending the copy) is waited for, at most LOCK_SECONDS (or
    lock_timeout if shorter).  A lock held longer than that is taken as a
    copy under way: the start is refused, the safe side.  A session saved
    after this read is prerun's to notice: it checks the domain again once
    its session is saved.  One is enough to refuse the start: looking on
    would make libvirtd wait LOCK_SECONDS more for each disk of a group,
    whose locks a hook holds together.
    """
    store = sessions.SessionStore(config)
    locked = sessions.SessionStore(dataclasses.replace(
        config, lock_timeout=min(config.lock_timeout, LOCK_SECONDS)))
    for key in store.keys():
        state = _load(store, key)
        # Only this domain's offline sessions are worth waiting for.
        if not (state and state["uuid"] == uuid
                and state["mode"] == sessions.OFFLINE):
            continue
        try:
            with locked.lock(key):
                state = _load(store, key)
        except LockTimeout as e:
            log.warning("%s; a copy may be under way", e)
            return [state]
        if state and store.assess(state, procs.is_alive) == sessions.LIVE:
            return [state]
    return []


def _load(store, key):
    try:
        return store.load(key)
    except CorruptState as e:
        log.warning("%s (ignored by the libvirt hook)", e)
        return None


def check(name, operation, suboperation, xml):
    """None to let the domain start, or the reason to refuse it."""
    if (operation, suboperation) != ("prepare", "begin"):
        return None
    try:
        config = config_mod.load()
        uuid = domxml.parse(xml).uuid
        found = blocking_sessions(uuid, config)
    except Exception as e:
        # Anything this hook cannot read (malformed XML, a broken state
        # file, a bug) would otherwise refuse the start with a traceback:
        # one line in syslog, and the domain starts.
        log.error("cannot check domain %s for offline copies, letting it "
                  "start: %s", name, _one_line(e))
        log.debug("what the check stopped on", exc_info=True)
        return None
    if not found:
        return None
    state = found[0]
    reason = ("domain %s is being copied while shut off (session %s, export "
              "%s, %d connections); start it once the copy has ended"
              % (name, state["id"], state["export"], len(state["holders"])))
    log.warning("refused to start: %s", reason)
    return reason


def _one_line(e):
    """The error as one line: lxml's and Python's own messages may not be."""
    text = " ".join(str(e).split())
    return text if isinstance(e, Error) else "%s: %s" % (type(e).__name__,
                                                         text)
