"""nbdsnap.hooks.locate: which domain and disk an export is, by identity.

key_of and is_ours are injected: a dict stands for stat(), so several
paths (an LV's symlink, its /dev/mapper name, its dm node) share one key.
"""

import dataclasses

import pytest

from nbdsnap.hooks import locate
from nbdsnap.hooks.errors import Ambiguous, NotFound, Unsupported

IMAGES = "/var/lib/libvirt/images/"
OVERLAYS = "/var/lib/nbdsnap/overlays/"

KEYS = {
    IMAGES + "dom1.raw": "f-801-11",
    IMAGES + "dom1.before-upgrade": "f-801-12",
    IMAGES + "dom-two-root.raw": "f-801-13",
    IMAGES + "dom-cdrom.raw": "f-801-14",
    IMAGES + "debian-12.5.0-amd64-netinst.iso": "f-801-15",
    IMAGES + "dom-net.raw": "f-801-16",
    IMAGES + "clone1/top.qcow2": "f-801-17",
    IMAGES + "template.qcow2": "f-801-18",
    IMAGES + "cluster-a.raw": "f-801-19",
    IMAGES + "cluster-b.raw": "f-801-20",
    # one logical volume, three names
    "/dev/vg0/dom1": "b-253-3",
    "/dev/mapper/vg0-dom1": "b-253-3",
    "/dev/dm-3": "b-253-3",
    "/dev/loop3": "b-7-3",
    "/dev/loop4": "b-7-4",
    "/dev/loop5": "b-7-5",
}
key_of = KEYS.get


def is_ours(path):
    return path is not None and path.startswith(OVERLAYS + "nbdsnap-")


def locate_export(domains, export):
    found = locate.matches(domains, key_of(export), key_of, is_ours)
    return locate.choose(found, export, len(domains))


@pytest.fixture
def all_domains(golden):
    return [golden(n) for n in (
        "file_raw", "block_loop", "lv_symlink", "two_disks", "cdrom",
        "network_nbd", "linked_clone")]


# -- relation --------------------------------------------------------------

def test_running_disk_is_its_own_top(golden):
    (disk,) = golden("file_raw").disks
    assert locate.relation(disk, KEYS[IMAGES + "dom1.raw"], key_of,
                           is_ours) == locate.TOP


def test_unrelated_disk_has_no_relation(golden):
    (disk,) = golden("file_raw").disks
    assert locate.relation(disk, "b-7-3", key_of, is_ours) is None


def test_base_under_our_overlay_is_frozen(golden):
    (disk,) = golden("frozen_by_nbdsnap").disks
    assert locate.relation(disk, KEYS[IMAGES + "dom1.raw"], key_of,
                           is_ours) == locate.FROZEN


def test_base_under_a_foreign_overlay_is_foreign(golden):
    (disk,) = golden("foreign_overlay").disks
    assert locate.relation(disk, KEYS[IMAGES + "dom1.raw"], key_of,
                           is_ours) == locate.FOREIGN


def test_template_under_a_linked_clone_is_foreign(golden):
    (disk,) = golden("linked_clone").disks
    assert locate.relation(disk, KEYS[IMAGES + "template.qcow2"], key_of,
                           is_ours) == locate.FOREIGN


def test_template_two_levels_below_our_overlay_is_foreign(golden):
    # A frozen linked clone: our overlay -> top.qcow2 -> template.qcow2.
    # Only top.qcow2 is frozen; the template is someone else's.
    (clone,) = golden("linked_clone").disks
    ours = dataclasses.replace(clone, top=dataclasses.replace(
        clone.top, path=OVERLAYS + "nbdsnap-x-vda-1.qcow2"),
        chain=(clone.top,) + clone.chain)
    assert locate.relation(ours, KEYS[IMAGES + "clone1/top.qcow2"], key_of,
                           is_ours) == locate.FROZEN
    assert locate.relation(ours, KEYS[IMAGES + "template.qcow2"], key_of,
                           is_ours) == locate.FOREIGN


def test_paths_that_cannot_be_stated_match_nothing(golden):
    (disk,) = golden("file_raw").disks
    assert locate.relation(disk, "f-801-99", {}.get, is_ours) is None


# -- matches and choose ----------------------------------------------------

def test_file_export_finds_its_domain_and_disk(all_domains):
    m = locate_export(all_domains, IMAGES + "dom1.raw")
    assert (m.domain.name, m.disk.target, m.how) == ("dom1", "vda", locate.TOP)
    assert str(m) == "dom1:vda"


def test_block_export_finds_its_domain(all_domains):
    m = locate_export(all_domains, "/dev/loop3")
    assert (m.domain.name, m.disk.target) == ("dom-block", "vda")


@pytest.mark.parametrize("export", [
    "/dev/vg0/dom1", "/dev/mapper/vg0-dom1", "/dev/dm-3"])
def test_every_name_of_a_logical_volume_finds_the_same_disk(all_domains,
                                                            export):
    m = locate_export(all_domains, export)
    assert (m.domain.name, m.disk.target, m.how) == ("dom-lv", "vda",
                                                     locate.TOP)


def test_second_disk_of_a_domain_is_found_alone(all_domains):
    m = locate_export(all_domains, "/dev/loop4")
    assert (m.domain.name, m.disk.target) == ("dom-two", "vdb")


def test_matches_lists_every_domain_holding_the_disk(golden):
    doms = [golden("shareable_a"), golden("file_raw"), golden("shareable_b")]
    found = locate.matches(doms, "b-7-5", key_of, is_ours)
    assert [str(m) for m in found] == ["cluster-a:vdb", "cluster-b:vdb"]


def test_export_of_no_domain_is_refused_with_the_search_size(all_domains):
    with pytest.raises(NotFound, match=r"/srv/other\.raw is no disk .*"
                                       r"searched 7 domains"):
        locate.choose([], "/srv/other.raw", len(all_domains))


def test_cdrom_media_is_refused(all_domains):
    with pytest.raises(Unsupported, match="cdrom sda of domain dom-cdrom"):
        locate_export(all_domains, IMAGES + "debian-12.5.0-amd64-netinst.iso")


def test_empty_cdrom_never_asks_for_a_key(golden):
    asked = []

    def spy(path):
        asked.append(path)
        return key_of(path)

    locate.matches([golden("cdrom")], "b-7-3", spy, is_ours)
    assert None not in asked
    assert len(asked) == 2   # vda and the iso in sda, not the empty sdb


def test_network_disk_is_never_matched(golden):
    found = locate.matches([golden("network_nbd")], "b-7-3", key_of, is_ours)
    assert found == []


def test_linked_clone_top_can_be_frozen(all_domains):
    m = locate_export(all_domains, IMAGES + "clone1/top.qcow2")
    assert (m.domain.name, m.how) == ("clone1", locate.TOP)


def test_linked_clone_template_is_refused(all_domains):
    with pytest.raises(Unsupported, match="backing file of clone1:vda"):
        locate_export(all_domains, IMAGES + "template.qcow2")


def test_inactive_linked_clone_top_can_be_frozen(golden):
    m = locate_export([golden("linked_clone_inactive")],
                      IMAGES + "clone1/top.qcow2")
    assert (str(m), m.how) == ("clone1:vda", locate.TOP)


def test_disk_frozen_by_nbdsnap_is_reported_frozen(golden):
    m = locate_export([golden("frozen_by_nbdsnap")], IMAGES + "dom1.raw")
    assert m.how == locate.FROZEN


def test_disk_on_a_foreign_overlay_is_refused_naming_the_overlay(golden):
    with pytest.raises(Unsupported, match=r"dom1\.before-upgrade.*did not "
                                          r"make"):
        locate_export([golden("foreign_overlay")], IMAGES + "dom1.raw")


def test_shareable_disk_of_two_domains_is_ambiguous(golden):
    doms = [golden("shareable_a"), golden("shareable_b")]
    with pytest.raises(Ambiguous, match="cluster-a:vdb, cluster-b:vdb"):
        locate_export(doms, "/dev/loop5")


def test_shareable_disk_of_one_domain_is_refused(golden):
    with pytest.raises(Unsupported, match="shareable"):
        locate_export([golden("shareable_a")], "/dev/loop5")


def test_readonly_disk_is_refused(golden):
    dom = golden("block_loop")
    ro = dataclasses.replace(dom.disks[0], readonly=True)
    dom = dataclasses.replace(dom, disks=(ro,))
    with pytest.raises(Unsupported, match="read-only"):
        locate_export([dom], "/dev/loop3")


def test_same_disk_twice_in_one_domain_is_ambiguous(golden):
    dom = golden("two_disks")
    twice = dataclasses.replace(dom, disks=(
        dom.disks[1], dataclasses.replace(dom.disks[1], target="vdc")))
    with pytest.raises(Ambiguous, match="dom-two:vdb, dom-two:vdc"):
        locate_export([twice], "/dev/loop4")


# -- check_named: --domain and --disk --------------------------------------

def named(dom, target, export):
    return locate.check_named(dom, target, export, key_of(export), key_of,
                              is_ours)


def test_named_disk_matching_the_export_is_accepted(golden):
    m = named(golden("lv_symlink"), "vda", "/dev/dm-3")
    assert (str(m), m.how) == ("dom-lv:vda", locate.TOP)


def test_named_disk_that_is_not_the_export_is_refused(golden):
    with pytest.raises(NotFound, match="its source is /dev/loop3"):
        named(golden("block_loop"), "vda", "/dev/loop4")


def test_named_target_missing_from_the_domain_is_refused(golden):
    with pytest.raises(NotFound, match="domain dom-two has no disk vdz"):
        named(golden("two_disks"), "vdz", "/dev/loop4")


def test_named_network_disk_is_refused(golden):
    with pytest.raises(Unsupported, match="network disk"):
        named(golden("network_nbd"), "vdb", "/dev/loop4")


def test_named_cdrom_is_refused(golden):
    with pytest.raises(Unsupported, match="cdrom"):
        named(golden("cdrom"), "sda",
              IMAGES + "debian-12.5.0-amd64-netinst.iso")


def test_named_frozen_disk_is_reported_frozen(golden):
    m = named(golden("frozen_by_nbdsnap"), "vda", IMAGES + "dom1.raw")
    assert m.how == locate.FROZEN


def test_named_foreign_base_is_refused(golden):
    with pytest.raises(Unsupported, match="did not make"):
        named(golden("foreign_overlay"), "vda", IMAGES + "dom1.raw")
