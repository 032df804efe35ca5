"""Incremental manifests (issue 10) against real libvirtd and QEMU.

In every case the manifest a freeze leaves, incremental or full, must be
byte for byte what a full digest of the same frozen base makes (but for
its kind, creation time and source text), and the chain must break, into
a full digest, exactly where it cannot be trusted.
"""

import json
import os
import subprocess

import libvirt
import pytest

import lab
from lab import rpcgate
from test_freeze import MiB, SIZE, assert_clean, export_domain

from nbdsnap.hooks import history
from nbdsnap.hooks.config import Config
from nbdsnap.verify import manifest2, manifest2_write, sources

BLOCK = 64 * 1024


def manifest_path(env, dom, target="vda"):
    return os.path.join(env.path("manifests"),
                        "%s-%s.manifest" % (dom.name(), target))


def header(path):
    with manifest2.FileReader(path) as reader:
        return manifest2.read_header(reader)


def configure(env, **more):
    env.configure(digest="on", manifest_dir=env.path("manifests"), **more)


def tracked_domain(virt, env, **settings):
    """digest = on, a running domain, and its vda's manifest path."""
    configure(env, **settings)
    dom, base = export_domain(virt, env)
    return dom, base, manifest_path(env, dom)


def freeze(env, base):
    """A prerun, held: the base is frozen until thaw()."""
    env.hook("nbd-prerun", base, check=0)


def thaw(env, base):
    env.hook("nbd-postrun", base, check=0)
    env.wait_clean()


def wait_complete(path):
    lab.wait_until(lambda: header(path).complete, 60,
                   what="the manifest to complete")
    return header(path)


def assert_manifest_of(env, path, base):
    """path is what a full digest of base (frozen now) makes."""
    got = wait_complete(path)
    with manifest2.FileReader(path) as reader:
        xml = manifest2.read_domain_xml(reader, got)
    full = env.path("full.manifest")
    with sources.open_source(base) as source:
        manifest2_write.write_full(
            full, source, generation=got.generation, chain_id=got.chain_id,
            chain_started=got.chain_started, domain_xml=xml,
            algorithm=got.algorithm, source_name=got.source,
            created=got.created)
    want = header(full)
    assert got._replace(kind=want.kind) == want
    with open(path, "rb") as a, open(full, "rb") as b:
        assert a.read()[manifest2.HEADER_SIZE:] == \
            b.read()[manifest2.HEADER_SIZE:]
    return got


def cycle(env, base, path, writes=()):
    """One freeze: writes made while frozen; the manifest checked."""
    freeze(env, base)
    got = assert_manifest_of(env, path, base)
    for write in writes:
        write()
    thaw(env, base)
    return got


def last_history(env):
    conf = Config(state_dir=env.state_dir)
    return history.read(conf)[-1]


def test_chain_continues_through_writes_between_and_during_freezes(virt,
                                                                   env):
    dom, base, path = tracked_domain(virt, env)
    first = cycle(env, base, path, writes=[
        lambda: lab.guest_write(dom, "vda", 0x22, 3 * MiB + 4096, 4096)])
    assert first.kind == "full" and first.generation == 1
    assert last_history(env)["manifest_kind"] == "full"
    assert last_history(env)["manifest_why"] == "no previous manifest"
    assert last_history(env)["manifest_bytes_read"] >= SIZE * MiB - BLOCK

    # Writes between freezes, scattered, one across a block boundary.
    lab.guest_write(dom, "vda", 0x33, 10 * MiB, 4096)
    lab.guest_write(dom, "vda", 0x44, 20 * MiB - 2048, 4096)
    second = cycle(env, base, path)
    assert second.kind == "incremental" and second.generation == 2
    assert second.chain_id == first.chain_id
    assert second.chain_started == first.chain_started
    entry = last_history(env)
    assert entry["manifest_kind"] == "incremental"
    assert entry["manifest_why"] is None
    # The freeze's write (1 block) and these (3 blocks), nothing else.
    assert entry["manifest_bytes_read"] == 4 * BLOCK, entry
    assert entry["manifest_seconds"] is not None
    third = cycle(env, base, path)
    assert third.kind == "incremental" and third.generation == 3
    assert last_history(env)["manifest_bytes_read"] == 0
    assert_clean(env, dom, base)
    assert bitmaps_of(dom) == ["nbdsnap-%s-3" % first.chain_id]


def bitmaps_of(dom):
    out = subprocess.run(
        ["virsh", "-c", lab.URI, "qemu-monitor-command", dom.name(),
         json.dumps({"execute": "query-named-block-nodes",
                     "arguments": {"flat": True}})],
        capture_output=True, text=True, check=True).stdout
    names = set()
    for node in json.loads(out)["return"]:
        for bitmap in node.get("dirty-bitmaps", []):
            names.add(bitmap["name"])
    return sorted(names)


def test_qcow2_base_chain(virt, env):
    configure(env)
    base = env.path("base.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base,
                    "%dM" % SIZE], check=True)
    dom = virt.define(env.name("q"), [lab.disk_xml(base, "vda",
                                                   fmt="qcow2")])
    path = manifest_path(env, dom)
    lab.guest_write(dom, "vda", 0x11, 0, 2 * MiB)
    first = cycle(env, base, path, writes=[
        lambda: lab.guest_write(dom, "vda", 0x22, 8 * MiB, 64 * 1024)])
    lab.guest_write(dom, "vda", 0x33, 30 * MiB, 4096)     # a new cluster
    second = cycle(env, base, path)
    assert (first.kind, second.kind) == ("full", "incremental")
    assert second.size > first.size        # the qcow2 file grew
    assert_clean(env, dom, base)


@pytest.mark.parametrize("how", ["restarted", "managed-saved"])
def test_qemu_gone_breaks_the_chain(virt, env, how):
    dom, base, path = tracked_domain(virt, env)
    first = cycle(env, base, path)
    if how == "restarted":
        dom.destroy()
        dom.create()
    else:
        dom.managedSave(0)
        dom.create()
    lab.guest_write(dom, "vda", 0x55, 5 * MiB, 4096)
    second = cycle(env, base, path)
    assert second.kind == "full" and second.generation == 2
    assert second.chain_id != first.chain_id
    assert "gone or stopped recording" in last_history(env)["manifest_why"]
    third = cycle(env, base, path)
    assert third.kind == "incremental"


def test_shut_off_domain_makes_a_full_manifest_and_the_next_one_too(virt,
                                                                    env):
    dom, base, path = tracked_domain(virt, env)
    cycle(env, base, path)
    dom.destroy()
    offline = cycle(env, base, path)
    assert offline.kind == "full"
    dom.create()
    lab.guest_write(dom, "vda", 0x66, 7 * MiB, 4096)
    again = cycle(env, base, path)
    assert again.kind == "full"
    assert cycle(env, base, path).kind == "incremental"


def test_paused_domain_continues_the_chain(virt, env):
    dom, base, path = tracked_domain(virt, env)
    cycle(env, base, path)
    lab.guest_write(dom, "vda", 0x77, 9 * MiB, 4096)
    dom.suspend()
    try:
        assert cycle(env, base, path).kind == "incremental"
    finally:
        dom.resume()


def test_previous_manifest_deleted_or_damaged_breaks_the_chain(virt, env):
    dom, base, path = tracked_domain(virt, env)
    first = cycle(env, base, path)
    os.unlink(path)
    second = cycle(env, base, path)
    assert second.kind == "full" and second.chain_id != first.chain_id
    # A damaged block run: the header is sound, the digest finds it out.
    with open(path, "r+b") as f:
        run_offset, _ = header(path).run(0)
        f.seek(run_offset)
        f.write(b"\xff" * 32)
    lab.guest_write(dom, "vda", 0x12, 12 * MiB, 4096)
    third = cycle(env, base, path)
    assert third.kind == "full"
    assert cycle(env, base, path).kind == "incremental"


def test_two_disk_domain_tracks_each_disk(virt, env):
    configure(env)
    second_disk = lab.make_image(env.path("data.raw"), SIZE, fill=0x99)
    dom, base = export_domain(virt, env,
                              disks=[lab.disk_xml(second_disk, "vdb")])
    paths = {base: manifest_path(env, dom), second_disk:
             manifest_path(env, dom, "vdb")}
    for _ in range(2):
        for disk, path in paths.items():
            freeze(env, disk)
        for disk, path in paths.items():
            assert_manifest_of(env, path, disk)
        lab.guest_write(dom, "vdb", 0x21, 2 * MiB, 4096)
        for disk in paths:
            env.hook("nbd-postrun", disk, check=0)
        env.wait_clean()
        lab.guest_write(dom, "vda", 0x31, 4 * MiB, 4096)
    for disk, path in paths.items():
        freeze(env, disk)
        assert assert_manifest_of(env, path, disk).kind == "incremental"
        thaw(env, disk)


def test_chain_survives_a_libvirtd_restart(virt, env):
    dom, base, path = tracked_domain(virt, env)
    cycle(env, base, path)
    lab.guest_write(dom, "vda", 0x42, 6 * MiB, 4096)
    lab.restart_libvirtd(virt)
    dom = virt.conn.lookupByName(dom.name())
    assert cycle(env, base, path).kind == "incremental"


def test_old_chain_gets_a_full_digest(virt, env):
    dom, base, path = tracked_domain(virt, env, digest_full_days=0)
    cycle(env, base, path)
    second = cycle(env, base, path)
    assert second.kind == "full"
    assert len(bitmaps_of(dom)) == 1


def test_digest_off_never_talks_to_qemu(virt, env):
    """QMP taints the domain (custom-monitor): only digest = on may."""
    env.configure(digest="off")
    dom, base = export_domain(virt, env)
    freeze(env, base)
    thaw(env, base)
    with open("/var/log/libvirt/qemu/%s.log" % dom.name()) as f:
        assert "custom-monitor" not in f.read()
    assert bitmaps_of(dom) == []


def session_phase(env):
    folder = os.path.join(env.state_dir, "sessions")
    for name in env.sessions():
        try:
            with open(os.path.join(folder, name)) as f:
                return json.load(f)["phase"]
        except (OSError, ValueError):
            pass
    return None


def test_writes_during_the_commit_are_in_the_next_manifest(virt, env):
    """The dangerous interleaving on purpose: the postrun is held between
    its commit job's READY and its pivot (lab.rpcgate keeps its pivot call
    from libvirtd), the job runs, and the guest writes then (QEMU mirrors
    them into the base); the base and the next manifest must hold them.

    Waiting for the job and sending SIGSTOP lost the race now and then:
    8 MiB commit in a blink, and the postrun had pivoted first."""
    dom, base, path = tracked_domain(virt, env)
    freeze(env, base)
    wait_complete(path)
    lab.guest_write(dom, "vda", 0x5c, 0, 8 * MiB)       # into the overlay
    with rpcgate.CallGate(env.folder, rpcgate.is_pivot) as gate:
        hook_env = dict(os.environ, **env.vars)
        hook_env["LIBVIRT_DEFAULT_URI"] = gate.uri
        postrun = subprocess.Popen(
            [os.path.join(lab.VENV_BIN, "nbd-postrun"), base], env=hook_env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        try:
            lab.wait_until(gate.held.is_set, 60, what="the postrun's pivot")
            assert session_phase(env) == "committing"
            assert dom.blockJobInfo("vda", 0), "no commit job at the pivot"
            lab.guest_write(dom, "vda", 0x6d, 17 * MiB + 512, 4096)
            lab.guest_write(dom, "vda", 0x6e, 25 * MiB, 3 * 4096)
            # Still held: the job ran through the writes, not pivoted.
            assert dom.blockJobInfo("vda", 0), "the commit ended early"
            assert postrun.poll() is None
        finally:
            gate.release()
            returncode = postrun.wait(120)
    assert returncode == 0, postrun.stderr.read()
    env.wait_clean()
    assert lab.read_range(base, 17 * MiB + 512, 4096) == b"\x6d" * 4096
    assert lab.read_range(base, 25 * MiB, 3 * 4096) == b"\x6e" * 3 * 4096
    second = cycle(env, base, path)
    assert second.kind == "incremental"
    # 8 MiB from the freeze, 1 + 1 blocks written during the commit.
    assert last_history(env)["manifest_bytes_read"] == 8 * MiB + 2 * BLOCK


def test_a_disabled_bitmap_never_continues_the_chain(virt, env):
    """What a prerun killed right after its swap leaves: the chain's bitmap
    disabled (it saw no write since).  The next freeze is full."""
    dom, base, path = tracked_domain(virt, env)
    first = cycle(env, base, path)
    (name,) = bitmaps_of(dom)
    qmp(dom, "block-dirty-bitmap-disable", {"node": "libvirt-1-storage",
                                            "name": name})
    lab.guest_write(dom, "vda", 0x3a, 14 * MiB, 4096)
    second = cycle(env, base, path)
    assert second.kind == "full" and second.chain_id != first.chain_id
    assert bitmaps_of(dom) == ["nbdsnap-%s-2" % second.chain_id]


def qmp(dom, command, arguments):
    subprocess.run(["virsh", "-c", lab.URI, "qemu-monitor-command",
                    dom.name(), json.dumps({"execute": command,
                                            "arguments": arguments})],
                   capture_output=True, text=True, check=True)


def test_a_disk_shrunk_and_grown_back_is_still_the_full_digest(virt, env):
    """A live resize down and back up between freezes: the bytes past the
    smaller size are new (zeros) yet no bitmap marks them (QEMU truncates
    its bitmaps, it does not dirty them).  The next manifest must still be
    the full digest's: on a raw file they are a hole, known zeros."""
    dom, base, path = tracked_domain(virt, env)
    cycle(env, base, path)
    dom.blockResize("vda", (SIZE // 2) * MiB,
                    libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    dom.blockResize("vda", SIZE * MiB,
                    libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    assert lab.read_range(base, SIZE * MiB - 4096, 4096) == bytes(4096)
    cycle(env, base, path)          # asserts the full digest's bytes
    assert_clean(env, dom, base)
