"""served: what a client of an export copies (golden domain XML; qemu-img
info replaced by a dict)."""

from nbdsnap.hooks import served
from nbdsnap.hooks.qemu_img import QemuImgError

IMAGES = "/var/lib/libvirt/images/"


def is_overlay(path):
    return path is not None and path.startswith(
        "/var/lib/nbdsnap/overlays/nbdsnap-")


def no_info(path):
    raise AssertionError("qemu-img asked about %s" % path)   # the XML says


def test_what_clients_copy(golden):
    clone = golden("linked_clone").disks[0]
    template = IMAGES + "template.qcow2"
    assert served.served_image(clone, is_overlay, no_info) == ("qcow2",
                                                               template)
    for name in ("file_raw", "frozen_by_nbdsnap"):
        disk = golden(name).disks[0]
        assert served.served_image(disk, is_overlay, no_info) == ("raw", None)
    inactive = golden("linked_clone_inactive").disks[0]
    assert served.served_image(inactive, is_overlay, lambda path: {
        "format": "qcow2", "full-backing-filename": template,
        "backing-filename": "../template.qcow2"}) == ("qcow2", template)
    assert served.served_image(inactive, is_overlay, lambda path: {
        "format": "qcow2"}) == ("qcow2", None)
    assert served.served_image(inactive, is_overlay, None) == ("qcow2", None)
    assert served.served_as("raw", None) == "the raw disk"
    assert "not the disk the guest sees" in served.served_as("qcow2", None)
    with_backing = served.served_as("qcow2", template)
    assert "names backing file %s" % template in with_backing
    assert "of no use where that file is missing" in with_backing


def test_an_unreadable_image_is_said_unknown_not_raised(golden, caplog):
    def fails(path):
        raise QemuImgError("qemu-img info %s: Permission denied" % path)
    inactive = golden("linked_clone_inactive").disks[0]
    assert served.served_image(inactive, is_overlay, fails) == ("qcow2", None)
    assert "cannot tell its backing file" in caplog.text
    assert served.served_as(None, None) == \
        "the disk's file as it is (format unknown)"
