"""A domain's disks frozen at one instant (nbd-prerun --group).

The sections of a group name each other's disks; the first connection to
any of them takes one atomic snapshot of all of them, a connection to any
holds them all, and the last one to end commits them all.  Each test
checks what an operator would: where the domain's disks point, what the
copies hold, that every guest write made while frozen is in the bases
afterwards, and that no overlay is left.
"""

import json
import os
import signal
import subprocess
import threading

import libvirt
import pytest

import lab
from test_libvirt_hook import installed_hook

MiB = 1 << 20
SECTOR = 512


def group_domain(virt, env, start=True, fill=(0x11, 0x33), devices=()):
    """A domain with vda (32 MiB) and vdb (16 MiB), raw files, and
    devices (more device XML)."""
    vda = lab.make_image(env.path("vda.raw"), 32, fill=fill[0])
    vdb = lab.make_image(env.path("vdb.raw"), 16, fill=fill[1])
    dom = virt.define(env.name("g"), [lab.disk_xml(vda, "vda"),
                                      lab.disk_xml(vdb, "vdb"), *devices],
                      start=start)
    return dom, {"vda": vda, "vdb": vdb}


def hooks(dom, target, group="vda,vdb"):
    prerun = [os.path.join(lab.VENV_BIN, "nbd-prerun"), "--domain",
              dom.name(), "--disk", target]
    if group:
        prerun += ["--group", group]
    return {"prerun": " ".join(prerun) + " %s",
            "postrun": os.path.join(lab.VENV_BIN, "nbd-postrun") + " %s"}


def serve(virt, env, dom, bases, group="vda,vdb", manifests=False):
    exports = {t: (p, hooks(dom, t, group)) for t, p in bases.items()}
    if manifests:
        env.configure(digest="on", manifest_dir=env.path("manifests"))
        for t in bases:
            exports[t + ".manifest"] = (
                env.path("manifests", "%s-%s.manifest" % (dom.name(), t)),
                {"prerun": "", "postrun": ""})
    return virt.nbd_server(env.folder, exports, env.vars)


def sessions(env):
    folder = os.path.join(env.state_dir, "sessions")
    result = {}
    for name in env.sessions():
        with open(os.path.join(folder, name)) as f:
            state = json.load(f)
        result[state["disk"]] = state
    return result


def status(env):
    return json.loads(env.hook("nbdsnap", "status", "--json",
                               check=0).stdout)["sessions"]


def assert_clean(env, dom, bases):
    env.wait_clean()
    for target, base in bases.items():
        assert lab.disk_source(dom, target) == base
        assert lab.disk_source(dom, target, inactive=True) == base
    assert env.overlays() == []


def test_one_connection_freezes_every_disk_and_holds_them_all(virt, env):
    dom, bases = group_domain(virt, env)
    frozen = {t: lab.sha256(p) for t, p in bases.items()}
    server = serve(virt, env, dom, bases)
    held = lab.HeldConnection(server.port, "vda")
    found = sessions(env)
    assert sorted(found) == ["vda", "vdb"]
    assert found["vda"]["group"] == found["vdb"]["group"]
    assert len(found["vda"]["holders"]) == 1 and found["vdb"]["holders"] == []
    for target, state in found.items():
        assert state["phase"] == "frozen"
        assert lab.disk_source(dom, target) == state["overlay"]
    assert len(env.overlays()) == 2
    # The other disk is held by the connection to the first.
    assert {e["disk"]: e["verdict"] for e in status(env)} == \
        {"vda": "live", "vdb": "live"}
    assert "vda, vdb frozen at one instant" in env.hook(
        "nbdsnap", "status", check=0).stdout
    lab.guest_write(dom, "vdb", 0x5a, 0, MiB)
    lab.guest_write(dom, "vda", 0x6b, MiB, MiB)
    copy = env.path("vdb.copy")
    lab.nbdcopy(server.uri("vdb"), copy, connections=2)
    assert lab.sha256(copy) == frozen["vdb"]
    # vdb's clients are gone, vda's is not: nothing is committed yet.
    assert sorted(sessions(env)) == ["vda", "vdb"]
    assert len(env.overlays()) == 2
    held.close()
    assert_clean(env, dom, bases)
    assert lab.read_range(bases["vdb"], 0, MiB) == b"\x5a" * MiB
    assert lab.read_range(bases["vda"], MiB, MiB) == b"\x6b" * MiB
    entries = json.loads(env.hook("nbdsnap", "history", "--json",
                                  check=0).stdout)["sessions"]
    assert sorted(e["disk"] for e in entries) == ["vda", "vdb"]
    assert {e["group"]["id"] for e in entries} == \
        {found["vda"]["group"]["id"]}
    assert all(e["result"] == "online commit" for e in entries)
    assert "g-" in env.hook("nbdsnap", "history", check=0).stdout


def test_the_last_connection_to_any_disk_commits_them_all(virt, env):
    dom, bases = group_domain(virt, env)
    server = serve(virt, env, dom, bases)
    first = lab.HeldConnection(server.port, "vda")
    second = lab.HeldConnection(server.port, "vdb")   # joins: no snapshot
    assert len(env.overlays()) == 2
    assert [len(s["holders"]) for _, s in sorted(sessions(env).items())] \
        == [1, 1]
    lab.guest_write(dom, "vda", 0x22, 0, MiB)
    first.close()
    lab.wait_until(lambda: sessions(env)["vda"]["holders"] == [], 30,
                   what="vda's postrun")
    assert len(env.overlays()) == 2 and len(sessions(env)) == 2
    assert second.read(0, 4096) == b"\x33" * 4096    # still frozen
    second.close()
    assert_clean(env, dom, bases)
    assert lab.read_range(bases["vda"], 0, MiB) == b"\x22" * MiB


def _last_written(path, size):
    """The number of the last numbered write in path: its sectors
    0..n-1 were written 0x01 in order, the rest are zeros."""
    data = lab.read_range(path, 0, size)
    n = 0
    while n * SECTOR < size and data[n * SECTOR] == 1:
        n += 1
    return n


class NumberedWrites(threading.Thread):
    """Write sector n of vda, then sector n of vdb, n = 0, 1, 2...,
    without pause, through QEMU's monitor, as the guest would."""

    def __init__(self, dom):
        super().__init__(daemon=True)
        self.dom = dom
        self.stop = threading.Event()
        self.count = 0
        self.error = None
        self.aliases = {t: lab.disk_alias(dom, t) for t in ("vda", "vdb")}

    def write(self, target, n):
        lab.hmp(self.dom, 'qemu-io -d /machine/peripheral/%s/'
                        'virtio-backend "write -P 0x01 %d %d"'
                        % (self.aliases[target], n * SECTOR, SECTOR))

    def run(self):
        try:
            while not self.stop.is_set() and self.count < 16 * MiB // SECTOR:
                self.write("vda", self.count)
                self.write("vdb", self.count)
                self.count += 1
        except Exception as e:          # noqa: BLE001 (reported by the test)
            self.error = e


@pytest.mark.parametrize("group", ["vda,vdb", None])
def test_the_copies_of_a_group_are_of_one_instant(virt, env, group):
    """Both disks are pulled by one nbd-pull while numbered writes go to
    vda then vdb: with the group, the numbers in the copies differ by at
    most one; frozen one after the other (no --group), by many, which
    shows the test can tell."""
    dom, bases = group_domain(virt, env, fill=(0, 0))
    server = serve(virt, env, dom, bases, group=group, manifests=True)
    writes = NumberedWrites(dom)
    writes.start()
    lab.wait_until(lambda: writes.count > 20 or writes.error, 60,
                   what="the numbered writes to start")
    copies = {t: env.path(t + ".copy") for t in bases}
    cmd = [os.path.join(lab.VENV_BIN, "nbd-pull"), "--syslog-socket",
           env.path("syslog"), server.uri("vda"), copies["vda"],
           server.uri("vdb"), copies["vdb"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    env.wait_clean()
    writes.stop.set()
    writes.join(60)
    assert writes.error is None, writes.error
    a = _last_written(copies["vda"], 16 * MiB)
    b = _last_written(copies["vdb"], 16 * MiB)
    assert 0 < a < writes.count and 0 < b < writes.count
    if group:
        assert a - b in (0, 1), (a, b)      # vda is written first
    else:
        assert abs(a - b) > 1, (a, b)
    # Every write made while frozen reached the bases.
    assert_clean(env, dom, bases)
    assert _last_written(bases["vda"], 16 * MiB) == writes.count
    assert _last_written(bases["vdb"], 16 * MiB) == writes.count


def freeze_and_kill(virt, env):
    """A group frozen by a connection to vda, nbd-server then stopped
    (its children die without postrun): a stale group."""
    dom, bases = group_domain(virt, env)
    server = serve(virt, env, dom, bases)
    held = lab.HeldConnection(server.port, "vda")
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    lab.guest_write(dom, "vdb", 0x6b, 0, MiB)
    server.stop(signal.SIGTERM)
    held.drop()
    return dom, bases, server


def test_a_stale_group_is_refused_then_recovered_whole(virt, env):
    dom, bases, server = freeze_and_kill(virt, env)
    assert {e["disk"]: e["verdict"] for e in status(env)} == \
        {"vda": "stale", "vdb": "stale"}
    server.start()
    with pytest.raises(lab.RefusedError):
        lab.HeldConnection(server.port, "vdb")
    proc = env.hook("nbd-prerun", "--domain", dom.name(), "--disk", "vdb",
                    "--group", "vda,vdb", bases["vdb"], check=1)
    assert "stale" in proc.stderr and proc.stderr.count("\n") == 1
    assert len(env.overlays()) == 2
    # Recovering one disk of the group recovers the group.
    proc = env.hook("nbdsnap", "recover", bases["vdb"], check=0)
    assert "recovered with it" in proc.stdout
    assert_clean(env, dom, bases)
    assert lab.read_range(bases["vda"], 0, MiB) == b"\x5a" * MiB
    assert lab.read_range(bases["vdb"], 0, MiB) == b"\x6b" * MiB


def test_stale_recover_setting_recovers_the_group_then_freezes_anew(
        virt, env):
    dom, bases, server = freeze_and_kill(virt, env)
    env.configure(stale="recover")
    server.start()
    held = lab.HeldConnection(server.port, "vdb")
    # Both old overlays were committed first: the new freeze has the writes.
    assert held.read(0, 4096) == b"\x6b" * 4096
    assert {e["disk"]: e["verdict"] for e in status(env)} == \
        {"vda": "live", "vdb": "live"}
    assert len(env.overlays()) == 2
    assert lab.read_range(bases["vda"], 0, MiB) == b"\x5a" * MiB
    held.close()
    assert_clean(env, dom, bases)


def alone_and_grouped(virt, env):
    """vda in a group section, vdb in a section of its own."""
    dom, bases = group_domain(virt, env)
    exports = {"vdb-alone": (bases["vdb"], hooks(dom, "vdb", None)),
               "vda": (bases["vda"], hooks(dom, "vda"))}
    return dom, bases, virt.nbd_server(env.folder, exports, env.vars)


def test_a_disk_frozen_alone_keeps_the_group_from_freezing(virt, env):
    dom, bases, server = alone_and_grouped(virt, env)
    alone = lab.HeldConnection(server.port, "vdb-alone")
    assert sorted(sessions(env)) == ["vdb"]
    with pytest.raises(lab.RefusedError):
        lab.HeldConnection(server.port, "vda")
    proc = env.hook("nbd-prerun", "--domain", dom.name(), "--disk", "vda",
                    "--group", "vda,vdb", bases["vda"], check=1)
    assert "frozen by session" in proc.stderr and "without vda" in \
        proc.stderr
    assert sorted(sessions(env)) == ["vdb"] and len(env.overlays()) == 1
    assert lab.disk_source(dom, "vda") == bases["vda"]
    alone.close()
    assert_clean(env, dom, bases)


def test_a_connection_without_group_joins_a_group_freeze(virt, env):
    dom, bases, server = alone_and_grouped(virt, env)
    grouped = lab.HeldConnection(server.port, "vda")
    alone = lab.HeldConnection(server.port, "vdb-alone")
    assert len(env.overlays()) == 2
    assert len(sessions(env)["vdb"]["holders"]) == 1
    grouped.close()
    lab.wait_until(lambda: sessions(env)["vda"]["holders"] == [], 30,
                   what="vda's postrun")
    assert len(env.overlays()) == 2       # vdb's connection holds both
    alone.close()
    assert_clean(env, dom, bases)


def test_domain_shut_off_mid_freeze_commits_every_disk_offline(virt, env):
    dom, bases = group_domain(virt, env)
    server = serve(virt, env, dom, bases)
    held = lab.HeldConnection(server.port, "vdb")
    lab.guest_write(dom, "vda", 0x5b, 0, MiB)
    lab.guest_write(dom, "vdb", 0x5c, 0, MiB)
    dom.destroy()
    held.close()
    assert_clean(env, dom, bases)
    assert lab.read_range(bases["vda"], 0, MiB) == b"\x5b" * MiB
    assert lab.read_range(bases["vdb"], 0, MiB) == b"\x5c" * MiB
    dom.create()
    assert lab.disk_source(dom, "vdb") == bases["vdb"]


def test_a_shut_off_domain_is_held_whole(virt, env):
    dom, bases = group_domain(virt, env, start=False)
    server = serve(virt, env, dom, bases)
    with installed_hook(env):
        held = lab.HeldConnection(server.port, "vda")
        found = sessions(env)
        assert sorted(found) == ["vda", "vdb"]
        assert {s["mode"] for s in found.values()} == {"offline"}
        assert env.overlays() == []
        with pytest.raises(libvirt.libvirtError, match="being copied"):
            dom.create()
        held.close()
        env.wait_clean()
        dom.create()                     # the copy has ended: it starts
        assert dom.isActive()
    assert lab.disk_source(dom, "vda") == bases["vda"]


def test_a_failed_commit_of_one_disk_keeps_it_and_commits_the_other(
        virt, env):
    dom, bases = group_domain(virt, env)
    original = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    server = serve(virt, env, dom, bases)
    held = lab.HeldConnection(server.port, "vda")
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    lab.guest_write(dom, "vdb", 0x6b, 0, MiB)
    overlay = sessions(env)["vdb"]["overlay"]
    # An operator redefines vdb meanwhile: its commit fails after the pivot.
    other = lab.make_image(env.path("other.raw"), 1)
    virt.conn.defineXML(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                        .replace(overlay, other))
    held.close()
    lab.wait_until(lambda: list(sessions(env)) == ["vdb"]
                   and sessions(env)["vdb"]["phase"] == "failed", 60,
                   what="vda committed and vdb's commit failed")
    assert lab.disk_source(dom, "vda") == bases["vda"]
    assert lab.read_range(bases["vda"], 0, MiB) == b"\x5a" * MiB
    assert {e["disk"]: e["verdict"] for e in status(env)} == \
        {"vdb": "failed"}
    virt.conn.defineXML(original)
    env.hook("nbdsnap", "recover", "--all", check=0)
    assert_clean(env, dom, bases)
    assert lab.read_range(bases["vdb"], 0, MiB) == b"\x6b" * MiB
