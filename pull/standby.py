"""The standby domain on the clone host's libvirt: made or updated after a
complete pull, never anything else.

    nbd-pull --define NAME SOURCE COPY [SOURCE COPY]...
        every pull complete ──► the frozen definition (in COPY's record)
        ──► standby_xml.standby() ──► defineXML, autostart off

A domain NAME that nbd-pull did not make (no mark in its <metadata>), or
its standby of another domain, is never touched; a standby that runs is not updated (it keeps what it
booted from; exit 1).  Failover is ``virsh start NAME``.

libvirt's binding is imported here only: a clone host that never defines
a standby needs no libvirt.
"""

from __future__ import annotations

import os

from nbdsnap.verify import manifest2

from . import local, standby_xml
from .standby_xml import StandbyError


class Running(Exception):
    """The standby runs: not updated."""


def frozen_definition(record_path: str) -> tuple:
    """(domain XML, the frozen disk's path on the VM host) from COPY's
    record.  The manifest's source reads "BASE (session ID)"."""
    rec = local.Local(record_path)
    try:
        xml = manifest2.read_domain_xml(rec.reader, rec.header)
        base = rec.header.source.rsplit(" (session ", 1)[0]
    finally:
        rec.close()
    if not xml:
        raise StandbyError("the VM host's manifest holds no domain "
                           "definition (its nbdsnap could not read it: see "
                           "its syslog)")
    return xml, base


def define(uri: str, name: str, xml: str, copies: list) -> list:
    """Create or update the standby NAME; the notes of what was left
    out."""
    try:
        import libvirt
    except ImportError:
        raise StandbyError("--define needs libvirt's Python binding "
                           "(apt-get install python3-libvirt)") from None
    libvirt.registerErrorHandler(lambda *args: None, None)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise StandbyError("cannot connect to %s: %s"
                           % (uri, e.get_error_message())) from None
    try:
        return _define(libvirt, conn, name, xml, copies)
    except libvirt.libvirtError as e:
        raise StandbyError("libvirt on %s failed: %s"
                           % (uri, e.get_error_message())) from None
    finally:
        conn.close()


def _define(libvirt, conn, name: str, xml: str, copies: list) -> list:
    uuid = None
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as e:
        # Only "no such domain" is: any other failure (libvirtd gone, no
        # right to read it) must not lead to a define over a domain not
        # looked at.
        if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
        dom = None
    if dom is not None:
        standby_xml.check_update(
            dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), xml, name)
        if dom.isActive():
            raise Running("standby %s is running: not updated (it keeps "
                          "the copy it booted from)" % name)
        if dom.hasManagedSaveImage(0):
            # virsh start would restore its saved memory over disks
            # rewritten since: a guest corrupting its own file systems.
            raise Running("standby %s has a saved state (virsh "
                          "managedsave): not updated; remove it with virsh "
                          "managedsave-remove, or start the standby" % name)
        uuid = dom.UUIDString()
    host = standby_xml.Host(
        networks=frozenset(conn.listNetworks()
                           + conn.listDefinedNetworks()),
        bridges=frozenset(_bridges()),
        files=frozenset(p for p in standby_xml.needs(xml)
                        if os.path.exists(p)))
    new_xml, notes = standby_xml.standby(xml, name, copies, host, uuid)
    try:
        conn.defineXML(new_xml).setAutostart(0)
    except libvirt.libvirtError as e:
        raise StandbyError("libvirt refused the standby %s: %s"
                           % (name, e.get_error_message())) from None
    return notes


def _bridges() -> list:
    folder = "/sys/class/net"
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [n for n in names
            if os.path.isdir(os.path.join(folder, n, "bridge"))]
