"""Putting a frozen disk back on its base, whatever happened meanwhile.

nbd-postrun and nbdsnap recover both call plan(), then run() the step it
chose, under the disk's lock.  They decide from what libvirt and the disks
show now, not from the state file alone::

    domain running or paused on the overlay   -> online:  active commit, pivot
    domain shut off, defined on the overlay   -> offline: qemu-img commit,
                                                 definition pointed back
    domain on its base, overlay still there   -> discard it if the commit had
                                                 pivoted or it adds nothing
                                                 to the base; else keep it
    domain on its base, no overlay            -> end: nothing to merge
    domain undefined, or in a passing state   -> keep: the overlay may hold
                                                 the only copy of guest writes

Every path deletes an overlay only once its content is in the base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import libvirt

from . import domxml, locate, qemu_img, virt
from .errors import CommitFailed, Error, VirtError

log = logging.getLogger(__name__)

ONLINE = "online commit"
OFFLINE = "offline commit"
DISCARD = "discard overlay"
END = "end session"
KEEP = "keep overlay"


class Stuck(Error):
    """Nothing safe can be done now; the overlay is kept and reported."""


@dataclasses.dataclass(frozen=True)
class Freeze:
    """What is known of one freeze, from its session or found orphaned."""
    key: str                  # identity of the base (sessions.disk_key)
    uuid: str | None
    domain: str
    disk: str
    overlay: str | None
    base: domxml.Layer
    merged: bool = False      # a commit had pivoted: the base has it all

    @classmethod
    def from_session(cls, state):
        return cls(key=state["key"], uuid=state["uuid"],
                   domain=state["domain"], disk=state["disk"],
                   overlay=state.get("overlay"),
                   base=domxml.Layer(state.get("base_type") or "file",
                                     state["base"],
                                     state.get("base_format") or "raw"),
                   merged=bool(state.get("merged")))

    def __str__(self):
        return "domain %s disk %s" % (self.domain, self.disk)


@dataclasses.dataclass
class Step:
    action: str
    why: str
    dom: object = None        # the virDomain, when the domain exists

    def __str__(self):
        return "%s: %s" % (self.action, self.why)


def _on(parsed, freeze):
    """The disk of parsed if its top is the freeze's overlay, else None."""
    if parsed is None or freeze.overlay is None:
        return None
    disk = domxml.find_disk(parsed, freeze.disk)
    if disk is not None and disk.top.path == freeze.overlay:
        return disk
    return None


def plan(conn, freeze):
    """Decide, from libvirt and the disks now, what brings freeze back."""
    found = virt.lookup(conn, uuid=freeze.uuid, name=freeze.domain)
    has_overlay = bool(freeze.overlay) and os.path.lexists(freeze.overlay)
    if found is None:
        if has_overlay:
            return Step(KEEP, "domain %s is undefined; its overlay %s is "
                        "kept, it may hold the only copy of the guest's "
                        "writes" % (freeze.domain, freeze.overlay))
        return Step(END, "domain %s is undefined and no overlay is left"
                    % freeze.domain)
    dom, live = found
    state = virt.state(dom)
    active = state in (virt.RUNNING, virt.PAUSED)
    if active and _on(live, freeze):
        return Step(ONLINE, "%s is %s on overlay %s"
                    % (freeze, state, freeze.overlay), dom)
    if state == virt.SHUTOFF and _on(live, freeze):
        if virt.has_managed_save(dom):
            # Its saved memory and its save image's XML name the overlay:
            # an offline commit would make it unable to resume.
            return Step(KEEP, "%s is shut off with a managed save image "
                        "that runs on overlay %s; start the domain (virsh "
                        "start) and run recover again" % (freeze,
                                                          freeze.overlay),
                        dom)
        return Step(OFFLINE, "%s is shut off and defined on overlay %s"
                    % (freeze, freeze.overlay), dom)
    if not active and state != virt.SHUTOFF:
        return Step(KEEP, "domain %s is %s; run recover again once it is "
                    "running or shut off" % (freeze.domain, state), dom)
    if has_overlay:
        return Step(DISCARD, "%s is back on its base, overlay %s is still "
                    "there" % (freeze, freeze.overlay), dom)
    return Step(END, "%s is on its base and no overlay is left" % freeze,
                dom)


def run(conn, freeze, step, timeout, merged=lambda: None,
        domain_lock=contextlib.nullcontext):
    """Carry out step; raise Stuck or CommitFailed if it cannot be done.

    merged() is called as soon as the base holds everything (right after
    the pivot or the offline commit), before anything else can fail: the
    caller records it in every later state, so that recover never compares
    a merged overlay with a base the guest has written on since.
    domain_lock() guards the domain's definition: two disks of one domain
    committed at once (each under its own disk lock) rewrite the same
    definition, and must not undo each other's change.
    """
    if step.action == KEEP:
        raise Stuck(step.why)
    if step.action == ONLINE:
        _online(conn, step.dom, freeze, timeout, merged)
    elif step.action == DISCARD:
        _discard(conn, step.dom, freeze)
        merged()
    with domain_lock():
        if step.action == OFFLINE:
            _offline(conn, step.dom, freeze, merged)
        if step.dom is not None:
            _check_definition(conn, step.dom, freeze)
        if freeze.overlay and os.path.lexists(freeze.overlay):
            if step.dom is not None:
                _unused(step.dom, freeze)
            os.unlink(freeze.overlay)


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
    virt.cancel_job(dom, freeze.disk)      # one left by a killed commit
    virt.commit(conn, dom, freeze.disk, timeout)
    merged()
    disk = domxml.find_disk(virt.reread(dom), freeze.disk)
    if disk is None or locate.key_of(disk.top.path) != freeze.key:
        raise CommitFailed("after the pivot %s is not back on its base"
                           % freeze)
    virt.resume_if_io_paused(dom)


def _offline(conn, dom, freeze, merged):
    backing, _ = qemu_img.backing(freeze.overlay)
    if not backing:
        raise Stuck("%s: overlay %s has no backing file" % (freeze,
                                                            freeze.overlay))
    _check_backing(backing, freeze, str(freeze))
    # Into the base and no further (a linked clone's template is not
    # touched).  A second run after a crash commits an emptied overlay:
    # harmless.
    qemu_img.commit(freeze.overlay)
    merged()
    _point_back(conn, dom, freeze)


def _discard(conn, dom, freeze):
    if freeze.merged:
        return          # the commit had pivoted: everything is in the base
    if not qemu_img.same_content(freeze.overlay, freeze.base.path,
                                 freeze.base.format or "raw"):
        raise Stuck("%s is on its base but overlay %s holds data the base "
                    "lacks; kept for inspection (qemu-img compare %s %s)"
                    % (freeze, freeze.overlay, freeze.overlay,
                       freeze.base.path))


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
