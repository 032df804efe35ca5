"""The freeze end to end: nbd-server runs our hooks, real clients copy.

Each test asserts what an operator would check: the copy equals the base as
it was at the freeze, every guest write made while frozen is in the base
after the commit, the domain is back on its base, and no overlay is left.
"""

import contextlib
import fcntl
import json
import os
import signal
import subprocess

import libvirt
import pytest

import lab

MiB = 1 << 20
SIZE = 32   # MiB per test disk


def export_domain(virt, env, name="d", disks=None, start=True):
    """A domain whose vda is a fresh raw image filled with 0x11."""
    image = "base.raw" if name == "d" else name + ".raw"
    base = lab.make_image(env.path(image), SIZE, fill=0x11)
    disks = disks or []
    dom = virt.define(env.name(name),
                      [lab.disk_xml(base, "vda")] + disks, start=start)
    return dom, base


def serve(virt, env, exports):
    return virt.nbd_server(env.folder, {n: (p, None)
                                        for n, p in exports.items()},
                           env.vars)


@contextlib.contextmanager
def held_lock(env, name):
    """Hold the hooks' lock NAME (a disk key, or domain-UUID), as a hook
    would."""
    os.makedirs(env.state_dir, mode=0o711, exist_ok=True)
    locks = os.path.join(env.state_dir, "locks")
    os.makedirs(locks, mode=0o700, exist_ok=True)
    path = os.path.join(locks, name + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)


def has_open(pid, path):
    """True if process pid has path open (it waits on that lock)."""
    folder = "/proc/%d/fd" % pid
    with contextlib.suppress(OSError):
        for fd in os.listdir(folder):
            with contextlib.suppress(OSError):
                if os.readlink(os.path.join(folder, fd)) == path:
                    return True
    return False


def hook_in_background(env, name, *args):
    return subprocess.Popen([os.path.join(lab.VENV_BIN, name)] + list(args),
                            env=dict(os.environ, **env.vars), text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def assert_clean(env, dom, base, target="vda"):
    env.wait_clean()
    assert lab.disk_source(dom, target) == base
    assert lab.disk_source(dom, target, inactive=True) == base
    assert env.overlays() == []


def test_multiconnection_copy_is_the_frozen_base_and_writes_survive(virt, env):
    dom, base = export_domain(virt, env)
    frozen = lab.sha256(base)
    server = serve(virt, env, {"vm": base})

    held = lab.HeldConnection(server.port, "vm")       # the freeze starts
    lab.guest_write(dom, "vda", 0x5a, 1 * MiB, 1 * MiB)
    lab.guest_write(dom, "vda", 0x6b, (SIZE - 1) * MiB, MiB)
    copy = env.path("copy.raw")
    lab.nbdcopy(server.uri("vm"), copy, connections=4)
    lab.guest_write(dom, "vda", 0x7c, 3 * MiB, 4096)
    assert lab.sha256(copy) == frozen
    assert lab.sha256(base) == frozen           # nothing reached the base
    held.close()

    assert_clean(env, dom, base)
    assert lab.read_range(base, 1 * MiB, MiB) == b"\x5a" * MiB
    assert lab.read_range(base, (SIZE - 1) * MiB, MiB) == b"\x6b" * MiB
    assert lab.read_range(base, 3 * MiB, 4096) == b"\x7c" * 4096
    assert lab.read_range(base, 0, MiB) == b"\x11" * MiB
    assert lab.guest_reads(dom, "vda", 0x5a, 1 * MiB, MiB)


def test_single_connection_copy(virt, env):
    dom, base = export_domain(virt, env)
    frozen = lab.sha256(base)
    server = serve(virt, env, {"vm": base})
    copy = env.path("copy.raw")
    lab.nbdcopy(server.uri("vm"), copy, connections=1)
    assert lab.sha256(copy) == frozen
    assert_clean(env, dom, base)


def test_two_clients_share_one_freeze(virt, env):
    dom, base = export_domain(virt, env)
    frozen = lab.sha256(base)
    server = serve(virt, env, {"vm": base})
    first = lab.HeldConnection(server.port, "vm")
    lab.guest_write(dom, "vda", 0x22, 0, MiB)
    second = lab.HeldConnection(server.port, "vm")
    (name,) = env.sessions()
    with open(os.path.join(env.state_dir, "sessions", name)) as f:
        state = json.load(f)
    assert len(state["holders"]) == 2
    assert len(env.overlays()) == 1
    assert second.read(0, 4096) == b"\x11" * 4096   # still the frozen base
    copies = [env.path("a.raw"), env.path("b.raw")]
    procs = [subprocess.Popen(["nbdcopy", server.uri("vm"), c])
             for c in copies]
    assert [p.wait(120) for p in procs] == [0, 0]
    assert [lab.sha256(c) for c in copies] == [frozen, frozen]
    first.close()
    assert env.sessions() != [] or pytest.fail("committed with a holder left")
    assert len(env.overlays()) == 1
    second.close()
    assert_clean(env, dom, base)
    assert lab.read_range(base, 0, MiB) == b"\x22" * MiB


def test_second_disk_is_untouched(virt, env):
    other = lab.make_image(env.path("other.raw"), 8, fill=0x33)
    dom, base = export_domain(virt, env,
                              disks=[lab.disk_xml(other, "vdb")])
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    assert lab.disk_source(dom, "vdb") == other     # no overlay for vdb
    lab.guest_write(dom, "vdb", 0x44, 0, MiB)
    assert lab.read_range(other, 0, MiB) == b"\x44" * MiB   # written through
    held.close()
    assert_clean(env, dom, base)
    assert lab.disk_source(dom, "vdb") == other
    assert len(env.overlays()) == 0


def test_linked_clone_stays_on_its_top_and_template_is_not_written(virt, env):
    template = lab.make_image(env.path("template.raw"), SIZE, fill=0x55)
    top = lab.make_image(env.path("top.qcow2"), SIZE, fmt="qcow2",
                         backing=template)
    template_sum = lab.sha256(template)
    dom = virt.define(env.name("clone"),
                      [lab.disk_xml(top, "vda", fmt="qcow2")])
    lab.guest_write(dom, "vda", 0x66, 0, MiB)         # before: into top
    server = serve(virt, env, {"vm": top})
    held = lab.HeldConnection(server.port, "vm")
    # QEMU flushes top.qcow2's cached metadata when the snapshot reopens it
    # read-only: the frozen image is the file as it is now, not before.
    top_frozen = lab.sha256(top)
    lab.guest_write(dom, "vda", 0x77, 2 * MiB, MiB)    # during: overlay
    copy = env.path("copy.qcow2")
    lab.nbdcopy(server.uri("vm"), copy)
    assert lab.sha256(copy) == top_frozen
    subprocess.run(["qemu-img", "check", "-q", copy], check=True)
    held.close()

    assert_clean(env, dom, top)
    assert lab.sha256(template) == template_sum
    assert lab.guest_reads(dom, "vda", 0x77, 2 * MiB, MiB)
    assert lab.guest_reads(dom, "vda", 0x66, 0, MiB)
    assert lab.guest_reads(dom, "vda", 0x55, 4 * MiB, MiB)
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", top], check=True,
        capture_output=True, text=True).stdout)
    assert info["backing-filename"] == template


def test_shut_off_domain_is_served_twice_unchanged(virt, env):
    dom, base = export_domain(virt, env, start=False)
    before_xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    frozen = lab.sha256(base)
    server = serve(virt, env, {"vm": base})
    for i in range(2):
        copy = env.path("copy%d.raw" % i)
        lab.nbdcopy(server.uri("vm"), copy)
        assert lab.sha256(copy) == frozen
        env.wait_clean()
    assert dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == before_xml
    assert not dom.isActive()
    assert env.overlays() == []
    assert lab.sha256(base) == frozen


def test_paused_domain_is_frozen_and_committed(virt, env):
    dom, base = export_domain(virt, env)
    server = serve(virt, env, {"vm": base})
    lab.guest_write(dom, "vda", 0x21, 0, MiB)
    dom.suspend()
    held = lab.HeldConnection(server.port, "vm")
    assert held.read(0, 4096) == b"\x21" * 4096
    dom.resume()
    lab.guest_write(dom, "vda", 0x31, MiB, MiB)
    dom.suspend()
    held.close()
    assert_clean(env, dom, base)
    assert lab.read_range(base, MiB, MiB) == b"\x31" * MiB
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED


def test_stale_session_is_refused(virt, env):
    dom, base = export_domain(virt, env)
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    # SIGTERM to nbd-server kills its children without running postrun.
    server.stop(signal.SIGTERM)
    held.drop()
    assert len(env.sessions()) == 1
    server.start()
    with pytest.raises(lab.RefusedError):
        lab.HeldConnection(server.port, "vm")
    proc = env.hook("nbd-prerun", base, check=1)
    assert "stale" in proc.stderr and "nbdsnap recover %s" % base in proc.stderr
    assert proc.stderr.count("\n") == 1                  # one clear line
    status = json.loads(env.hook("nbdsnap", "status", "--json",
                                 check=0).stdout)
    (entry,) = status["sessions"]
    assert entry["verdict"] == "stale"
    assert [h["alive"] for h in entry["holders"]] == [False]
    # Nothing was lost: the guest's write is in the overlay it still runs on.
    assert lab.disk_source(dom, "vda") == entry["overlay"]
    assert lab.guest_reads(dom, "vda", 0x5a, 0, MiB)


def test_history_records_each_session(virt, env):
    dom, base = export_domain(virt, env)
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    lab.guest_write(dom, "vda", 0x5a, 0, 4 * MiB)
    lab.nbdcopy(server.uri("vm"), env.path("copy.raw"), connections=2)
    held.close()
    env.wait_clean()
    (entry,) = json.loads(env.hook("nbdsnap", "history", "--json",
                                   check=0).stdout)["sessions"]
    assert entry["result"] == "online commit"
    assert entry["connections"] == 3
    assert entry["consistency"] == "crash-consistent"
    assert entry["overlay_bytes"] >= 4 * MiB
    assert entry["commit_seconds"] > 0 and entry["end"] > entry["start"]
    text = env.hook("nbdsnap", "history", check=0).stdout
    assert base in text and "online commit" in text


def test_two_disks_of_one_domain_snapshot_one_at_a_time(virt, env):
    # The snapshot rewrites the whole persistent definition and sets the
    # domain's agent timeout: two at once could revert each other's disk.
    other = lab.make_image(env.path("other.raw"), 8, fill=0x33)
    dom, base = export_domain(virt, env,
                              disks=[lab.disk_xml(other, "vdb")])
    with held_lock(env, "domain-" + dom.UUIDString()) as lock:
        preruns = [hook_in_background(env, "nbd-prerun", path)
                   for path in (base, other)]
        lab.wait_until(lambda: all(has_open(p.pid, lock) for p in preruns)
                       or any(p.poll() is not None for p in preruns),
                       60, what="both preruns to wait for the domain lock")
        assert [p.poll() for p in preruns] == [None, None]
        assert lab.disk_source(dom, "vda") == base      # no snapshot yet
        assert lab.disk_source(dom, "vdb") == other
    for p in preruns:
        assert p.wait(120) == 0, p.stderr.read()
    overlays = sorted(os.path.join(env.snapshot_dir, n)
                      for n in env.overlays())
    assert len(overlays) == 2
    for inactive in (False, True):
        assert sorted(lab.disk_source(dom, t, inactive=inactive)
                      for t in ("vda", "vdb")) == overlays
    lab.guest_write(dom, "vdb", 0x44, 0, MiB)
    env.hook("nbd-postrun", base, check=0)
    env.hook("nbd-postrun", other, check=0)
    assert_clean(env, dom, base)
    assert lab.disk_source(dom, "vdb", inactive=True) == other
    assert lab.disk_source(dom, "vdb") == other
    assert lab.read_range(other, 0, MiB) == b"\x44" * MiB
