"""nbdsnap status against a real guest that fills snapshot_dir."""

import json

import libvirt

import lab
from test_faults import (KEYS, WRITER_BOOT_SECTOR, io_paused,  # noqa: F401
                         small_overlays, written)
from test_freeze import assert_clean, serve


def test_status_shows_low_space_and_the_guest_paused_on_enospc(
        small_overlays, virt, env):  # noqa: F811
    base = lab.make_image(env.path("base.raw"), 32, fill=0x11)
    with open(base, "r+b") as f:
        f.write(WRITER_BOOT_SECTOR)
    dom = virt.define(env.name("full"), [lab.disk_xml(base, "vda")])
    lab.wait_until(lambda: written(dom) >= 512, 60, what="the guest to boot")
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    for code, _ in KEYS:     # 1 MiB a key, queued by the BIOS: > 4 MiB
        dom.sendKey(libvirt.VIR_KEYCODE_SET_LINUX, 50, [code], 1, 0)
    lab.wait_until(lambda: io_paused(dom), 120, what="the guest's pause")
    assert io_paused(dom), "the guest never hit ENOSPC"

    out = env.hook("nbdsnap", "status", check=0).stdout
    assert out.startswith("PROBLEM  snapshot_dir %s: " % small_overlays), out
    assert ("    PAUSED       on an I/O error (vda: no space left): free "
            "space in %s, where its overlay grows, then 'virsh resume %s'"
            % (small_overlays, dom.name())) in out, out
    report = json.loads(env.hook("nbdsnap", "status", "--json",
                                 check=0).stdout)
    (entry,) = report["sessions"]
    assert (entry["domain_state"], entry["io_error"]) == (
        "paused", "vda: no space left")
    assert [p["kind"] for p in report["problems"]] == ["space"]

    held.close()                  # the commit resumes the guest
    assert_clean(env, dom, base)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
