"""hooks/bitmaps.py on real QEMU: bitmaps across a freeze, read back exactly.

A freeze as the hooks make it (libvirt's snapshot, then swap, writes into
the overlay, the active commit and pivot), on raw, qcow2 and block-device
(host_device) bases.  The bitmap disabled at the freeze must hold exactly
the 64 KiB blocks written before it, the next one exactly those the commit
wrote; for qcow2, the blocks of the file (not of the guest) that hold the
data, where qemu-img map puts it, plus whatever metadata clusters QEMU
touched.
"""

import contextlib
import json
import socket
import subprocess

import libvirt_qemu
import pytest

import lab
from nbdsnap.hooks import bitmaps, domxml, virt as hvirt
from nbdsnap.hooks.errors import BitmapError

KiB = 1 << 10
MiB = 1 << 20
SIZE = 16 * MiB
BLOCK = bitmaps.GRANULARITY

# (offset, length) of the guest writes: before the freeze, during it.
BEFORE = [(1 * MiB, 4 * KiB), (5 * MiB + 100 * KiB, 200 * KiB)]
DURING = [(9 * MiB, 64 * KiB), (12 * MiB + 60 * KiB, 8 * KiB)]


def blocks(ranges):
    """The 64 KiB blocks that ranges touch, as sorted block numbers."""
    out = set()
    for offset, length in ranges:
        out.update(range(offset // BLOCK, (offset + length - 1) // BLOCK + 1))
    return sorted(out)


def qmp(dom, command, arguments=None):
    message = {"execute": command}
    if arguments is not None:
        message["arguments"] = arguments
    return json.loads(libvirt_qemu.qemuMonitorCommand(
        dom, json.dumps(message), 0))


def file_ranges(path, guest_ranges):
    """Where qemu-img map puts the data of guest_ranges in the qcow2 file:
    [(file offset, length)]."""
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", path],
                         capture_output=True, text=True, check=True).stdout
    found = []
    for e in json.loads(out):
        if not e.get("data") or "offset" not in e:
            continue
        for offset, length in guest_ranges:
            start = max(offset, e["start"])
            end = min(offset + length, e["start"] + e["length"])
            if start < end:
                found.append((e["offset"] + start - e["start"], end - start))
    return found


def leftovers(dom):
    """Our temporary nodes and exports still in QEMU."""
    nodes = [n["node-name"] for n in qmp(
        dom, "query-named-block-nodes", {"flat": True})["return"]]
    exports = [e["id"] for e in qmp(dom, "query-block-exports")["return"]]
    return [n for n in nodes + exports if n.startswith(bitmaps.PREFIX)]


@contextlib.contextmanager
def base_disk(env, kind):
    """(path, disk XML) of a fresh 16 MiB base of kind raw, qcow2 or block
    (a raw image on a loop device)."""
    if kind == "qcow2":
        path = lab.make_image(env.path("base.qcow2"), SIZE // MiB, "qcow2")
        yield path, lab.disk_xml(path, "vda", fmt="qcow2")
        return
    path = lab.make_image(env.path("base.raw"), SIZE // MiB, fill=0x11)
    if kind == "raw":
        yield path, lab.disk_xml(path, "vda")
        return
    with lab.loop_device(path) as dev:
        yield dev, lab.disk_xml(dev, "vda", kind="block")


@pytest.fixture
def domain(request, virt, env):
    """(dom, base path, kind): a running domain on a base of that kind."""
    kind = getattr(request, "param", "raw")
    with base_disk(env, kind) as (path, xml):
        dom = virt.define(env.name("bm"), [xml])
        try:
            yield dom, path, kind
        finally:
            with contextlib.suppress(BitmapError):
                bitmaps.remove_ours(dom)
            virt.stop()     # before the loop device goes


def write(dom, pattern, ranges):
    for offset, length in ranges:
        lab.guest_write(dom, "vda", pattern, offset, length)


@pytest.mark.parametrize("domain", ["raw", "qcow2", "block"],
                         indirect=True)
def test_a_freeze_cycle(virt, env, domain):
    dom, base, kind = domain
    node = bitmaps.file_node(dom, base)
    assert node == "libvirt-1-storage"
    bitmaps.swap(dom, node, "nbdsnap-1")
    write(dom, 0x5a, BEFORE)

    overlay = env.path("overlay.qcow2")
    hvirt.snapshot(dom, domxml.snapshot_xml(
        domxml.parse(dom.XMLDesc(0)), {"vda": overlay}), False)
    assert bitmaps.file_node(dom, base) == node
    assert bitmaps.file_node(dom, overlay) not in (None, node)
    bitmaps.swap(dom, node, "nbdsnap-2", "nbdsnap-1")
    write(dom, 0x6b, DURING)

    old = bitmaps.dirty(dom, base, node, "nbdsnap-1", SIZE)
    assert leftovers(dom) == []
    if kind == "qcow2":
        data = file_ranges(base, BEFORE)
        assert blocks(data) and set(blocks(data)) <= set(blocks(old))
    else:
        assert blocks(old) == blocks(BEFORE)
        assert old == bitmaps.merge([(b * BLOCK, BLOCK)
                                     for b in blocks(BEFORE)], SIZE)

    # The hooks' commit watches events: a connection made by hooks/virt.
    conn = hvirt.connect()
    try:
        hvirt.commit(conn, conn.lookupByUUIDString(dom.UUIDString()), "vda",
                     120)
    finally:
        conn.close()
    assert lab.disk_source(dom, "vda") == base
    assert bitmaps.file_node(dom, base) == node
    bitmaps.swap(dom, node, "nbdsnap-3", "nbdsnap-2")
    new = bitmaps.dirty(dom, base, node, "nbdsnap-2", SIZE)
    if kind == "qcow2":
        data = file_ranges(base, DURING)
        assert blocks(data) and set(blocks(data)) <= set(blocks(new))
        assert not set(blocks(file_ranges(base, BEFORE))) & set(blocks(new))
    else:
        assert blocks(new) == blocks(DURING)
    # A map is read as often as asked: the bitmap stays until removed.
    assert bitmaps.dirty(dom, base, node, "nbdsnap-1", SIZE) == old

    assert sorted(bitmaps.names(dom, node)) == [
        "nbdsnap-1", "nbdsnap-2", "nbdsnap-3"]
    assert sorted(bitmaps.remove_ours(dom, keep=("nbdsnap-3",))) == [
        "nbdsnap-1", "nbdsnap-2"]
    assert bitmaps.remove_ours(dom) == ["nbdsnap-3"]
    assert bitmaps.names(dom, node) == []
    assert leftovers(dom) == []


def test_an_nbd_server_already_running_is_left_alone(domain):
    dom, base, _ = domain
    node = bitmaps.file_node(dom, base)
    bitmaps.swap(dom, node, "nbdsnap-1")
    bitmaps.swap(dom, node, "nbdsnap-2", "nbdsnap-1")
    port = lab.free_port()
    assert "return" in qmp(dom, "nbd-server-start", {"addr": {
        "type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}})
    try:
        with pytest.raises(BitmapError, match="already running"):
            bitmaps.dirty(dom, base, node, "nbdsnap-1", SIZE)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert s.recv(8) == b"NBDMAGIC"
        assert leftovers(dom) == []
    finally:
        qmp(dom, "nbd-server-stop")
    assert bitmaps.dirty(dom, base, node, "nbdsnap-1", SIZE) == []


def test_what_a_killed_reader_left_is_removed(domain, env):
    """A dirty() killed between its setup and its teardown leaves QEMU's
    NBD server, a temporary node and an export: remove_leftovers takes all
    three away, and the next dirty() works."""
    dom, base, _ = domain
    node = bitmaps.file_node(dom, base)
    bitmaps.swap(dom, node, "nbdsnap-1")
    bitmaps.swap(dom, node, "nbdsnap-2", "nbdsnap-1")
    tmp = bitmaps.TMP_PREFIX + "killed"
    bitmaps._start_server(dom, env.path("nbd.sock"), tmp)
    qmp(dom, "blockdev-add", {"driver": "file", "filename": base,
                              "node-name": tmp, "read-only": True,
                              "locking": "off"})
    assert "return" in qmp(dom, "block-export-add", {
        "type": "nbd", "id": tmp, "node-name": tmp, "name": tmp,
        "bitmaps": [{"node": node, "name": "nbdsnap-1"}]})
    assert sorted(leftovers(dom)) == [tmp, tmp]
    with pytest.raises(BitmapError, match="already running"):
        bitmaps.dirty(dom, base, node, "nbdsnap-1", SIZE)
    assert bitmaps.remove_leftovers(dom) == [tmp]
    assert leftovers(dom) == []
    assert bitmaps.dirty(dom, base, node, "nbdsnap-1", SIZE) == []
    assert bitmaps.remove_leftovers(dom) == []


def test_a_missing_bitmap_is_a_clean_error(domain):
    dom, base, _ = domain
    node = bitmaps.file_node(dom, base)
    with pytest.raises(BitmapError, match="no bitmap nbdsnap-x"):
        bitmaps.dirty(dom, base, node, "nbdsnap-x", SIZE)
    bitmaps.remove(dom, node, "nbdsnap-x")
    # The transaction is atomic: the old bitmap is missing, so no new one.
    with pytest.raises(BitmapError, match="transaction.*nbdsnap-x"):
        bitmaps.swap(dom, node, "nbdsnap-1", "nbdsnap-x")
    assert bitmaps.names(dom, node) == []
    bitmaps.swap(dom, node, "nbdsnap-1")
    with pytest.raises(BitmapError, match="still recording"):
        bitmaps.dirty(dom, base, node, "nbdsnap-1", SIZE)
    with pytest.raises(BitmapError, match="block-dirty-bitmap-add"
                       "|transaction"):
        bitmaps.swap(dom, node, "nbdsnap-1")
    with pytest.raises(BitmapError, match="no block node nope"):
        bitmaps.names(dom, "nope")
    assert bitmaps.file_node(dom, "/nonexistent/nbdsnap-bitmaps") is None
    assert leftovers(dom) == []
