"""The quiesce policy: how prerun takes a running domain's snapshot.

    quiesce = off       crash-consistent; the agent is not asked
    quiesce = try       quiesced if the agent answers and the snapshot
                        works, else crash-consistent with a warning that
                        status shows for as long as the session lasts
    quiesce = require   quiesced, or refused

What never to do with an agent, and why, is agent.py's: a ping first, the
snapshot under the domain's response timeout, a guest frozen by its owner
left as it is, a watcher when a freeze may still be pending.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from . import agent, domxml, virt
from .errors import Unsupported, VirtError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Taken:
    """How the snapshot was taken, for the session."""
    consistency: str            # "quiesced" or "crash-consistent"
    warning: str | None = None  # what status shows while the session lasts
    watcher: object = None      # the agent watcher started, if any


def take(dom, domain, overlays, quiesce, timeout, state):
    """Snapshot the disks {target: overlay} of dom in one snapshot (one
    instant), as the policy says."""
    xml = domxml.snapshot_xml(domain, overlays,
                              "nbdsnap %s" % state.describe())
    if quiesce == "off":
        virt.snapshot(dom, xml, quiesce=False)
        return Taken("crash-consistent")
    watcher = None
    asked = False
    try:
        # An agent that does not answer is not asked to freeze: the
        # freeze would stay queued and run whenever it wakes up.
        silent = agent.silence(dom, timeout)
        if silent is not None:
            raise VirtError("the guest agent of domain %s did not answer "
                            "a ping (quiesce_timeout %g s): %s"
                            % (domain.name, timeout, silent))
        if agent.frozen(dom, timeout):
            return _take_frozen(dom, xml, state)
        asked = True
        with agent.ResponseTimeout(dom, timeout):
            virt.snapshot(dom, xml, quiesce=True)
        return Taken("quiesced")
    except VirtError as e:
        failure = e
    if asked:
        # The agent went quiet between the ping and the thaw: a freeze
        # may run, or may have run, with no thaw after it.  status
        # shows the watcher with the session.
        watcher = agent.start_watcher(dom)
    if _uses(dom, overlays):
        # The snapshot was taken; only the thaw's answer was missing.
        log.warning("%s: the quiesced snapshot was taken but libvirt "
                    "said: %s", state.describe(), failure)
        return Taken("quiesced", watcher=watcher)
    if quiesce == "require":
        raise VirtError("%s (quiesce = require)" % failure)
    log.warning("%s: quiesced snapshot failed (%s); taking it "
                "crash-consistent (quiesce = try)", state.describe(),
                failure)
    # status shows it for as long as the session lasts.
    warning = ("quiesce failed (%s): the freeze is crash-consistent"
               % failure)
    for target, overlay in overlays.items():
        remove_unused(dom, target, overlay)
    virt.snapshot(dom, xml, quiesce=False)
    return Taken("crash-consistent", warning=warning, watcher=watcher)


def _take_frozen(dom, xml, state):
    """The guest was frozen before we came, on purpose: its owner's to
    thaw.  Neither freeze it again (the agent refuses) nor watch it
    (the watcher would thaw it); its filesystems are consistent."""
    warning = ("the guest's filesystems were already frozen, not "
               "by nbdsnap: snapshot taken as they were, and they "
               "are left frozen")
    log.warning("%s: %s", state.describe(), warning)
    virt.snapshot(dom, xml, quiesce=False)
    return Taken("quiesced", warning=warning)


def _uses(dom, overlays):
    """Does dom run on every overlay?  The snapshot is atomic: on all of
    them or on none."""
    domain = virt.reread(dom)
    for target, overlay in overlays.items():
        disk = domxml.find_disk(domain, target)
        if disk is None or disk.top.path != overlay:
            return False
    return True


def remove_unused(dom, target, overlay):
    """Remove an overlay of ours that a failed snapshot left behind."""
    if not os.path.lexists(overlay):
        return
    disk = domxml.find_disk(virt.reread(dom), target)
    if disk is not None and overlay in [l.path for l in disk.layers]:
        raise Unsupported("snapshot failed but the domain uses %s"
                          % overlay)
    os.unlink(overlay)
