"""The standby's definition from the frozen domain's: fixed cases."""

import xml.etree.ElementTree as ET

import pytest

from nbdsnap.pull import standby_xml as sx

FROZEN = """\
<domain type='kvm'>
  <name>db1</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <memory unit='KiB'>1048576</memory>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/db1_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/db1-vda.raw'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source dev='/dev/vg/db1-vdb'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/isos/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:aa:bb:dd'/>
      <source bridge='br-storage'/>
    </interface>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source>
        <address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>
      </source>
    </hostdev>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
  </devices>
</domain>
"""

COPIES = [sx.Copy("/var/lib/libvirt/images/db1-vda.raw",
                  "/srv/clones/db1-vda.img", "file"),
          sx.Copy("/dev/vg/db1-vdb", "/dev/vg2/db1-vdb", "block")]
HOST = sx.Host(networks=frozenset({"default"}), bridges=frozenset(),
               files=frozenset({"/usr/share/OVMF/OVMF_CODE.fd"}))


def disks(xml):
    root = ET.fromstring(xml)
    return {d.find("target").get("dev"): d for d in root.iter("disk")}


def test_the_standby_is_the_domain_on_its_copies():
    xml, notes = sx.standby(FROZEN, "db1-standby", COPIES, HOST)
    root = ET.fromstring(xml)
    assert root.findtext("name") == "db1-standby"
    assert root.findtext("uuid") != "11111111-2222-3333-4444-555555555555"
    d = disks(xml)
    assert d["vda"].get("type") == "file"
    assert d["vda"].find("source").get("file") == "/srv/clones/db1-vda.img"
    assert d["vda"].find("driver").get("type") == "raw"
    assert d["vdb"].get("type") == "block"
    assert d["vdb"].find("source").get("dev") == "/dev/vg2/db1-vdb"
    assert d["vdb"].find("driver").get("type") == "qcow2"
    assert d["vdb"].find("backingStore") is None
    # The source follows the driver, as libvirt writes it.
    assert [c.tag for c in d["vda"]][:2] == ["driver", "source"]
    assert d["sda"].find("source") is None
    # The MAC of what stays is the original's.
    macs = [m.get("address") for m in root.iter("mac")]
    assert macs == ["52:54:00:aa:bb:cc"]
    assert sx.mark_of(xml) == {"origin-name": "db1", "origin-uuid":
                               "11111111-2222-3333-4444-555555555555"}
    assert root.find("os/nvram") is None
    assert root.find("devices/hostdev") is None
    assert root.find("devices/tpm") is None
    assert len(notes) == 5
    assert any("br-storage" in n for n in notes)
    assert any("cdrom sda" in n for n in notes)
    assert any("host device pci" in n for n in notes)


def test_an_update_keeps_the_standbys_uuid():
    xml, _ = sx.standby(FROZEN, "s", COPIES, HOST, uuid="abc")
    assert ET.fromstring(xml).findtext("uuid") == "abc"
    # And it carries one mark, not two, when made from a standby's XML.
    again, _ = sx.standby(xml, "s", [
        sx.Copy("/srv/clones/db1-vda.img", "/x", "file"),
        sx.Copy("/dev/vg2/db1-vdb", "/y", "block")], HOST, uuid="abc")
    assert len(ET.fromstring(again).findall("metadata/" + sx._MARK)) == 1


def test_a_disk_not_pulled_refuses_the_definition():
    with pytest.raises(sx.StandbyError, match="disk vdb .* was not pulled"):
        sx.standby(FROZEN, "s", COPIES[:1], HOST)


def test_a_copy_of_another_domains_disk_is_refused():
    with pytest.raises(sx.StandbyError, match="no disk of db1 is /other"):
        sx.standby(FROZEN, "s", COPIES + [sx.Copy("/other", "/c", "file")],
                   HOST)


def test_a_missing_network_leaves_the_interface_out():
    xml, notes = sx.standby(FROZEN, "s", COPIES,
                            sx.Host(frozenset(), frozenset({"br-storage"})))
    assert [m.get("address") for m in ET.fromstring(xml).iter("mac")] == \
        ["52:54:00:aa:bb:dd"]
    assert any("no libvirt network 'default'" in n for n in notes)


def test_not_ours_and_not_xml():
    assert sx.mark_of(FROZEN) is None
    assert sx.origin(FROZEN) == ("db1",
                                 "11111111-2222-3333-4444-555555555555")
    with pytest.raises(sx.StandbyError, match="not XML"):
        sx.origin("<domain")


def frozen_with(disk_xml):
    """FROZEN with one more disk, before its interfaces."""
    return FROZEN.replace("    <interface type='network'>",
                          disk_xml + "    <interface type='network'>", 1)


@pytest.mark.parametrize("extra, what", [
    ("""<disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/db1-vdc'>
        <host name='ceph1' port='6789'/>
      </source>
      <target dev='vdc' bus='virtio'/>
    </disk>""", "rbd"),
    ("""<disk type='volume' device='disk'>
      <driver name='qemu' type='raw'/>
      <source pool='data' volume='db1-vdc'/>
      <target dev='vdc' bus='virtio'/>
    </disk>""", "volume"),
    ("""<disk type='dir' device='disk'>
      <driver name='qemu' type='fat'/>
      <source dir='/srv/share'/>
      <target dev='vdc' bus='virtio'/>
    </disk>""", "dir"),
])
def test_a_disk_not_on_a_local_path_and_not_pulled_refuses(extra, what):
    # Kept as it is, the standby would write the original's RBD image
    # (two machines on one disk) or whatever this host's pool holds.
    with pytest.raises(sx.StandbyError, match="disk vdc .*%s.* was not "
                       "pulled" % what):
        sx.standby(frozen_with(extra), "s", COPIES, HOST)


def test_an_empty_drive_stays_as_it_is():
    xml, _ = sx.standby(frozen_with("""<disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <target dev='vdc' bus='virtio'/>
    </disk>"""), "s", COPIES, HOST)
    assert disks(xml)["vdc"].find("source") is None


def test_a_pulled_disks_source_keeps_what_it_says_beside_the_path():
    # A LUKS disk without its <encryption> would not open (qcow2) or show
    # the guest its ciphertext (raw); a seclabel says how to label it.
    frozen = FROZEN.replace(
        "<source file='/var/lib/libvirt/images/db1-vda.raw'/>",
        "<source file='/var/lib/libvirt/images/db1-vda.raw' "
        "startupPolicy='optional' index='1'>"
        "<seclabel model='dac' relabel='no'/>"
        "<encryption format='luks'><secret type='passphrase' "
        "uuid='0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f'/></encryption>"
        "</source>")
    xml, _ = sx.standby(frozen, "s", COPIES, HOST)
    source = disks(xml)["vda"].find("source")
    assert source.attrib == {"file": "/srv/clones/db1-vda.img",
                             "startupPolicy": "optional"}
    assert [c.tag for c in source] == ["seclabel", "encryption"]
    assert source.find("encryption/secret").get("uuid") == \
        "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f"
    # A file's source becomes a block device's: no file attribute left.
    xml, _ = sx.standby(frozen, "s", [
        sx.Copy(COPIES[0].base, "/dev/vg2/db1-vda", "block"), COPIES[1]],
        HOST)
    vda = disks(xml)["vda"]
    assert vda.get("type") == "block"
    assert vda.find("source").attrib == {"dev": "/dev/vg2/db1-vda",
                                         "startupPolicy": "optional"}


def test_only_a_standby_of_the_same_domain_is_updated():
    ours, _ = sx.standby(FROZEN, "s", COPIES, HOST)
    sx.check_update(ours, FROZEN, "s")
    other = FROZEN.replace("<name>db1</name>", "<name>web1</name>").replace(
        "11111111-2222-3333-4444-555555555555",
        "99999999-2222-3333-4444-555555555555")
    # A cron line with another domain's exports must not repoint db1's
    # standby at web1's copies.
    with pytest.raises(sx.StandbyError, match="standby s is db1's.*web1"):
        sx.check_update(ours, other, "s")
    with pytest.raises(sx.StandbyError, match="nbd-pull did not make it"):
        sx.check_update(FROZEN, FROZEN, "db1")


def test_two_copies_of_one_disk_are_refused():
    # One of them would be left out without a word: which one boots?
    with pytest.raises(sx.StandbyError, match="two COPYs of "
                       "/dev/vg/db1-vdb: /dev/vg2/db1-vdb and /z"):
        sx.standby(FROZEN, "s", COPIES + [
            sx.Copy("/dev/vg/db1-vdb", "/z", "block")], HOST)


@pytest.mark.parametrize("nvram", [
    "<nvram template='/usr/share/OVMF/OVMF_VARS.ms.fd'>"
    "/var/lib/libvirt/qemu/nvram/db1_VARS.fd</nvram>",
    "<nvram template='/usr/share/OVMF/OVMF_VARS.ms.fd' type='file'>"
    "<source file='/var/lib/libvirt/qemu/nvram/db1_VARS.fd'/></nvram>"])
def test_the_nvram_file_is_left_out_its_template_kept(nvram):
    # Without the template libvirt must guess one from the loader (the
    # Secure Boot one here: it would not), or refuse a custom loader.
    frozen = FROZEN.replace(
        "<nvram>/var/lib/libvirt/qemu/nvram/db1_VARS.fd</nvram>", nvram)
    xml, notes = sx.standby(frozen, "s", COPIES, HOST)
    new = ET.fromstring(xml).find("os/nvram")
    assert new.attrib == {"template": "/usr/share/OVMF/OVMF_VARS.ms.fd"}
    assert not (new.text or "").strip() and len(new) == 0
    assert any("NVRAM file not carried over" in n for n in notes)


def test_what_the_domain_boots_from_and_shares_is_named_when_missing():
    frozen = FROZEN.replace(
        "</os>", "<kernel>/boot/vmlinuz-db1</kernel></os>").replace(
        "</devices>", "<filesystem type='mount'><source dir='/srv/share'/>"
        "<target dir='share'/></filesystem></devices>")
    assert sx.needs(frozen) == ["/boot/vmlinuz-db1",
                                "/usr/share/OVMF/OVMF_CODE.fd"]
    xml, notes = sx.standby(frozen, "s", COPIES, HOST)
    assert any("/boot/vmlinuz-db1 is not on this host" in n for n in notes)
    assert not any("OVMF_CODE" in n for n in notes)
    assert any("shared folder /srv/share left out" in n for n in notes)
    assert ET.fromstring(xml).find("devices/filesystem") is None


def test_a_qcow2_over_a_backing_file_names_it():
    frozen = FROZEN.replace(
        "<backingStore/>", "<backingStore type='file'><format type='raw'/>"
        "<source file='/var/lib/libvirt/images/template.raw'/>"
        "</backingStore>")
    xml, notes = sx.standby(frozen, "s", COPIES, HOST)
    assert any("vdb is a qcow2 over /var/lib/libvirt/images/template.raw"
               in n for n in notes)
    assert disks(xml)["vdb"].find("backingStore") is None
