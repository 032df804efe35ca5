"""The libvirt qemu hook: no start of a domain that is being copied shut off.

When a client copies a shut-off domain's disk, nbdsnap takes no snapshot:
the disk is frozen because nothing runs.  Starting the domain during the
copy would make the copy inconsistent, so libvirtd's ``prepare begin`` hook
refuses it while such a session has a live holder.

libvirtd runs hooks with a bare environment (HOME, PATH, LC_ALL) and the
domain XML on stdin, and a hook must not call back into libvirt; so this
reads only the XML and the session files.  It never stops a start for a
reason of its own (a broken configuration, an unreadable state file): it
says so in syslog and lets the domain start.
"""

import logging

from . import config as config_mod
from . import domxml, procs, sessions
from .errors import CorruptState, Error

log = logging.getLogger(__name__)


def blocking_sessions(uuid, config):
    """Live offline sessions of the domain with this UUID."""
    store = sessions.SessionStore(config)
    found = []
    for key in store.keys():
        try:
            state = store.load(key)
        except CorruptState as e:
            log.warning("%s (ignored by the libvirt hook)", e)
            continue
        if (state and state["uuid"] == uuid
                and state["mode"] == sessions.OFFLINE
                and sessions.assess(state, procs.is_alive) == sessions.LIVE):
            found.append(state)
    return found


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
