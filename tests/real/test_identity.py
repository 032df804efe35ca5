"""The export is found by what it is, not by how its path is spelt.

nbd-server hands the hooks the export's path as written in its config:
/dev/mapper/vg-lv where the domain says /dev/dm-3, /dev/vg/lv (a symlink)
where the domain says the file itself, or one base disk under two export
names.  Each must freeze the domain's disk, share one session, and commit
it back, as an operator would check: the copy equals the frozen base, the
guest's writes are in the base, the domain is back on its base, no overlay.
"""

import json
import os

import libvirt
import pytest

import lab
from test_freeze import assert_clean, serve

MiB = 1 << 20
SIZE = 16   # MiB per test disk


def session(env):
    (name,) = env.sessions()
    with open(os.path.join(env.state_dir, "sessions", name)) as f:
        return json.load(f)


def freeze_copy_commit(virt, env, dom, image, exports, copy_through):
    """Freeze through a held connection, copy with 4 connections while the
    guest writes, commit; check what an operator checks."""
    frozen = lab.sha256(image)
    server = serve(virt, env, exports)
    held = lab.HeldConnection(server.port, copy_through)
    assert len(env.overlays()) == 1
    assert lab.disk_source(dom, "vda") == session(env)["overlay"]
    lab.guest_write(dom, "vda", 0x5a, 1 * MiB, MiB)
    copy = env.path("copy.raw")
    lab.nbdcopy(server.uri(copy_through), copy, connections=4)
    lab.guest_write(dom, "vda", 0x6b, (SIZE - 1) * MiB, MiB)
    assert lab.sha256(copy) == frozen
    assert lab.sha256(image) == frozen          # nothing reached the base
    held.close()
    return frozen


@pytest.fixture
def loop(virt, env):
    """A loop device over a 0x11-filled image: (device, backing file).

    Torn down before virt and env: the servers and domains that hold the
    device are stopped first, so that it really detaches, even on failure.
    """
    image = lab.make_image(env.path("lv.raw"), SIZE, fill=0x11)
    with lab.loop_device(image) as dev:
        try:
            yield dev, image
        finally:
            virt.stop()


def test_block_device_exported_through_another_node(virt, env, loop):
    dev, image = loop
    # /dev/mapper/vg-lv beside /dev/dm-N: same numbers, another node.
    alias = lab.device_node(dev, env.path("vg-lv"))
    assert os.path.realpath(alias) != os.path.realpath(dev)
    dom = virt.define(env.name("blk"), [lab.disk_xml(dev, "vda",
                                                      kind="block")])
    freeze_copy_commit(virt, env, dom, image, {"lv": alias}, "lv")

    assert_clean(env, dom, dev)
    assert lab.read_range(image, 1 * MiB, MiB) == b"\x5a" * MiB
    assert lab.read_range(image, (SIZE - 1) * MiB, MiB) == b"\x6b" * MiB
    assert lab.read_range(image, 0, MiB) == b"\x11" * MiB
    assert lab.guest_reads(dom, "vda", 0x5a, 1 * MiB, MiB)


def test_symlink_to_the_file_disk(virt, env):
    base = lab.make_image(env.path("base.raw"), SIZE, fill=0x11)
    link = env.path("vg-lv-link")
    os.symlink(base, link)         # /dev/vg/lv -> ../dm-3
    dom = virt.define(env.name("lnk"), [lab.disk_xml(base, "vda")])
    freeze_copy_commit(virt, env, dom, base, {"lv": link}, "lv")

    assert_clean(env, dom, base)
    assert lab.read_range(base, 1 * MiB, MiB) == b"\x5a" * MiB
    assert lab.read_range(base, (SIZE - 1) * MiB, MiB) == b"\x6b" * MiB
    assert lab.read_range(base, 0, MiB) == b"\x11" * MiB


def test_one_base_under_two_exports_is_one_session(virt, env):
    base = lab.make_image(env.path("base.raw"), SIZE, fill=0x11)
    link = env.path("other-name")
    os.symlink(base, link)
    dom = virt.define(env.name("two"), [lab.disk_xml(base, "vda")])
    frozen = lab.sha256(base)
    server = serve(virt, env, {"by-file": base, "by-link": link})

    first = lab.HeldConnection(server.port, "by-file")
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    second = lab.HeldConnection(server.port, "by-link")
    state = session(env)
    assert len(state["holders"]) == 2
    assert len(env.overlays()) == 1
    assert lab.disk_source(dom, "vda") == state["overlay"]
    assert second.read(0, 4096) == b"\x11" * 4096   # still the frozen base
    copy = env.path("copy.raw")
    lab.nbdcopy(server.uri("by-link"), copy, connections=4)
    assert lab.sha256(copy) == frozen

    first.close()
    # The first export's postrun only releases: the other one still reads.
    lab.wait_until(lambda: len(session(env)["holders"]) == 1, 30,
                   what="the first postrun to release its hold")
    assert env.overlays() == [os.path.basename(state["overlay"])]
    assert lab.disk_source(dom, "vda") == state["overlay"]
    assert second.read(0, 4096) == b"\x11" * 4096
    lab.guest_write(dom, "vda", 0x6b, MiB, MiB)
    second.close()

    assert_clean(env, dom, base)
    assert lab.read_range(base, 0, MiB) == b"\x5a" * MiB
    assert lab.read_range(base, MiB, MiB) == b"\x6b" * MiB


def test_prerun_by_hand_with_domain_and_disk(virt, env):
    base = lab.make_image(env.path("base.raw"), SIZE, fill=0x11)
    other = lab.make_image(env.path("other.raw"), 8, fill=0x33)
    dom = virt.define(env.name("hand"), [lab.disk_xml(base, "vda"),
                                          lab.disk_xml(other, "vdb")])
    dname = dom.name()
    before = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)

    wrong = env.hook("nbd-prerun", "--domain", dname, "--disk", "vdb", base,
                     check=1)
    assert wrong.stderr.count("\n") == 1, wrong.stderr
    assert wrong.stderr.startswith("nbd-prerun: ")
    assert "vdb" in wrong.stderr and other in wrong.stderr
    assert env.sessions() == [] and env.overlays() == []
    assert dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == before
    assert lab.disk_source(dom, "vda") == base

    env.hook("nbd-prerun", "--domain", dname, "--disk", "vda", base, check=0)
    state = session(env)
    # Run by hand, the hook's caller holds the freeze: this test process.
    assert [h["pid"] for h in state["holders"]] == [os.getpid()]
    assert (state["domain"], state["disk"]) == (dname, "vda")
    assert lab.disk_source(dom, "vda") == state["overlay"]
    assert lab.disk_source(dom, "vdb") == other
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    assert lab.read_range(base, 0, MiB) == b"\x11" * MiB

    done = env.hook("nbd-postrun", base, check=0)
    assert "back on its base" in done.stderr
    assert_clean(env, dom, base)
    assert lab.read_range(base, 0, MiB) == b"\x5a" * MiB
    assert lab.disk_source(dom, "vdb") == other
