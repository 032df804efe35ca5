"""Domain XML, read and written with lxml.  Pure: no libvirt, no files.

A disk in a running domain's live XML, frozen by nbdsnap::

    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/nbdsnap/overlays/nbdsnap-UUID-vda-ID.qcow2'/>
      <backingStore type='block'>             <- the exported base
        <format type='raw'/>
        <source dev='/dev/vg/dom1'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>

Disk describes one <disk>: its top (source) and the backing chain below it.
"""

from __future__ import annotations

import dataclasses

from lxml import etree

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)


@dataclasses.dataclass(frozen=True)
class Layer:
    type: str                # file, block, network, volume, dir, nvme...
    path: str | None         # local path for file and block, else None
    format: str | None       # qcow2, raw... when the XML says


@dataclasses.dataclass(frozen=True)
class Disk:
    target: str              # vda
    device: str              # disk, cdrom, floppy, lun
    top: Layer
    chain: tuple             # Layers below top, nearest first
    shareable: bool = False
    readonly: bool = False
    alias: str | None = None

    @property
    def layers(self):
        return (self.top,) + self.chain


@dataclasses.dataclass(frozen=True)
class Domain:
    name: str
    uuid: str
    disks: tuple


def parse(xml):
    root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml,
                            _PARSER)
    return Domain(name=root.findtext("name"), uuid=root.findtext("uuid"),
                  disks=tuple(_disk(d) for d in root.findall("devices/disk")))


def _layer(elem, format_):
    type_ = elem.get("type", "file")
    src = elem.find("source")
    path = None
    if src is not None and type_ in ("file", "block", "dir"):
        path = src.get({"file": "file", "block": "dev", "dir": "dir"}[type_])
    return Layer(type=type_, path=path, format=format_)


def _disk(elem):
    driver = elem.find("driver")
    top = _layer(elem, driver.get("type") if driver is not None else None)
    chain = []
    store = elem.find("backingStore")
    # An empty <backingStore/> ends the chain; a missing one means unknown
    # (inactive definitions usually omit it).
    while store is not None and store.get("type") is not None:
        fmt = store.find("format")
        chain.append(_layer(store, fmt.get("type") if fmt is not None else None))
        store = store.find("backingStore")
    alias = elem.find("alias")
    return Disk(
        target=elem.find("target").get("dev"),
        device=elem.get("device", "disk"),
        top=top,
        chain=tuple(chain),
        shareable=elem.find("shareable") is not None,
        readonly=elem.find("readonly") is not None,
        alias=alias.get("name") if alias is not None else None,
    )


def snapshot_xml(domain, overlays, description=""):
    """An external disk-only snapshot of the disks {target: overlay}, every
    other disk left out; one snapshot, so one instant for all of them.

    Every other disk is listed with snapshot='no': without it libvirt would
    give each of them an overlay too, and nothing would ever commit them.
    """
    root = etree.Element("domainsnapshot")
    if description:
        etree.SubElement(root, "description").text = description
    disks = etree.SubElement(root, "disks")
    for disk in domain.disks:
        if disk.target in overlays:
            d = etree.SubElement(disks, "disk", name=disk.target,
                                 snapshot="external", type="file")
            etree.SubElement(d, "driver", type="qcow2")
            etree.SubElement(d, "source", file=overlays[disk.target])
        else:
            etree.SubElement(disks, "disk", name=disk.target, snapshot="no")
    return etree.tostring(root, encoding="unicode")


def find_disk(domain, target):
    for disk in domain.disks:
        if disk.target == target:
            return disk
    return None


_SOURCE_ATTR = {"file": "file", "block": "dev"}


def pointed_back(xml, target, base):
    """The domain XML with disk target's top replaced by base (a Layer).

    Used after an offline commit: the persistent definition points at the
    overlay, and must point at the base again.  Only the disk's type, its
    driver's format, the source path and the backing chain change; every
    other detail of the disk element (cache, io, discard, serial, boot
    order, seclabels, address...) is kept.
    """
    root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml,
                            _PARSER)
    for disk in root.findall("devices/disk"):
        if disk.find("target").get("dev") != target:
            continue
        if base.type not in _SOURCE_ATTR or not base.path:
            raise ValueError("cannot point a disk at a %s base" % base.type)
        disk.set("type", base.type)
        driver = disk.find("driver")
        if driver is not None and base.format:
            driver.set("type", base.format)
        source = disk.find("source")
        if source is None:
            source = etree.SubElement(disk, "source")
        for attr in _SOURCE_ATTR.values():
            source.attrib.pop(attr, None)
        source.attrib.pop("index", None)
        source.set(_SOURCE_ATTR[base.type], base.path)
        for store in disk.findall("backingStore"):
            disk.remove(store)
        return etree.tostring(root, encoding="unicode")
    raise ValueError("the domain has no disk %s" % target)
