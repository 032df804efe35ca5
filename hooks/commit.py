"""Carrying out what plan.decide() chose: commit, discard, end.

Every path deletes an overlay only once its content is in the base, and
hands the overlay's path to libvirt or qemu-img only after a last lstat()
shows it is still the file nbdsnap created.
"""

from __future__ import annotations

import contextlib
import logging
import os

import libvirt

from . import domxml, locate, qemu_img, virt
from .errors import CommitFailed, Error, VirtError
from .plan import (DISCARD, KEEP, MISSING, OFFLINE, ONLINE, REGULAR,
                   Observation, decide, overlay_kind)
from .plan import Freeze, plan  # noqa: F401  (what freeze.py calls)

log = logging.getLogger(__name__)


class Stuck(Error):
    """Nothing safe can be done now; the overlay is kept and reported."""


def run(conn, freeze, step, timeout, merged=lambda: None,
        domain_lock=contextlib.nullcontext, merging=lambda: None):
    """Carry out step; raise Stuck or CommitFailed if it cannot be done.

    merged() is called as soon as the base holds everything (right after
    the pivot or the offline commit), before anything else can fail: the
    caller records it in every later state, so that recover never compares
    a merged overlay with a base the guest has written on since.
    merging() is called right before qemu-img commit starts writing into
    the base, and recorded the same way: a commit cut short (commit_timeout)
    leaves a base newer than its overlay, which only the same commit,
    finished, makes whole; without the record it would look like a guest's
    newer writes and the overlay would be kept for good.
    domain_lock() guards the domain's definition: two disks of one domain
    committed at once (each under its own disk lock) rewrite the same
    definition, and must not undo each other's change.  It is held for
    the definition's changes only, never across qemu-img commit: the
    other disk's hook would wait a whole commit for it, and give up
    after lock_timeout.
    """
    if step.action == KEEP:
        raise Stuck(step.why)
    if step.action == ONLINE:
        _online(conn, step.dom, freeze, timeout, merged)
    elif step.action == DISCARD:
        merged()
    elif step.action == OFFLINE:
        _offline(freeze, timeout, merged, merging)
    with domain_lock():
        if step.action == OFFLINE and step.dom is not None:
            _point_back(conn, step.dom, freeze)
        if step.dom is not None:
            _check_definition(conn, step.dom, freeze)
        if overlay_kind(freeze.overlay) != MISSING:
            _unchanged(freeze)
            if step.dom is not None:
                _unused(step.dom, freeze)
            os.unlink(freeze.overlay)


def _unchanged(freeze):
    """The overlay must still be the file we created, right before libvirt
    or qemu-img is handed its path (they follow a symlink and chown)."""
    kind = overlay_kind(freeze.overlay)
    if kind not in (MISSING, REGULAR):
        raise Stuck(decide(Observation(overlay=kind), freeze)[1])


def _unused(dom, freeze):
    """Last look before the overlay goes: nothing may name it any more."""
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
        try:
            parsed = domxml.parse(dom.XMLDesc(flags))
        except libvirt.libvirtError as e:
            raise VirtError("cannot read the XML of %s: %s"
                            % (freeze, e.get_error_message()))
        for disk in parsed.disks:
            if freeze.overlay in [layer.path for layer in disk.layers]:
                raise CommitFailed("%s: disk %s names overlay %s again (was "
                                   "the domain started or redefined "
                                   "meanwhile?); overlay kept"
                                   % (freeze, disk.target, freeze.overlay))


def _on(parsed, freeze):
    """The disk of parsed if its top is the freeze's overlay, else None."""
    disk = domxml.find_disk(parsed, freeze.disk)
    if disk is not None and freeze.overlay and disk.top.path == freeze.overlay:
        return disk
    return None


def _check_backing(backing_path, freeze, where):
    if locate.key_of(backing_path) != freeze.key:
        raise Stuck("%s: the overlay's backing file %s is not the base %s; "
                    "overlay %s kept" % (where, backing_path,
                                         freeze.base.path, freeze.overlay))


def _online(conn, dom, freeze, timeout, merged):
    disk = _on(virt.reread(dom), freeze)
    if disk is None:
        raise CommitFailed("%s left the overlay while we looked" % freeze)
    if not disk.chain:
        raise Stuck("%s: libvirt shows no backing file under the overlay"
                    % freeze)
    _check_backing(disk.chain[0].path, freeze, str(freeze))
    _unchanged(freeze)
    virt.cancel_job(dom, freeze.disk)      # one left by a killed commit
    virt.commit(conn, dom, freeze.disk, timeout)
    merged()
    disk = domxml.find_disk(virt.reread(dom), freeze.disk)
    if disk is None or locate.key_of(disk.top.path) != freeze.key:
        raise CommitFailed("after the pivot %s is not back on its base"
                           % freeze)
    virt.resume_if_io_paused(dom)


def _offline(freeze, timeout, merged, merging):
    _unchanged(freeze)
    backing, _ = qemu_img.backing(freeze.overlay)
    if not backing:
        raise Stuck("%s: overlay %s has no backing file" % (freeze,
                                                            freeze.overlay))
    _check_backing(backing, freeze, str(freeze))
    # Into the base and no further (a linked clone's template is not
    # touched).  A second run after a crash commits an emptied overlay:
    # harmless.  qemu-img takes the images' locks: a QEMU that has the
    # base open makes it fail, never write under it.  Bounded by
    # commit_timeout, as the block commit is: the overlay is then kept.
    merging()
    qemu_img.commit(freeze.overlay, timeout)
    merged()


def _point_back(conn, dom, freeze):
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    try:
        # SECURE: the definition is written back whole, secrets included;
        # it is never logged.
        xml = dom.XMLDesc(flags)
        conn.defineXML(domxml.pointed_back(xml, freeze.disk, freeze.base))
    except libvirt.libvirtError as e:
        raise CommitFailed("cannot point the definition of %s back at %s: %s"
                           % (freeze, freeze.base.path,
                              e.get_error_message()))


def _check_definition(conn, dom, freeze):
    """The persistent definition must not be left on the overlay."""
    try:
        if not dom.isPersistent():
            return
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    except libvirt.libvirtError as e:
        raise VirtError("cannot read the definition of %s: %s"
                        % (freeze, e.get_error_message()))
    if _on(domxml.parse(xml), freeze):
        log.info("%s: definition still names the overlay; pointing it back "
                 "at %s", freeze, freeze.base.path)
        _point_back(conn, dom, freeze)
    try:
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    except libvirt.libvirtError as e:
        raise VirtError("cannot read the definition of %s: %s"
                        % (freeze, e.get_error_message()))
    disk = domxml.find_disk(domxml.parse(xml), freeze.disk)
    if disk is None or locate.key_of(disk.top.path) != freeze.key:
        raise CommitFailed("the definition of %s is not on its base %s"
                           % (freeze, freeze.base.path))
