"""Recovery on real parts: stale sessions, domains that change while frozen.

Every test asserts that no guest write is lost (a pattern check on the
base), that the domain is back on its base, and that no overlay is left, or
that what cannot be fixed is reported by status and recover.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile

import libvirt

import lab
from test_freeze import MiB, assert_clean, export_domain, serve

from nbdsnap.hooks import bitmaps


def status(env):
    return json.loads(env.hook("nbdsnap", "status", "--json",
                               check=0).stdout)["sessions"]


def freeze_and_kill(virt, env, sig):
    """A frozen disk with guest writes, then nbd-server dies under it."""
    dom, base = export_domain(virt, env)
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    lab.guest_write(dom, "vda", 0x5a, 2 * MiB, MiB)
    children = server.children()
    server.stop(sig)
    if sig == signal.SIGKILL:        # the children outlive a killed parent
        for pid in children:
            os.kill(pid, signal.SIGKILL)
    held.drop()
    return dom, base, server


def test_nbd_server_stopped_mid_copy_is_recovered(virt, env):
    dom, base, _ = freeze_and_kill(virt, env, signal.SIGTERM)
    (entry,) = status(env)
    assert entry["verdict"] == "stale"
    proc = env.hook("nbdsnap", "recover", base, check=0)
    assert "online commit" in proc.stdout
    assert_clean(env, dom, base)
    assert lab.read_range(base, 2 * MiB, MiB) == b"\x5a" * MiB
    again = env.hook("nbdsnap", "recover", "--all", check=0)
    assert "nothing to recover" in again.stdout


def test_nbd_server_killed_mid_copy_is_recovered_and_serves_again(virt, env):
    dom, base, server = freeze_and_kill(virt, env, signal.SIGKILL)
    env.hook("nbdsnap", "recover", "--all", check=0)
    assert_clean(env, dom, base)
    assert lab.read_range(base, 2 * MiB, MiB) == b"\x5a" * MiB
    server.start()
    copy = env.path("copy.raw")
    lab.nbdcopy(server.uri("vm"), copy)
    assert lab.sha256(copy) == lab.sha256(base)
    assert_clean(env, dom, base)


def test_a_snapshot_on_top_of_ours_is_kept_and_dry_run_says_so(virt, env):
    """An operator's own disk-only snapshot on top of nbdsnap's overlay:
    recover keeps both, says how out, and --dry-run says what the run
    does."""
    dom, base, _ = freeze_and_kill(virt, env, signal.SIGTERM)
    overlay = status(env)[0]["overlay"]
    mine = env.path("mine.qcow2")
    subprocess.run(["virsh", "-c", lab.URI, "snapshot-create-as", dom.name(),
                    "--disk-only", "--no-metadata", "--atomic", "--diskspec",
                    "vda,file=%s" % mine], check=True, capture_output=True)
    lab.guest_write(dom, "vda", 0x6d, 4 * MiB, MiB)          # into mine
    dry = env.hook("nbdsnap", "recover", "--dry-run", "--all", check=1)
    (line,) = [l for l in dry.stdout.splitlines() if ": would " in l]
    assert "would keep overlay" in line and "above overlay" in line
    run = env.hook("nbdsnap", "recover", "--all", check=1)
    assert line.replace(": would ", ": ") in run.stdout.splitlines()
    assert lab.disk_source(dom, "vda") == mine and os.path.exists(overlay)
    assert "above overlay" in status(env)[0]["error"]
    # As it says: the operator's image committed down, then recover.
    subprocess.run(["virsh", "-c", lab.URI, "blockcommit", dom.name(), "vda",
                    "--active", "--shallow", "--pivot"], check=True,
                   capture_output=True, timeout=120)
    proc = env.hook("nbdsnap", "recover", "--all", check=0)
    assert "online commit" in proc.stdout
    assert_clean(env, dom, base)
    assert lab.read_range(base, 2 * MiB, MiB) == b"\x5a" * MiB
    assert lab.read_range(base, 4 * MiB, MiB) == b"\x6d" * MiB


def test_dry_run_prints_the_plan_and_changes_nothing(virt, env):
    dom, base, _ = freeze_and_kill(virt, env, signal.SIGTERM)
    before = status(env)
    proc = env.hook("nbdsnap", "recover", "--dry-run", "--all", check=0)
    assert "would online commit" in proc.stdout
    def unaged(entries):
        return [dict(e, age=None) for e in entries]
    assert unaged(status(env)) == unaged(before)
    assert lab.disk_source(dom, "vda") == before[0]["overlay"]


def test_live_session_is_left_alone(virt, env):
    dom, base = export_domain(virt, env)
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    proc = env.hook("nbdsnap", "recover", "--all", check=0)
    assert "left alone" in proc.stdout
    assert len(env.overlays()) == 1
    assert held.read(0, 4096) == b"\x11" * 4096
    held.close()
    assert_clean(env, dom, base)


def test_domain_shut_off_during_freeze_is_committed_offline_by_postrun(
        virt, env):
    dom, base = export_domain(virt, env)
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    lab.guest_write(dom, "vda", 0x5b, 0, MiB)
    dom.destroy()
    held.close()
    assert_clean(env, dom, base)
    assert not dom.isActive()
    assert lab.read_range(base, 0, MiB) == b"\x5b" * MiB
    dom.create()                      # and it starts on its base
    assert lab.disk_source(dom, "vda") == base
    assert lab.guest_reads(dom, "vda", 0x5b, 0, MiB)


def test_domain_destroyed_and_started_again_during_freeze(virt, env):
    dom, base = export_domain(virt, env)
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    lab.guest_write(dom, "vda", 0x5c, 0, MiB)
    dom.destroy()
    dom.create()                      # runs on the overlay again
    lab.guest_write(dom, "vda", 0x5d, MiB, MiB)
    held.close()
    assert_clean(env, dom, base)
    assert lab.read_range(base, 0, MiB) == b"\x5c" * MiB
    assert lab.read_range(base, MiB, MiB) == b"\x5d" * MiB


def transient_domain(virt, env):
    """A transient domain (virsh create) on a raw base filled with 0x11:
    (the domain, its base, its XML to create it again)."""
    base = lab.make_image(env.path("base.raw"), 32, fill=0x11)
    xml = lab.domain_xml(env.name("t"), [lab.disk_xml(base, "vda")])
    dom = virt.conn.createXML(xml, 0)
    virt.domains.append(dom)
    return dom, base, xml


def test_transient_domain_destroyed_during_freeze_is_committed(virt, env):
    """Destroyed, a transient domain is undefined: nothing uses its base any
    more, and the overlay, the only copy of its writes, goes into it."""
    dom, base, _ = transient_domain(virt, env)
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    lab.guest_write(dom, "vda", 0x5e, 0, MiB)
    dom.destroy()
    held.close()
    env.wait_clean()
    assert env.overlays() == []
    assert lab.read_range(base, 0, MiB) == b"\x5e" * MiB
    assert lab.read_range(base, MiB, MiB) == b"\x11" * MiB


def test_transient_domain_created_again_on_its_base_keeps_the_overlay(
        virt, env):
    """Created again from its XML, the domain runs on its base without the
    overlay's writes: nothing is merged under the guest, and recover says
    how out."""
    dom, base, xml = transient_domain(virt, env)
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    lab.guest_write(dom, "vda", 0x5e, 0, MiB)
    overlay = status(env)[0]["overlay"]
    dom.destroy()
    dom = virt.conn.createXML(xml, 0)
    virt.domains.append(dom)
    lab.guest_write(dom, "vda", 0x77, 0, 4096)
    held.close()
    lab.wait_until(lambda: status(env)[0]["phase"] == "failed", 30)
    proc = env.hook("nbdsnap", "recover", "--all", check=1)
    assert "without the writes in overlay" in proc.stdout
    assert "rm %s" % overlay in proc.stdout
    assert os.path.exists(overlay)
    assert lab.read_range(base, 0, 4096) == b"\x77" * 4096
    assert lab.read_range(base, 4096, MiB - 4096) == b"\x11" * (MiB - 4096)
    os.unlink(overlay)                # as it says: those writes are not wanted
    env.hook("nbdsnap", "recover", "--all", check=0)
    assert_clean(env, dom, base)


def test_corrupt_state_file_is_set_aside_and_recovered(virt, env):
    dom, base, _ = freeze_and_kill(virt, env, signal.SIGTERM)
    (name,) = env.sessions()
    path = os.path.join(env.state_dir, "sessions", name)
    with open(path, "r+") as f:
        f.truncate(10)
    # The corrupt file, and the overlay it no longer names.
    assert sorted(e["phase"] for e in status(env)) == ["corrupt", "orphan"]
    assert env.hook("nbd-prerun", base, check=1).stderr.count("\n") == 1
    proc = env.hook("nbdsnap", "recover", "--all", check=0)
    assert "moved aside" in proc.stdout
    assert_clean(env, dom, base)
    assert lab.read_range(base, 2 * MiB, MiB) == b"\x5a" * MiB


def test_shut_off_domain_on_overlay_is_recovered_offline(virt, env):
    dom, base, _ = freeze_and_kill(virt, env, signal.SIGTERM)
    dom.destroy()
    proc = env.hook("nbdsnap", "recover", "--all", check=0)
    assert "offline commit" in proc.stdout
    assert_clean(env, dom, base)
    inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "type='raw'" in inactive and "backingStore" not in inactive
    assert lab.read_range(base, 2 * MiB, MiB) == b"\x5a" * MiB


def test_stale_recover_setting_recovers_then_freezes_anew(virt, env):
    dom, base, server = freeze_and_kill(virt, env, signal.SIGTERM)
    env.configure(stale="recover")
    server.start()
    held = lab.HeldConnection(server.port, "vm")
    # The old overlay was committed first: the new freeze has the write.
    assert held.read(2 * MiB, 4096) == b"\x5a" * 4096
    (entry,) = status(env)
    assert entry["verdict"] == "live" and len(env.overlays()) == 1
    held.close()
    assert_clean(env, dom, base)


def test_status_shows_an_overlay_whose_session_is_lost(virt, env):
    dom, base, _ = freeze_and_kill(virt, env, signal.SIGTERM)
    (name,) = env.sessions()
    os.unlink(os.path.join(env.state_dir, "sessions", name))
    (entry,) = status(env)
    assert entry["verdict"] == "orphan" and entry["overlay"]
    assert "ORPHAN" in env.hook("nbdsnap", "status", check=0).stdout
    env.hook("nbdsnap", "recover", "--all", check=0)
    assert_clean(env, dom, base)
    assert status(env) == []
    assert lab.read_range(base, 2 * MiB, MiB) == b"\x5a" * MiB


def test_two_disks_of_a_stopped_domain_committed_at_once(virt, env):
    """Two sessions, one per disk, end together after the domain was shut
    off: both offline commits rewrite its definition, neither undoes the
    other's."""
    second = lab.make_image(env.path("second.raw"), 16, fill=0x22)
    dom, base = export_domain(virt, env, disks=[lab.disk_xml(second, "vdb")])
    server = serve(virt, env, {"vm": base, "vm2": second})
    held = [lab.HeldConnection(server.port, "vm"),
            lab.HeldConnection(server.port, "vm2")]
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    lab.guest_write(dom, "vdb", 0x6b, 0, MiB)
    dom.destroy()
    for h in held:
        h.close()
    env.wait_clean()
    assert env.overlays() == []
    assert lab.disk_source(dom, "vda", inactive=True) == base
    assert lab.disk_source(dom, "vdb", inactive=True) == second
    assert lab.read_range(base, 0, MiB) == b"\x5a" * MiB
    assert lab.read_range(second, 0, MiB) == b"\x6b" * MiB
    dom.create()


def plant_map_read_leftovers(dom, base):
    """What a prerun killed in the middle of bitmaps.dirty() leaves in
    QEMU: its NBD server, a read-only node of the base and its export."""
    folder = tempfile.mkdtemp()
    try:
        tmp = bitmaps.TMP_PREFIX + "killed"
        bitmaps._start_server(dom, os.path.join(folder, "s"), tmp)
        bitmaps._qmp(dom, "blockdev-add", {
            "driver": "file", "filename": base, "node-name": tmp,
            "read-only": True, "locking": "off"})
        bitmaps._qmp(dom, "block-export-add", {
            "type": "nbd", "id": tmp, "node-name": tmp, "name": tmp,
            "writable": False})
    finally:
        shutil.rmtree(folder)
    return tmp


def test_recover_removes_what_a_killed_map_read_left_in_qemu(virt, env):
    dom, base, _ = freeze_and_kill(virt, env, signal.SIGTERM)
    tmp = plant_map_read_leftovers(dom, base)
    proc = env.hook("nbdsnap", "recover", base, check=0)
    assert "removed from QEMU" in proc.stdout and tmp in proc.stdout
    assert_clean(env, dom, base)
    assert bitmaps._qmp(dom, "query-block-exports") == []
    # QEMU's one NBD server is free again: a map can be read.
    names = [n["node-name"] for n in bitmaps._nodes(dom)]
    assert tmp not in names
    bitmaps._start_server(dom, env.path("free.sock"), "free")
    bitmaps._qmp(dom, "nbd-server-stop")
