"""nbd-pull against the VM host as users run it: libvirtd, a running QEMU
domain, nbd-server with the hooks and digest = on, the manifest export.

What a user checks: the copy is the frozen base, a refresh moves only the
blocks the guest wrote, the freeze ends (no overlay, no session), and the
outcome reaches syslog.
"""

import json
import os
import subprocess
import threading

import lab
from nbdsnap.hooks import history
from nbdsnap.hooks.config import Config
from test_freeze import MiB, SIZE, assert_clean, export_domain

BLOCK = 64 * 1024


def configure(env):
    env.configure(digest="on", manifest_dir=env.path("manifests"))


def serve(virt, env, dom, base):
    manifest = os.path.join(env.path("manifests"),
                            "%s-vda.manifest" % dom.name())
    return virt.nbd_server(env.folder, {
        "vm": (base, None),
        "vm.manifest": (manifest, {"prerun": "", "postrun": ""}),
    }, env.vars)


def pull(env, server, copy, *more, check=0):
    cmd = [os.path.join(lab.VENV_BIN, "nbd-pull"), "--json",
           "--syslog-socket", env.path("syslog"), *more,
           server.uri("vm"), copy]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == check, proc.stderr
    assert len(proc.stderr.strip().splitlines()) >= 1
    return json.loads(proc.stdout)["pulls"][0], proc.stderr


def test_first_pull_then_a_refresh_moves_only_what_the_guest_wrote(
        virt, env, syslog):
    configure(env)
    dom, base = export_domain(virt, env)
    server = serve(virt, env, dom, base)
    copy = env.path("copy.raw")

    first, line = pull(env, server, copy)
    assert_clean(env, dom, base)
    assert lab.sha256(copy) == lab.sha256(base)
    assert first["kind"] == "full"
    assert first["blocks_fetched"] == SIZE * MiB // BLOCK
    assert first["digest"] and "equal to" in line

    # Three scattered 4 KiB writes: three blocks, one across a boundary
    # (two blocks).
    lab.guest_write(dom, "vda", 0x21, 3 * MiB + 8192, 4096)
    lab.guest_write(dom, "vda", 0x22, 17 * MiB, 4096)
    lab.guest_write(dom, "vda", 0x23, 29 * MiB - 2048, 4096)
    second, _ = pull(env, server, copy)
    assert_clean(env, dom, base)
    assert lab.sha256(copy) == lab.sha256(base)
    assert second["kind"] == "incremental"
    assert second["blocks_fetched"] == 4
    assert second["blocks_changed"] == 4
    # The blocks, plus the manifest's header, chunk table, the runs of
    # the chunks that changed (16 MiB chunks: 8 KiB each) and the XML.
    assert second["bytes_read"] <= 4 * BLOCK + 4096 + 2 * 8192 + 16384
    assert second["digest"] != first["digest"]
    assert any("equal to" in r for r in syslog)


def test_a_pull_while_the_guest_writes_is_the_frozen_base(virt, env):
    configure(env)
    dom, base = export_domain(virt, env)
    server = serve(virt, env, dom, base)
    copy = env.path("copy.raw")
    pull(env, server, copy)
    assert_clean(env, dom, base)

    held = lab.HeldConnection(server.port, "vm")        # the freeze
    frozen = lab.sha256(base)
    stop = threading.Event()
    written = []

    def writer():
        i = 0
        while not stop.is_set():
            offset = (i * 5 * MiB + i * 4096) % (SIZE * MiB - 4096)
            lab.guest_write(dom, "vda", 0x40 + i % 64, offset, 4096)
            written.append((offset, 0x40 + i % 64))
            i += 1
    t = threading.Thread(target=writer)
    t.start()
    try:
        result, _ = pull(env, server, copy)
    finally:
        stop.set()
        t.join()
    held.close()
    assert lab.sha256(copy) == frozen
    assert result["kind"] == "incremental"
    assert written, "the guest wrote nothing during the pull"
    assert_clean(env, dom, base)
    latest = {}
    for offset, byte in written:
        latest[offset] = byte
    for offset, byte in latest.items():
        assert lab.read_range(base, offset, 4096) == bytes([byte]) * 4096


def test_a_sparse_disk_moves_only_its_data(virt, env):
    configure(env)
    base = lab.make_image(env.path("sparse.raw"), SIZE)
    with open(base, "r+b") as f:
        for offset in (0, 7 * MiB, 20 * MiB):
            f.seek(offset)
            f.write(b"\x5a" * (256 * 1024))
    dom = virt.define(env.name("s"), [lab.disk_xml(base, "vda")])
    server = serve(virt, env, dom, base)
    copy = env.path("copy.raw")
    result, _ = pull(env, server, copy)
    assert_clean(env, dom, base)
    assert lab.sha256(copy) == lab.sha256(base)
    assert result["blocks_fetched"] == 12
    assert result["blocks_zero"] == SIZE * MiB // BLOCK - 12
    assert result["bytes_read"] < 12 * BLOCK + 64 * 1024
    assert os.stat(copy).st_blocks * 512 <= 2 * MiB


def test_without_a_manifest_it_says_what_to_change_and_freezes_nothing(
        virt, env):
    env.configure(digest="off")
    dom, base = export_domain(virt, env)
    server = virt.nbd_server(env.folder, {"vm": (base, None)}, env.vars)
    copy = env.path("copy.raw")
    cmd = [os.path.join(lab.VENV_BIN, "nbd-pull"), "--syslog-socket",
           env.path("syslog"), server.uri("vm"), copy]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "set digest = on" in lines[0], lines
    assert not os.path.exists(copy)
    # Found before any connection to the export: no freeze at all.
    assert history.read(Config(state_dir=env.state_dir)) == []
    assert_clean(env, dom, base)


def test_two_disks_of_a_domain_in_one_run(virt, env):
    configure(env)
    second = lab.make_image(env.path("vdb.raw"), 16, fill=0x33)
    dom, base = export_domain(virt, env,
                              disks=[lab.disk_xml(second, "vdb")])
    manifests = env.path("manifests")
    server = virt.nbd_server(env.folder, {
        "vda": (base, None),
        "vda.manifest": (os.path.join(manifests, "%s-vda.manifest"
                                      % dom.name()),
                         {"prerun": "", "postrun": ""}),
        "vdb": (second, None),
        "vdb.manifest": (os.path.join(manifests, "%s-vdb.manifest"
                                      % dom.name()),
                         {"prerun": "", "postrun": ""}),
    }, env.vars)
    copies = [env.path("vda.img"), env.path("vdb.img")]
    cmd = [os.path.join(lab.VENV_BIN, "nbd-pull"), "--json",
           "--syslog-socket", env.path("syslog"),
           server.uri("vda"), copies[0], server.uri("vdb"), copies[1]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    pulls = json.loads(proc.stdout)["pulls"]
    assert [p["copy"] for p in pulls] == copies
    assert len(proc.stderr.strip().splitlines()) == 2
    env.wait_clean()
    assert lab.sha256(copies[0]) == lab.sha256(base)
    assert lab.sha256(copies[1]) == lab.sha256(second)
    assert env.overlays() == []
