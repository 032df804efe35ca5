"""The standby's definition, made from the frozen domain's: pure XML.

The manifest carries the domain's inactive definition as it was at the
freeze (libvirt's, without secrets).  The standby is that domain, with:

    <name>            NAME
    <uuid>            a new one (or the standby's own, when updated)
    <metadata>        <nbdsnap:standby origin-name= origin-uuid=/>: ours,
                      the only domains nbd-pull ever redefines
    each pulled disk  its source pointed at its COPY (type file or block),
                      format and target kept, backing chain dropped
    everything else   as the original: MAC addresses too, so that after a
                      failover the standby answers at the original's
                      addresses (change them when both may run at once)

What the clone host cannot give it is said in one line each and left
out when the domain can boot without it (a host device, a vTPM, a
network or bridge this host lacks, a CD-ROM's medium, the NVRAM file);
a disk with data that was not pulled refuses the definition: a standby
without it would boot into a different machine.  ElementTree, not lxml:
the clone host's side needs nothing outside the standard library and
libvirt's binding.
"""

from __future__ import annotations

import uuid as uuid_mod
import xml.etree.ElementTree as ET
from typing import NamedTuple, Optional

NS = "https://nbdsnap.invalid/xmlns/standby/1"
ET.register_namespace("nbdsnap", NS)
_MARK = "{%s}standby" % NS


class StandbyError(Exception):
    """The standby cannot be defined (one line: why)."""


class Copy(NamedTuple):
    base: str           # the frozen disk's path on the VM host
    path: str           # its COPY here
    kind: str           # "file" or "block"


class Host(NamedTuple):
    """What the clone host has, asked for by the caller (libvirt, sysfs)."""
    networks: frozenset     # libvirt network names
    bridges: frozenset      # bridge device names
    files: frozenset = frozenset()      # of the paths asked for (needs())
    #                                     those that exist here


def needs(xml: str) -> list:
    """The host files the frozen domain boots from (kernel, initrd, a
    firmware loader): the caller says which exist here (Host.files)."""
    root = _parse(xml)
    return [el.text.strip() for tag in ("os/kernel", "os/initrd",
                                        "os/loader")
            for el in root.findall(tag) if el.text and el.text.strip()]


def origin(xml: str) -> tuple:
    """(name, uuid) of the frozen domain."""
    root = _parse(xml)
    return root.findtext("name", ""), root.findtext("uuid", "")


def mark_of(xml: str) -> Optional[dict]:
    """Our <metadata> mark of a domain's XML, or None: not a standby of
    ours."""
    mark = _parse(xml).find("metadata/" + _MARK)
    return dict(mark.attrib) if mark is not None else None


def check_update(existing: str, frozen: str, name: str) -> None:
    """StandbyError unless the domain NAME (its inactive XML, existing) is
    our standby of the frozen domain: nbd-pull never touches a domain it
    did not make, nor repoints another domain's standby (a cron line with
    the wrong exports) at these copies."""
    mine = mark_of(existing)
    if mine is None:
        raise StandbyError("domain %s exists and nbd-pull did not make it: "
                           "not touched; choose another --define NAME"
                           % name)
    origin_name, origin_uuid = origin(frozen)
    if mine.get("origin-uuid") != origin_uuid:
        raise StandbyError(
            "standby %s is %s's (%s), not %s's (%s): not touched; choose "
            "another --define NAME, or undefine it first"
            % (name, mine.get("origin-name"), mine.get("origin-uuid"),
               origin_name, origin_uuid))


def standby(xml: str, name: str, copies: list, host: Host,
            uuid: Optional[str] = None) -> tuple:
    """(the standby's XML, [one line per thing left out])."""
    root = _parse(xml)
    origin_name = root.findtext("name", "")
    origin_uuid = root.findtext("uuid", "")
    notes = []
    _set(root, "name", name)
    _set(root, "uuid", uuid or str(uuid_mod.uuid4()))
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(root, "metadata")
    for old in metadata.findall(_MARK):
        metadata.remove(old)
    ET.SubElement(metadata, _MARK, {"origin-name": origin_name,
                                    "origin-uuid": origin_uuid})
    devices = root.find("devices")
    if devices is None:
        raise StandbyError("the frozen domain's definition has no devices")
    left = {}
    for c in copies:
        if c.base in left:
            raise StandbyError("two COPYs of %s: %s and %s; pull each disk "
                               "once" % (c.base, left[c.base].path, c.path))
        left[c.base] = c
    for disk in devices.findall("disk"):
        _disk(devices, disk, left, notes)
    if left:
        raise StandbyError(
            "no disk of %s is %s: was it pulled from another domain?"
            % (origin_name, ", ".join(sorted(left))))
    for dev in devices.findall("hostdev"):
        devices.remove(dev)
        notes.append("host device %s left out: this host has not got it"
                     % _describe_hostdev(dev))
    for dev in devices.findall("tpm"):
        devices.remove(dev)
        notes.append("vTPM left out: its state stays on the VM host")
    for dev in devices.findall("interface"):
        why = _missing_network(dev, host)
        if why:
            devices.remove(dev)
            notes.append("interface %s left out: %s" % (
                _mac(dev), why))
    for path in needs(xml):
        if path not in host.files:
            notes.append("%s is not on this host: the standby will not "
                         "start until it is" % path)
    for dev in devices.findall("filesystem"):
        devices.remove(dev)
        source = dev.find("source")
        notes.append("shared folder %s left out: it is the VM host's" % (
            source.get("dir") if source is not None else "?"))
    nvram = root.find("os/nvram")
    if nvram is not None:
        _nvram(root.find("os"), nvram, notes)
    return ET.tostring(root, encoding="unicode"), notes


def _disk(devices, disk, left: dict, notes: list) -> None:
    target = disk.find("target")
    dev = target.get("dev") if target is not None else "?"
    source = disk.find("source")
    path = None
    if source is not None:
        path = source.get("file") or source.get("dev")
    if path in left:
        copy = left.pop(path)
        disk.set("type", copy.kind)
        backing = disk.find("backingStore/source")
        if backing is not None and (backing.get("file") or
                                    backing.get("dev")):
            # The copy is the qcow2 file as it is: it names that path.
            notes.append(
                "disk %s is a qcow2 over %s: the standby starts only where "
                "that file is, at that path (copy the template once)"
                % (dev, backing.get("file") or backing.get("dev")))
        for old in disk.findall("backingStore"):
            disk.remove(old)
        # Only the path changes: what <source> says beside it (a LUKS
        # disk's <encryption>, a <seclabel>, startupPolicy) stays.
        for attr in _PATH_ATTRS:
            source.attrib.pop(attr, None)
        source.set("file" if copy.kind == "file" else "dev", copy.path)
        return
    if disk.get("device") in ("cdrom", "floppy"):
        if source is not None:
            disk.remove(source)
            notes.append("%s %s left empty: its medium stays on the VM "
                         "host" % (disk.get("device"), dev))
        return
    if source is None or not (source.attrib or len(source)):
        return              # an empty drive: nothing to carry
    # Not only a path: kept as it is, a network or pool disk would be the
    # original's RBD image (two machines writing one disk) or whatever
    # this host's pool of that name holds.
    raise StandbyError(
        "disk %s (%s) was not pulled: pull it too (one more SOURCE COPY "
        "pair), or the standby would boot without it"
        % (dev, _describe_source(disk, source)))


def _describe_source(disk, source) -> str:
    """'file /path', 'network rbd pool/image', 'volume POOL VOLUME'..."""
    return " ".join([disk.get("type", "file")] + [
        source.get(a) for a in ("protocol", "file", "dev", "dir", "pool",
                                "volume", "name", "path") if source.get(a)])


# A local disk's path, and its place in a live chain (index).
_PATH_ATTRS = ("file", "dev", "index")


def _nvram(os_el, nvram, notes: list) -> None:
    """The NVRAM file's path (text, or <source> with type=) is the
    original's: left out, libvirt makes the standby's own.  Its template
    stays: without it libvirt guesses one from the loader, or refuses a
    loader it does not know."""
    if (nvram.text or "").strip() or len(nvram):
        notes.append("NVRAM file not carried over: UEFI variables start "
                     "from the firmware's template")
    nvram.text = None
    for child in list(nvram):
        nvram.remove(child)
    for attr in list(nvram.attrib):
        if attr not in ("template", "templateFormat", "format"):
            del nvram.attrib[attr]
    if not nvram.attrib:
        os_el.remove(nvram)


def _missing_network(dev, host: Host) -> Optional[str]:
    source = dev.find("source")
    kind = dev.get("type")
    if kind == "network" and source is not None:
        net = source.get("network")
        if net not in host.networks:
            return "this host has no libvirt network %r" % net
    if kind == "bridge" and source is not None:
        bridge = source.get("bridge")
        if bridge not in host.bridges:
            return "this host has no bridge %r" % bridge
    if kind in ("direct", "hostdev", "vdpa"):
        return "it uses a host device (%s)" % kind
    return None


def _mac(dev) -> str:
    mac = dev.find("mac")
    return mac.get("address") if mac is not None else "(no MAC)"


def _describe_hostdev(dev) -> str:
    address = dev.find("source/address")
    if address is None:
        return dev.get("type", "?")
    return "%s %s" % (dev.get("type", "?"), " ".join(
        "%s=%s" % kv for kv in sorted(address.attrib.items())))


def _set(root, tag: str, text: str) -> None:
    el = root.find(tag)
    if el is None:
        el = ET.SubElement(root, tag)
    el.text = text


def _parse(xml: str):
    try:
        return ET.fromstring(xml)
    except ET.ParseError as e:
        raise StandbyError("the frozen domain's definition is not XML: %s"
                           % e) from None
