"""nbdsnap.hooks.domxml against golden libvirt 9 domain XML (tests/data/domxml)."""

import pytest
from lxml import etree

from nbdsnap.hooks import domxml
from nbdsnap.hooks.domxml import Layer

OVERLAY = ("/var/lib/nbdsnap/overlays/nbdsnap-6f1c0a52-3e8b-4d0a-9b8e-"
           "2c1d4a5e7f10-vda-20250312T101500-3fa9c1.qcow2")


# -- parse -----------------------------------------------------------------

def test_domain_name_and_uuid_are_read(golden):
    dom = golden("file_raw")
    assert dom.name == "dom1"
    assert dom.uuid == "6f1c0a52-3e8b-4d0a-9b8e-2c1d4a5e7f10"


def test_file_disk_of_a_running_domain(golden):
    (disk,) = golden("file_raw").disks
    assert disk.target == "vda"
    assert disk.device == "disk"
    assert disk.top == Layer("file", "/var/lib/libvirt/images/dom1.raw", "raw")
    assert disk.chain == ()
    assert disk.alias == "virtio-disk0"
    assert not disk.shareable and not disk.readonly


def test_inactive_definition_has_no_alias_and_no_chain(golden):
    (disk,) = golden("file_raw_inactive").disks
    assert disk.top == Layer("file", "/var/lib/libvirt/images/dom1.raw", "raw")
    assert disk.chain == ()
    assert disk.alias is None


def test_block_disk_path_is_its_source_dev(golden):
    (disk,) = golden("block_loop").disks
    assert disk.top == Layer("block", "/dev/loop3", "raw")


def test_parse_accepts_bytes_with_an_xml_declaration(golden_text):
    text = "<?xml version='1.0' encoding='UTF-8'?>\n" + golden_text("block_loop")
    assert domxml.parse(text).disks[0].top.path == "/dev/loop3"
    assert domxml.parse(text.encode()).disks[0].top.path == "/dev/loop3"


def test_two_disks_keep_their_order_and_targets(golden):
    dom = golden("two_disks")
    assert [d.target for d in dom.disks] == ["vda", "vdb"]
    assert [d.top.path for d in dom.disks] == [
        "/var/lib/libvirt/images/dom-two-root.raw", "/dev/loop4"]


def test_cdrom_with_media_is_a_readonly_cdrom(golden):
    cd = domxml.find_disk(golden("cdrom"), "sda")
    assert cd.device == "cdrom"
    assert cd.readonly
    assert cd.top.path.endswith("debian-12.5.0-amd64-netinst.iso")


def test_empty_cdrom_has_no_path(golden):
    cd = domxml.find_disk(golden("cdrom"), "sdb")
    assert cd.device == "cdrom"
    assert cd.top == Layer("file", None, None)
    assert cd.chain == ()


def test_network_disk_has_no_local_path(golden):
    nbd = domxml.find_disk(golden("network_nbd"), "vdb")
    assert nbd.top == Layer("network", None, "raw")
    assert nbd.chain == ()


def test_linked_clone_chain_lists_the_template(golden):
    (disk,) = golden("linked_clone").disks
    assert disk.top == Layer("file", "/var/lib/libvirt/images/clone1/top.qcow2",
                             "qcow2")
    assert disk.chain == (
        Layer("file", "/var/lib/libvirt/images/template.qcow2", "qcow2"),)
    assert [l.path for l in disk.layers] == [
        "/var/lib/libvirt/images/clone1/top.qcow2",
        "/var/lib/libvirt/images/template.qcow2"]


def test_inactive_linked_clone_chain_is_unknown(golden):
    (disk,) = golden("linked_clone_inactive").disks
    assert disk.top.path == "/var/lib/libvirt/images/clone1/top.qcow2"
    assert disk.chain == ()


def test_frozen_disk_runs_on_the_overlay_above_the_base(golden):
    (disk,) = golden("frozen_by_nbdsnap").disks
    assert disk.top == Layer("file", OVERLAY, "qcow2")
    assert disk.chain == (
        Layer("file", "/var/lib/libvirt/images/dom1.raw", "raw"),)


def test_block_base_below_an_overlay_is_read_from_source_dev():
    xml = """<domain><name>d</name><uuid>u</uuid><devices>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2'/>
        <source file='/o.qcow2' index='2'/>
        <backingStore type='block' index='1'>
          <format type='raw'/>
          <source dev='/dev/vg0/dom1'/>
          <backingStore/>
        </backingStore>
        <target dev='vda' bus='virtio'/>
      </disk></devices></domain>"""
    (disk,) = domxml.parse(xml).disks
    assert disk.chain == (Layer("block", "/dev/vg0/dom1", "raw"),)


def test_shareable_disk_is_marked_shareable(golden):
    dom = golden("shareable_a")
    assert not domxml.find_disk(dom, "vda").shareable
    assert domxml.find_disk(dom, "vdb").shareable


def test_find_disk_of_an_unknown_target_is_none(golden):
    assert domxml.find_disk(golden("two_disks"), "vdz") is None


# -- snapshot_xml ----------------------------------------------------------

def snapshot(dom, target, overlay="/snap/ov.qcow2", description="nbdsnap test"):
    root = etree.fromstring(domxml.snapshot_xml(dom, {target: overlay},
                                                description).encode())
    assert root.tag == "domainsnapshot"
    return root


def external_disks(root):
    return root.findall("disks/disk[@snapshot='external']")


@pytest.mark.parametrize("name,target", [
    ("file_raw", "vda"),
    ("block_loop", "vda"),
    ("two_disks", "vda"),
    ("two_disks", "vdb"),
    ("cdrom", "vda"),
    ("network_nbd", "vda"),
    ("shareable_a", "vda"),
])
def test_snapshot_freezes_exactly_the_exported_disk(golden, name, target):
    root = snapshot(golden(name), target, overlay="/snap/ov.qcow2")
    (ext,) = external_disks(root)
    assert ext.get("name") == target
    assert ext.get("type") == "file"
    assert ext.find("driver").get("type") == "qcow2"
    assert ext.find("source").get("file") == "/snap/ov.qcow2"


@pytest.mark.parametrize("name,target", [
    ("two_disks", "vda"),
    ("two_disks", "vdb"),
    ("cdrom", "vda"),
    ("network_nbd", "vda"),
    ("shareable_a", "vda"),
])
def test_snapshot_leaves_every_other_disk_out(golden, name, target):
    dom = golden(name)
    root = snapshot(dom, target)
    listed = {d.get("name"): d.get("snapshot") for d in root.findall("disks/disk")}
    others = {d.target for d in dom.disks} - {target}
    assert others
    assert listed == dict({t: "no" for t in others}, **{target: "external"})


def test_snapshot_others_carry_no_source(golden):
    root = snapshot(golden("two_disks"), "vdb")
    (other,) = root.findall("disks/disk[@snapshot='no']")
    assert other.get("name") == "vda"
    assert len(other) == 0


def test_snapshot_carries_the_description(golden):
    root = snapshot(golden("file_raw"), "vda",
                    description="nbdsnap session 20250312T101500-3fa9c1 <&>")
    assert root.findtext("description") == \
        "nbdsnap session 20250312T101500-3fa9c1 <&>"


def test_snapshot_without_description_has_no_description(golden):
    root = snapshot(golden("file_raw"), "vda", description="")
    assert root.find("description") is None


def test_snapshot_overlay_path_with_odd_characters_survives(golden):
    odd = "/snap/it's a \"disk\" & <more>.qcow2"
    root = snapshot(golden("file_raw"), "vda", overlay=odd)
    assert external_disks(root)[0].find("source").get("file") == odd


def test_one_snapshot_of_a_group_takes_every_member_and_only_them(golden):
    dom = golden("two_disks")
    root = etree.fromstring(domxml.snapshot_xml(
        dom, {"vda": "/snap/a.qcow2", "vdb": "/snap/b.qcow2"}).encode())
    got = {d.get("name"): d.find("source").get("file")
           for d in external_disks(root)}
    assert got == {"vda": "/snap/a.qcow2", "vdb": "/snap/b.qcow2"}
    assert root.findall("disks/disk[@snapshot='no']") == []
