"""Faults in a group's freeze (nbd-prerun --group), made to happen on purpose.

Each test stops a hook at a known point, seen from outside as in
test_faults: a lock the hook needs held by the test (a disk's, the
domain's, the history's), a full syslog socket, QEMU stopped while
libvirt snapshots, then a kill.  Each checks one outcome:
what status says, what the next prerun and recover do, that every guest
write made meanwhile reaches the bases, and that no overlay is left.
"""

import contextlib
import os
import signal
import socket
import threading
import time

import libvirt
import pytest

import lab
from test_faults import (HookByHand, _config, creation_watch, hook_path,
                         key_of, one_line, poll, qemu_pid, read_session,
                         session_file, started, stopped)
from test_freeze import has_open, held_lock
from test_group import (MiB, assert_clean, group_domain, serve, sessions,
                        status)
from test_libvirt_hook import installed_hook

from nbdsnap.hooks import sessions as store

# A guest agent channel with no agent behind it: libvirt says at once
# that the agent is not connected.
SILENT_AGENT = ("<channel type='unix'><target type='virtio' "
                "name='org.qemu.guest_agent.0'/></channel>")


def group_args(dom, target, bases):
    """nbd-prerun's arguments for disk target of the group vda,vdb."""
    return ["--domain", dom.name(), "--disk", target, "--group", "vda,vdb",
            bases[target]]


def phases(env):
    """{disk: (phase, verdict)} of the readable sessions."""
    return {e["disk"]: (e["phase"], e["verdict"]) for e in status(env)
            if "disk" in e}


def waiting_on(path):
    """The processes but this one that have lock file path open."""
    return [int(p) for p in os.listdir("/proc")
            if p.isdigit() and int(p) != os.getpid()
            and has_open(int(p), path)]


# -- a prerun killed with both intents saved --------------------------------

SO_SNDBUFFORCE = 32     # Linux's <asm-generic/socket.h>; not in Python's


@contextlib.contextmanager
def syslog_full(env):
    """The configuration's syslog socket, its queue full: a hook blocks at
    its first record, until it is killed or the socket goes.  A group's
    first freeze logs nothing before its intents are saved, and its first
    record says "snapshot into", before the snapshot call."""
    path = env.path("syslog")
    env.configure(syslog_socket=path)
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(socket.socket(socket.AF_UNIX,
                                                   socket.SOCK_DGRAM))
        server.bind(path)
        stack.callback(os.unlink, path)
        filler = stack.enter_context(socket.socket(socket.AF_UNIX,
                                                   socket.SOCK_DGRAM))
        # A send buffer larger than any queue (root may force it): the
        # filler stops when the receiving queue is full, whatever
        # net.unix.max_dgram_qlen is (10 by the kernel, 512 where systemd
        # is PID 1), and not before, when its own buffer would be.
        filler.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 64 << 20)
        filler.connect(path)
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                filler.send(b"<30>test: filler")
        yield


def test_prerun_killed_before_the_snapshot_of_both_disks(virt, env):
    """Killed with both intents saved and no snapshot asked for.  The next
    prerun refuses the stale group, then (stale = recover) ends both
    intents and freezes anew with the writes made meanwhile."""
    dom, bases = group_domain(virt, env)
    with syslog_full(env):
        hook = HookByHand(env, *group_args(dom, "vda", bases))
        try:
            poll(lambda: [s["phase"] for s in sessions(env).values()]
                 == ["intent", "intent"], 60, "both intents")
            time.sleep(0.5)
            assert hook.proc.poll() is None, hook.wait()
            hook.kill()
            assert hook.wait()[0] == 1
        finally:
            hook.close()
    time.sleep(0.5)
    assert [lab.disk_source(dom, t) for t in ("vda", "vdb")] == \
        [bases["vda"], bases["vdb"]]
    assert env.overlays() == []
    assert phases(env) == {"vda": ("intent", "stale"),
                           "vdb": ("intent", "stale")}
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    lab.guest_write(dom, "vdb", 0x6b, 0, MiB)
    proc = env.hook("nbd-prerun", *group_args(dom, "vdb", bases), check=1)
    one_line(proc.stderr, "nbd-prerun", "stale", "nbdsnap recover")
    assert len(sessions(env)) == 2 and env.overlays() == []
    env.configure(stale="recover")
    server = serve(virt, env, dom, bases)
    held = lab.HeldConnection(server.port, "vdb")
    found = sessions(env)
    assert {s["phase"] for s in found.values()} == {"frozen"}
    assert found["vda"]["group"] == found["vdb"]["group"]
    assert sorted(env.overlays()) == sorted(
        os.path.basename(s["overlay"]) for s in found.values())
    assert held.read(0, 4096) == b"\x6b" * 4096
    lab.guest_write(dom, "vda", 0x7c, MiB, MiB)
    held.close()
    assert_clean(env, dom, bases)
    assert lab.read_range(bases["vda"], 0, 2 * MiB) == \
        b"\x5a" * MiB + b"\x7c" * MiB
    assert lab.read_range(bases["vdb"], 0, MiB) == b"\x6b" * MiB


def test_prerun_killed_during_the_snapshot_of_both_disks(virt, env):
    """Killed once libvirt created an overlay, QEMU stopped there: libvirt
    finishes the snapshot after the kill, so the domain runs on both
    overlays and both sessions say intent.  recover of one disk commits
    both."""
    dom, bases = group_domain(virt, env)
    store.SessionStore(_config(env)).prepare()
    qemu = qemu_pid(dom)
    with creation_watch(env.snapshot_dir) as created:
        hook = HookByHand(env, *group_args(dom, "vda", bases))
        try:
            created(60)
            with stopped(qemu):
                found = sessions(env)
                assert lab.disk_source(dom, "vdb") == bases["vdb"]
                hook.kill()
                assert hook.wait()[0] == 1
        finally:
            hook.close()
    assert {t: s["phase"] for t, s in found.items()} == \
        {"vda": "intent", "vdb": "intent"}
    lab.wait_until(lambda: all(lab.disk_source(dom, t) == s["overlay"]
                               for t, s in found.items()), 60,
                   what="libvirt to finish the killed hook's snapshot")
    assert phases(env) == {"vda": ("intent", "stale"),
                           "vdb": ("intent", "stale")}
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)           # into the overlays
    lab.guest_write(dom, "vdb", 0x6b, 0, MiB)
    proc = env.hook("nbd-prerun", *group_args(dom, "vdb", bases), check=1)
    one_line(proc.stderr, "nbd-prerun", "stale", "nbdsnap recover")
    proc = env.hook("nbdsnap", "recover", bases["vdb"], check=0)
    assert "recovered with it" in proc.stdout
    assert proc.stdout.count("recovered (online commit done)") == 2, \
        proc.stdout
    assert_clean(env, dom, bases)
    assert lab.read_range(bases["vda"], 0, MiB) == b"\x5a" * MiB
    assert lab.read_range(bases["vdb"], 0, MiB) == b"\x6b" * MiB


# -- a postrun killed between the commits of the group's disks -------------

@pytest.mark.parametrize("left", ["frozen", "committing"])
def test_postrun_killed_between_the_commits_of_a_group(virt, env, left):
    """vda committed and its session ended; the postrun then waits for the
    history's lock (vdb still frozen), or, let on, for the domain's lock
    after vdb's pivot (vdb committing, merged): killed there.  The next
    prerun names vdb; recover of vda, the disk whose session is gone,
    recovers vdb with it, and keeps the guest's writes made since."""
    dom, bases = group_domain(virt, env)
    env.hook("nbd-prerun", *group_args(dom, "vda", bases), check=0)
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    lab.guest_write(dom, "vdb", 0x6b, 0, MiB)
    overlay = sessions(env)["vdb"]["overlay"]
    with contextlib.ExitStack() as domain_lock:
        with started([hook_path("nbd-postrun"), bases["vda"]],
                     env) as postrun:
            with held_lock(env, "history"):
                poll(lambda: read_session(env, bases["vda"]) is None, 60,
                     "vda's commit")
                if left == "committing":
                    domain_lock.enter_context(held_lock(
                        env, "domain-" + dom.UUIDString()))
                else:
                    postrun.kill()
                    postrun.wait(30)
            if left == "committing":
                poll(lambda: (read_session(env, bases["vdb"])
                              or {}).get("merged"), 60, "vdb's pivot")
                postrun.kill()
                postrun.wait(30)
    assert lab.disk_source(dom, "vda") == bases["vda"]
    assert lab.disk_source(dom, "vdb") == (
        overlay if left == "frozen" else bases["vdb"])
    assert os.path.exists(overlay)
    assert phases(env) == {"vdb": (left, "stale")}
    lab.guest_write(dom, "vdb", 0x7c, 2 * MiB, MiB)     # the guest goes on
    proc = env.hook("nbd-prerun", *group_args(dom, "vda", bases), check=1)
    one_line(proc.stderr, "nbd-prerun", "stale",
             "'nbdsnap recover %s'" % bases["vdb"])
    assert lab.disk_source(dom, "vda") == bases["vda"]
    proc = env.hook("nbdsnap", "recover", bases["vda"], check=0)
    assert "recovered with it" in proc.stdout
    assert ("online commit" if left == "frozen" else "discard overlay") \
        in proc.stdout
    assert_clean(env, dom, bases)
    assert lab.read_range(bases["vda"], 0, MiB) == b"\x5a" * MiB
    assert lab.read_range(bases["vdb"], 0, 3 * MiB) == \
        b"\x6b" * MiB + b"\x33" * MiB + b"\x7c" * MiB


# -- two connections to two disks of a group at once --------------------------

def test_two_disks_connected_at_once_share_one_snapshot(virt, env, syslog):
    """Both preruns have read the domain and wait on the group's first
    lock when it is let go: one snapshots both disks, the other joins."""
    dom, bases = group_domain(virt, env)
    server = serve(virt, env, dom, bases)
    conns, errors = {}, []

    def connect(target):
        try:
            conns[target] = lab.HeldConnection(server.port, target)
        except Exception as e:              # noqa: BLE001 (asserted below)
            errors.append(e)
    first = min(key_of(p) for p in bases.values())
    threads = [threading.Thread(target=connect, args=(t,)) for t in bases]
    with held_lock(env, first) as lock:
        for t in threads:
            t.start()
        lab.wait_until(lambda: len(waiting_on(lock)) == 2, 60,
                       what="both preruns to wait on the lock")
    for t in threads:
        t.join(120)
    assert errors == [] and sorted(conns) == ["vda", "vdb"]
    found = sessions(env)
    assert found["vda"]["group"] == found["vdb"]["group"]
    assert [len(s["holders"]) for _, s in sorted(found.items())] == [1, 1]
    assert found["vda"]["holders"] != found["vdb"]["holders"]
    assert sorted(env.overlays()) == sorted(
        os.path.basename(s["overlay"]) for s in found.values())
    for target, state in found.items():
        assert lab.disk_source(dom, target) == state["overlay"]
    frozen = lab.wait_until(
        lambda: [r for r in list(syslog) if "): frozen (" in r], 10,
        what="the freeze in syslog")
    joined = lab.wait_until(
        lambda: [r for r in list(syslog) if "joined by pid" in r], 10,
        what="the join in syslog")
    assert len(frozen) == 1 and len(joined) == 1, list(syslog)
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    lab.guest_write(dom, "vdb", 0x6b, 0, MiB)
    assert conns["vda"].read(0, 4096) == b"\x11" * 4096
    assert conns["vdb"].read(0, 4096) == b"\x33" * 4096
    conns["vda"].close()
    conns["vdb"].close()
    assert_clean(env, dom, bases)
    assert lab.read_range(bases["vda"], 0, MiB) == b"\x5a" * MiB
    assert lab.read_range(bases["vdb"], 0, MiB) == b"\x6b" * MiB


# -- a member's session corrupt ---------------------------------------------

@pytest.mark.parametrize("end", ["postrun", "killed"])
def test_a_member_whose_session_is_corrupt_is_named_and_recovered(
        virt, env, end):
    """vdb's state lost while vda's connection holds the group: vdb is
    refused.  Then vda's last postrun commits vda alone, or nbd-server is
    stopped (vda stale).  A new connection to the group is refused with
    the command that fixes it: recover of vdb, or of vda, which recovers
    vdb with it, the corrupt file set aside."""
    dom, bases = group_domain(virt, env)
    server = serve(virt, env, dom, bases)
    held = lab.HeldConnection(server.port, "vda")
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    lab.guest_write(dom, "vdb", 0x6b, 0, MiB)
    overlay = sessions(env)["vdb"]["overlay"]
    corrupt = session_file(env, bases["vdb"])
    os.truncate(corrupt, 0)
    found = {e["verdict"]: e for e in status(env)}
    assert sorted(found) == ["corrupt", "live", "orphan"]
    assert found["live"]["disk"] == "vda"
    assert found["orphan"]["overlay"] == overlay
    with pytest.raises(lab.RefusedError):
        lab.HeldConnection(server.port, "vdb").close()
    assert held.read(0, 4096) == b"\x11" * 4096         # the freeze holds
    if end == "postrun":
        held.close()
        lab.wait_until(lambda: read_session(env, bases["vda"]) is None, 60,
                       what="vda's postrun")
        assert lab.disk_source(dom, "vda") == bases["vda"]
    else:
        server.stop(signal.SIGTERM)
        held.drop()
        assert phases(env) == {"vda": ("frozen", "stale")}
    assert lab.disk_source(dom, "vdb") == overlay
    proc = env.hook("nbd-prerun", *group_args(dom, "vda", bases), check=1)
    one_line(proc.stderr, "nbd-prerun", corrupt,
             "'nbdsnap recover %s'" % bases["vdb"])
    asked = bases["vdb" if end == "postrun" else "vda"]
    proc = env.hook("nbdsnap", "recover", asked, check=0)
    assert "moved aside" in proc.stdout
    assert proc.stdout.count("recovered (online commit done)") == (
        1 if end == "postrun" else 2), proc.stdout
    assert_clean(env, dom, bases)
    assert lab.read_range(bases["vda"], 0, MiB) == b"\x5a" * MiB
    assert lab.read_range(bases["vdb"], 0, MiB) == b"\x6b" * MiB


# -- a shut-off group and the libvirt hook ----------------------------------

def test_a_shut_off_group_held_by_either_disk_does_not_start(virt, env):
    """A connection to vdb alone holds the group shut off; with the group's
    locks held by a hook the start is refused after one lock's bound, not
    one per disk (libvirtd waits for its hook that long)."""
    env.configure(lock_timeout=3)
    dom, bases = group_domain(virt, env, start=False)
    server = serve(virt, env, dom, bases)
    with installed_hook(env):
        first = lab.HeldConnection(server.port, "vda")
        second = lab.HeldConnection(server.port, "vdb")
        first.close()
        lab.wait_until(lambda: sessions(env)["vda"]["holders"] == [], 30,
                       what="vda's postrun")
        with pytest.raises(libvirt.libvirtError, match="being copied"):
            dom.create()
        with held_lock(env, key_of(bases["vda"])), \
                held_lock(env, key_of(bases["vdb"])):
            began = time.monotonic()
            with pytest.raises(libvirt.libvirtError, match="being copied"):
                dom.create()
            took = time.monotonic() - began
        assert 3 <= took < 5.5, took
        second.close()
        env.wait_clean()
        dom.create()
        assert dom.isActive()
    for target, base in bases.items():
        assert lab.disk_source(dom, target) == base


# -- quiesce with several disks -----------------------------------------------

@pytest.mark.parametrize("policy", ["try", "require"])
def test_quiesce_of_a_group_whose_agent_does_not_answer(virt, env, policy):
    """try: one crash-consistent snapshot of both disks, with the warning
    in both sessions; require: refused, no intent and no overlay left."""
    env.configure(quiesce=policy, quiesce_timeout=2)
    dom, bases = group_domain(virt, env, devices=[SILENT_AGENT])
    proc = env.hook("nbd-prerun", *group_args(dom, "vda", bases))
    if policy == "require":
        assert proc.returncode == 1, proc.stderr
        one_line(proc.stderr, "nbd-prerun", "did not answer",
                 "not connected", "quiesce = require")
        assert env.sessions() == [] and env.overlays() == []
        for target, base in bases.items():
            assert lab.disk_source(dom, target) == base
        return
    assert proc.returncode == 0, proc.stderr
    found = sessions(env)
    assert found["vda"]["group"] == found["vdb"]["group"]
    for target, state in found.items():
        assert state["consistency"] == "crash-consistent"
        assert "did not answer" in state["warning"]
        assert "not connected" in state["warning"]      # libvirt's words
        assert lab.disk_source(dom, target) == state["overlay"]
    assert len(env.overlays()) == 2
    lab.guest_write(dom, "vdb", 0x6b, 0, MiB)
    env.hook("nbd-postrun", bases["vda"], check=0)
    assert_clean(env, dom, bases)
    assert lab.read_range(bases["vdb"], 0, MiB) == b"\x6b" * MiB
