"""nbdsnap.hooks.bitmaps: its pure parts, with fixed answers.

QMP itself is in tests/real/test_bitmaps.py.
"""

import pytest

from nbdsnap.hooks import bitmaps
from nbdsnap.hooks.errors import BitmapError

K = 64 * 1024


def test_swap_command_adds_and_disables_in_one_transaction():
    assert bitmaps.swap_command("libvirt-1-storage", "nbdsnap-2",
                                "nbdsnap-1") == {"actions": [
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "libvirt-1-storage", "name": "nbdsnap-2",
                  "granularity": 65536, "persistent": False}},
        {"type": "block-dirty-bitmap-disable",
         "data": {"node": "libvirt-1-storage", "name": "nbdsnap-1"}}]}


def test_the_first_swap_only_adds():
    actions = bitmaps.swap_command("n", "nbdsnap-1")["actions"]
    assert [a["type"] for a in actions] == ["block-dirty-bitmap-add"]


@pytest.mark.parametrize("ranges, size, merged", [
    ([], 10 * K, []),
    ([(0, K)], 10 * K, [(0, K)]),
    # Touching and overlapping ranges become one; order does not matter.
    ([(2 * K, K), (0, K), (K, K)], 10 * K, [(0, 3 * K)]),
    ([(0, 3 * K), (K, K)], 10 * K, [(0, 3 * K)]),
    ([(0, 2 * K), (K, 3 * K)], 10 * K, [(0, 4 * K)]),
    ([(0, K), (2 * K, K)], 10 * K, [(0, K), (2 * K, K)]),
    # Clipped to size: the last block of a file that is not a multiple of
    # the granularity, and anything past it.
    ([(9 * K, K)], 9 * K + 512, [(9 * K, 512)]),
    ([(9 * K, K), (11 * K, K)], 10 * K, [(9 * K, K)]),
    ([(10 * K, K)], 10 * K, []),
    ([(0, 0), (K, 0)], 10 * K, []),
])
def test_merge(ranges, size, merged):
    assert bitmaps.merge(ranges, size) == merged


def test_dirty_extents_of_a_reply():
    status = [(K, 0), (2 * K, bitmaps.DIRTY), (K, 0), (K, bitmaps.DIRTY)]
    assert bitmaps.dirty_extents(status, 4 * K) == (
        [(5 * K, 2 * K), (8 * K, K)], 9 * K)
    assert bitmaps.dirty_extents([(K, 0)], 0) == ([], K)


NODES = [
    {"node-name": "libvirt-2-format", "drv": "qcow2",
     "file": "/o/overlay.qcow2"},
    {"node-name": "libvirt-2-storage", "drv": "file",
     "file": "/o/overlay.qcow2"},
    {"node-name": "libvirt-1-format", "drv": "raw", "file": "/b/base.raw",
     "dirty-bitmaps": []},
    {"node-name": "libvirt-1-storage", "drv": "file", "file": "/b/base.raw",
     "dirty-bitmaps": [{"name": "nbdsnap-1", "recording": True}]},
    {"node-name": "nbdsnap-tmp-0a1b2c3d", "drv": "file",
     "file": "/b/base.raw"},
    {"node-name": "libvirt-3-storage", "drv": "host_device",
     "file": "/dev/vg/lv"},
]


def same(path):
    return lambda name: name == path


def test_the_file_node_of_a_path():
    assert bitmaps.find_file_node(NODES, same("/b/base.raw")) == (
        "libvirt-1-storage")
    assert bitmaps.find_file_node(NODES, same("/o/overlay.qcow2")) == (
        "libvirt-2-storage")
    assert bitmaps.find_file_node(NODES, same("/dev/vg/lv")) == (
        "libvirt-3-storage")
    assert bitmaps.find_file_node(NODES, same("/elsewhere")) is None


def test_two_file_nodes_of_one_disk_are_an_error():
    nodes = NODES + [{"node-name": "other", "drv": "file",
                      "file": "/b/base.raw"}]
    with pytest.raises(BitmapError, match="libvirt-1-storage, other"):
        bitmaps.find_file_node(nodes, same("/b/base.raw"))


def test_bitmaps_of_a_node():
    assert bitmaps.bitmaps_of(NODES, "libvirt-1-storage") == [
        {"name": "nbdsnap-1", "recording": True}]
    assert bitmaps.bitmaps_of(NODES, "libvirt-2-storage") == []
    assert bitmaps.bitmaps_of(NODES, "nope") is None
