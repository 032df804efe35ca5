"""Faults on real parts: hooks killed at their crash windows, libvirtd
restarted, a full snapshot_dir, broken state and locks, and many cycles.

Each fault is found from outside, as an operator's machine would meet it:
no test-only code in the hooks.  Every test asserts that no guest write is
lost (a pattern check on the base), that the domain ends on its base with
no overlay left, or else that what is left is reported by ``nbdsnap status``
and fixed by ``nbdsnap recover``, and that a command that fails says why in
one line.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import libvirt
import pytest

import lab
from test_freeze import MiB, assert_clean, export_domain, serve
from test_recover import freeze_and_kill, status

from nbdsnap.hooks import sessions


# -- helpers --------------------------------------------------------------------

def hook_path(name):
    return os.path.join(lab.VENV_BIN, name)


def key_of(path):
    return sessions.disk_key(os.stat(path))


def session_file(env, base):
    return os.path.join(env.state_dir, "sessions", key_of(base) + ".json")


def read_session(env, base):
    """The session of base as a hook last wrote it, or None."""
    try:
        with open(session_file(env, base)) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def poll(pred, timeout, what):
    """wait_until, polling fast: the windows caught here last milliseconds."""
    return lab.wait_until(pred, timeout, 0.0005, what)


def one_line(stderr, prog, *words):
    """A failed command's reason: its last stderr line, no traceback, every
    line its own, holding every word."""
    lines = stderr.splitlines()
    assert lines and "Traceback" not in stderr, stderr
    assert all(l.startswith(prog + ": ") for l in lines), stderr
    for word in words:
        assert word in lines[-1], stderr
    return lines[-1]


# nbd-server runs a hook in a child per connection, which refuses the client
# and exits when prerun fails.  This stands for that child: it holds the
# freeze (procs.connection_holder) and dies with its hook.
CONNECTION = textwrap.dedent("""\
    import subprocess, sys
    hook = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
    print(hook.pid, flush=True)
    sys.exit(1 if hook.wait() else 0)
    """)


class HookByHand:
    """nbd-prerun run as one connection's child would run it; its pid is
    known at once, so that it can be killed at a chosen moment."""

    def __init__(self, env, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CONNECTION, hook_path("nbd-prerun")]
            + list(args), env=dict(os.environ, **env.vars),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.pid = int(self.proc.stdout.readline())

    def kill(self):
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout=60):
        """(exit status of the connection's child, the hook's stderr)"""
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    def close(self):
        if self.proc.returncode is None:
            self.kill()
            self.proc.kill()
            self.proc.communicate(timeout=30)


@contextlib.contextmanager
def started(cmd, env):
    """A command of ours in the background, killed if the test fails."""
    proc = subprocess.Popen(cmd, env=dict(os.environ, **env.vars),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(ValueError):     # the test read it all
            proc.communicate(timeout=30)


def big_domain(virt, env, size=128):
    """A domain on a sparse raw disk, for overlays big enough to make a
    commit last long enough (about half a second here) to be caught."""
    base = lab.make_image(env.path("big.raw"), size)
    dom = virt.define(env.name("big"),
                      [lab.disk_xml(base, "vda")])
    return dom, base


PIECE = 4 * MiB


def fill(dom, pieces, first=0x20):
    """Guest writes over the first pieces * 4 MiB, one pattern each."""
    for i in range(pieces):
        lab.guest_write(dom, "vda", first + i, i * PIECE, PIECE)


def assert_filled(base, pieces, first=0x20):
    for i in range(pieces):
        got = lab.read_range(base, i * PIECE, PIECE)
        assert got == bytes([first + i]) * PIECE, "piece %d lost" % i


def job_running(dom):
    try:
        return bool(dom.blockJobInfo("vda", 0))
    except libvirt.libvirtError:
        return False


def catch_commit(env, dom, base, timeout=60):
    """Wait until the session says committing and the block job runs."""
    poll(lambda: (read_session(env, base) or {}).get("phase")
         == "committing", timeout, "phase committing")
    return poll(lambda: job_running(dom), 10, "the block commit to start")


# -- 1. hooks killed at their crash windows --------------------------------------

@pytest.mark.parametrize("moment", ["intent", "overlay created"])
def test_prerun_killed_during_the_snapshot(virt, env, moment):
    """Killed as soon as the intent is written (before or as it calls
    libvirt), or once libvirt has created the overlay file (QEMU switches to
    it some 70 ms later)."""
    dom, base = export_domain(virt, env)
    hook = HookByHand(env, base)
    try:
        state = poll(lambda: read_session(env, base), 60, "the intent")
        if moment == "overlay created":
            poll(lambda: os.path.exists(state["overlay"]), 10,
                 "libvirt to create the overlay")
        hook.kill()
        assert state["phase"] == "intent"
        assert hook.wait()[0] == 1                # the client is refused
    finally:
        hook.close()
    (entry,) = status(env)
    assert entry["verdict"] == "stale"
    # libvirtd finishes the snapshot call of a killed client: the write goes
    # into the overlay if the snapshot happened, into the base if not.
    lab.guest_write(dom, "vda", 0x5a, 2 * MiB, MiB)
    proc = env.hook("nbdsnap", "recover", "--all", check=0)
    assert "recovered" in proc.stdout
    assert_clean(env, dom, base)
    assert status(env) == []
    assert lab.read_range(base, 2 * MiB, MiB) == b"\x5a" * MiB
    server = serve(virt, env, {"vm": base})
    copy = env.path("copy.raw")
    lab.nbdcopy(server.uri("vm"), copy)
    assert lab.sha256(copy) == lab.sha256(base)
    assert_clean(env, dom, base)


def test_prerun_killed_during_the_snapshot_while_another_waits(virt, env):
    """stale = recover: the next connection's prerun, waiting on the lock,
    recovers the intent at once, while libvirtd is still carrying out the
    killed hook's snapshot call (about 70 ms here after the overlay file
    appears)."""
    env.configure(stale="recover")
    dom, base = export_domain(virt, env)
    first = HookByHand(env, base)
    second = None
    try:
        state = poll(lambda: read_session(env, base), 60, "the intent")
        second = HookByHand(env, base)          # waits on the disk's lock
        poll(lambda: os.path.exists(state["overlay"]), 10,
             "libvirt to create the overlay")
        first.kill()
        rc, err = second.wait()
    finally:
        first.close()
        if second:
            second.close()
    if rc:      # refused, or it recovered the intent and froze anew
        one_line(err, "nbd-prerun")
    top = lab.disk_source(dom, "vda")
    # Whatever the domain runs on must exist: the guest's writes go there.
    assert top == base or os.path.exists(top), "domain runs on deleted " + top
    lab.guest_write(dom, "vda", 0x5a, 2 * MiB, MiB)
    env.hook("nbdsnap", "recover", "--all", check=0)
    assert_clean(env, dom, base)
    assert lab.read_range(base, 2 * MiB, MiB) == b"\x5a" * MiB


def test_prerun_killed_right_after_the_snapshot(virt, env):
    dom, base = export_domain(virt, env)
    hook = HookByHand(env, base)
    try:
        poll(lambda: lab.disk_source(dom, "vda") != base, 60,
             "the domain to run on the overlay")
        hook.kill()
        assert hook.wait()[0] == 1
    finally:
        hook.close()
    (entry,) = status(env)
    assert entry["phase"] in ("intent", "frozen")
    assert entry["verdict"] == "stale"
    assert lab.disk_source(dom, "vda") == entry["overlay"]
    lab.guest_write(dom, "vda", 0x5b, 3 * MiB, MiB)      # into the overlay
    proc = env.hook("nbdsnap", "recover", "--all", check=0)
    assert "online commit" in proc.stdout
    assert_clean(env, dom, base)
    assert lab.read_range(base, 3 * MiB, MiB) == b"\x5b" * MiB
    server = serve(virt, env, {"vm": base})
    copy = env.path("copy.raw")
    lab.nbdcopy(server.uri("vm"), copy)
    assert lab.sha256(copy) == lab.sha256(base)
    assert_clean(env, dom, base)


def test_postrun_killed_during_the_commit(virt, env):
    dom, base = big_domain(virt, env)
    env.hook("nbd-prerun", base, check=0)         # held by this test's pid
    fill(dom, 32)                                 # 128 MiB in the overlay
    overlay = read_session(env, base)["overlay"]
    assert lab.disk_source(dom, "vda") == overlay
    with started([hook_path("nbd-postrun"), base], env) as postrun:
        catch_commit(env, dom, base)
        os.kill(postrun.pid, signal.SIGKILL)
        postrun.wait(30)
    (entry,) = status(env)
    assert entry["phase"] == "committing" and entry["verdict"] == "stale"
    # The commit job may be left running, or ready: recover cancels it and
    # commits afresh.
    proc = env.hook("nbdsnap", "recover", "--all", check=0)
    assert "online commit" in proc.stdout
    assert_clean(env, dom, base)
    assert not job_running(dom)
    assert_filled(base, 32)


def test_killed_between_the_pivot_and_the_overlay_deletion(virt, env):
    """What a postrun killed after the pivot leaves: the domain on its base,
    the overlay still there, the session committing and marked merged."""
    dom, base, _ = freeze_and_kill(virt, env, signal.SIGTERM)
    (entry,) = status(env)
    overlay = entry["overlay"]
    subprocess.run(["virsh", "-c", lab.URI, "blockcommit", dom.name(), "vda",
                    "--active", "--shallow", "--pivot"], check=True,
                   capture_output=True, timeout=120)
    assert lab.disk_source(dom, "vda") == base
    path = session_file(env, base)
    with open(path) as f:
        state = json.load(f)
    state["phase"] = "committing"
    state["merged"] = True
    with open(path, "w") as f:
        json.dump(state, f)
    # The guest writes on after the pivot: the base now differs from the
    # overlay, which a comparison would take for writes the base lacks.
    lab.guest_write(dom, "vda", 0x6c, 2 * MiB, 4096)
    proc = env.hook("nbdsnap", "recover", "--all", check=0)
    assert "discard overlay" in proc.stdout
    assert not os.path.exists(overlay)
    assert_clean(env, dom, base)
    assert lab.read_range(base, 2 * MiB, 4096) == b"\x6c" * 4096
    assert lab.read_range(base, 2 * MiB + 4096, MiB - 4096) == \
        b"\x5a" * (MiB - 4096)


# -- 2. libvirtd restarted ---------------------------------------------------

def test_libvirtd_restarted_during_the_freeze(virt, env):
    dom, base = export_domain(virt, env)
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    (dom,) = lab.restart_libvirtd(virt)
    lab.guest_write(dom, "vda", 0x6b, MiB, MiB)
    assert held.read(0, 4096) == b"\x11" * 4096      # still the frozen base
    held.close()
    assert_clean(env, dom, base)
    assert lab.read_range(base, 0, MiB) == b"\x5a" * MiB
    assert lab.read_range(base, MiB, MiB) == b"\x6b" * MiB


def test_libvirtd_restarted_during_the_commit(virt, env):
    dom, base = big_domain(virt, env)
    env.hook("nbd-prerun", base, check=0)
    fill(dom, 32)
    with started([hook_path("nbd-postrun"), base], env) as postrun:
        catch_commit(env, dom, base)
        (dom,) = lab.restart_libvirtd(virt)
        _, err = postrun.communicate(timeout=120)
    if postrun.returncode:
        assert postrun.returncode == 1
        one_line(err, "nbd-postrun", "nbdsnap recover %s" % base)
        (entry,) = status(env)
        assert entry["phase"] == "failed" and entry["verdict"] == "failed"
    proc = env.hook("nbdsnap", "recover", "--all", check=0)
    assert "STUCK" not in proc.stdout
    assert_clean(env, dom, base)
    assert not job_running(dom)
    assert_filled(base, 32)


# -- 4. snapshot_dir on a small filesystem ----------------------------------

@pytest.fixture
def small_overlays(env):
    """snapshot_dir on a 4 MiB tmpfs.  Mounts here do not reach a running
    QEMU's mount namespace: define the domains after this fixture, and name
    it before virt, so that their QEMUs are gone when it unmounts."""
    os.mkdir(env.snapshot_dir, 0o711)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0711",
                    "tmpfs", env.snapshot_dir], check=True)
    try:
        yield env.snapshot_dir
    finally:
        if subprocess.run(["umount", env.snapshot_dir]).returncode:
            subprocess.run(["umount", "-l", env.snapshot_dir], check=True)


def overlays(env):
    return [n for n in env.overlays() if n.startswith("nbdsnap-")]


def test_snapshot_dir_full_before_the_snapshot(small_overlays, virt, env):
    filler = os.path.join(small_overlays, "filler")
    with open(filler, "wb") as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * MiB)
            f.flush()
    dom, base = export_domain(virt, env)
    server = serve(virt, env, {"vm": base})
    with pytest.raises(lab.RefusedError):
        lab.HeldConnection(server.port, "vm").close()
    proc = env.hook("nbd-prerun", base, check=1)
    line = one_line(proc.stderr, "nbd-prerun", "snapshot of domain",
                    "refused")
    assert "space" in line.lower(), line
    assert env.sessions() == [] and overlays(env) == []
    assert lab.disk_source(dom, "vda") == base
    assert lab.disk_source(dom, "vda", inactive=True) == base
    os.unlink(filler)                          # room again: served
    copy = env.path("copy.raw")
    lab.nbdcopy(server.uri("vm"), copy)
    assert lab.sha256(copy) == lab.sha256(base)
    assert_clean(env, dom, base)


# A guest that writes through its virtio disk as a real one does, with BIOS
# calls, so that QEMU's error policy applies (qemu-io's writes bypass it):
# at boot it writes sector 1 (ready), then for each key pressed 1 MiB of the
# key's ASCII code, at 1 MiB, then 2 MiB, and so on.  GNU as, .code16, linked
# at 0x7c00:
#
#   cli; xor %ax,%ax; mov %ax,%ds; mov %ax,%es; mov %ax,%ss
#   mov $0x7c00,%sp; sti; mov %dl,drive
#   movw $1,count; movw $0x7c00,off; movl $1,lba; call write
#   movl $2048,lba
# next: xor %ah,%ah; int $0x16               # wait for a key: %al
#   mov $0x1000,%bx; mov %bx,%es; xor %di,%di; mov $0x8000,%cx; cld
#   rep stosb                                # 32 KiB of %al at 0x10000
#   movw $64,count; movw $0,off; movw $0x1000,seg; mov $32,%bp
# 1: call write; addl $64,lba; dec %bp; jnz 1b; jmp next
# write: mov $dap,%si; mov $0x4300,%ax; mov drive,%dl; int $0x13; ret
# drive: .byte 0; .balign 4
# dap: .byte 0x10,0; count: .word 0; off: .word 0; seg: .word 0; lba: .quad 0
#   .org 510; .word 0xaa55
WRITER_BOOT_SECTOR = bytes.fromhex(
    "fa31c08ed88ec08ed0bc007cfb8816737cc706767c0100c706787c007c66c706"
    "7c7c01000000e83d0066c7067c7c0008000030e4cd16bb00108ec331ffb90080"
    "fcf3aac706767c4000c706787c0000c7067a7c0010bd2000e80b006683067c7c"
    "404d75f4ebccbe747cb800438a16737ccd13c300100000000000000000000000"
    "00000000").ljust(510, b"\0") + b"\x55\xaa"
KEYS = [(30, ord("a")), (31, ord("s")), (32, ord("d")), (33, ord("f")),
        (34, ord("g")), (35, ord("h")), (36, ord("j")), (37, ord("k"))]


def written(dom):
    return dom.blockStats("vda")[3]       # bytes the guest wrote


def io_paused(dom):
    return list(dom.state()) == [libvirt.VIR_DOMAIN_PAUSED,
                                 libvirt.VIR_DOMAIN_PAUSED_IOERROR]


def test_snapshot_dir_fills_up_during_the_freeze(small_overlays, virt, env):
    base = lab.make_image(env.path("base.raw"), 32, fill=0x11)
    with open(base, "r+b") as f:
        f.write(WRITER_BOOT_SECTOR)
    dom = virt.define(env.name("full"),
                      [lab.disk_xml(base, "vda")])
    lab.wait_until(lambda: written(dom) >= 512, 60, what="the guest to boot")
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    assert os.path.dirname(lab.disk_source(dom, "vda")) == small_overlays
    pressed = 0
    for code, _ in KEYS:        # 1 MiB a key, more than the tmpfs holds
        dom.sendKey(libvirt.VIR_KEYCODE_SET_LINUX, 50, [code], 1, 0)
        pressed += 1
        lab.wait_until(lambda: io_paused(dom)
                       or written(dom) >= 512 + pressed * MiB, 60,
                       what="the guest's megabyte or its pause")
        if io_paused(dom):
            break
    assert io_paused(dom), "the guest never hit ENOSPC"
    assert written(dom) < 512 + pressed * MiB
    held.close()
    # postrun commits the paused domain, resumes it, and QEMU retries the
    # write that failed: this time into the base.
    assert_clean(env, dom, base)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    lab.wait_until(lambda: written(dom) >= 512 + pressed * MiB, 60,
                   what="the guest's writes after its resume")
    for i, (_, char) in enumerate(KEYS[:pressed]):
        assert lab.read_range(base, (i + 1) * MiB, MiB) == \
            bytes([char]) * MiB, "MiB %d lost" % (i + 1)
    assert lab.read_range(base, (pressed + 1) * MiB, MiB) == b"\x11" * MiB


# -- 5. broken state and locks ------------------------------------------------

def test_state_file_truncated_while_the_session_is_live(virt, env):
    """The state of a live session lost (truncated to nothing): status says
    corrupt, new clients are refused, the last postrun cannot commit, and
    recover sets the file aside and commits the orphaned overlay."""
    dom, base = export_domain(virt, env)
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    overlay = read_session(env, base)["overlay"]
    os.truncate(session_file(env, base), 0)
    entry, orphan = status(env)        # the overlay it no longer names too
    assert entry["phase"] == "corrupt" and entry["verdict"] == "corrupt"
    assert orphan["verdict"] == "orphan" and orphan["overlay"] == overlay
    with pytest.raises(lab.RefusedError):
        lab.HeldConnection(server.port, "vm").close()
    proc = env.hook("nbd-prerun", base, check=1)
    one_line(proc.stderr, "nbd-prerun", "corrupt", session_file(env, base))
    assert held.read(0, 4096) == b"\x11" * 4096     # the freeze holds
    held.close()
    lab.wait_until(lambda: not server.children(), 30,
                   what="the connection's postrun to end")
    assert lab.disk_source(dom, "vda") == overlay    # it could not commit
    assert status(env)[0]["phase"] == "corrupt"
    proc = env.hook("nbdsnap", "recover", "--all", check=0)
    assert "moved aside" in proc.stdout and "online commit" in proc.stdout
    assert_clean(env, dom, base)
    assert lab.read_range(base, 0, MiB) == b"\x5a" * MiB


def test_recover_leaves_a_truncated_live_session_alone(virt, env):
    dom, base = export_domain(virt, env)
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    overlay = read_session(env, base)["overlay"]
    os.truncate(session_file(env, base), 0)
    env.hook("nbdsnap", "recover", "--all")
    try:
        assert held.read(0, 4096) == b"\x11" * 4096, \
            "the connected client now reads writes made after the freeze"
        assert lab.disk_source(dom, "vda") == overlay
    finally:
        held.close()
    lab.wait_until(lambda: not server.children(), 30,
                   what="the connection's postrun to end")
    env.hook("nbdsnap", "recover", "--all", check=0)
    assert_clean(env, dom, base)
    assert lab.read_range(base, 0, MiB) == b"\x5a" * MiB


# A process that takes a disk's lock as DiskLock does, then hangs.
LOCKER = ("import fcntl, os, sys, time; "
          "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600); "
          "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); "
          "os.pwrite(fd, b'%d\\n' % os.getpid(), 0); "
          "print('locked', flush=True); time.sleep(3600)")


@contextlib.contextmanager
def lock_held(env, base, code=LOCKER):
    """The disk's lock, held by a process that hangs: (its pid, the path)."""
    sessions.SessionStore(_config(env)).prepare()
    lock = os.path.join(env.state_dir, "locks", key_of(base) + ".lock")
    locker = subprocess.Popen([sys.executable, "-c", code, lock],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline() == "locked\n"
        yield locker.pid, lock
    finally:
        locker.kill()
        locker.communicate(timeout=30)


def test_lock_held_by_a_hung_process(virt, env):
    env.configure(lock_timeout=2)
    dom, base = export_domain(virt, env)
    with lock_held(env, base) as (pid, lock):
        started_at = time.monotonic()
        proc = env.hook("nbd-prerun", base, check=1)
        took = time.monotonic() - started_at
        assert took >= 2, took      # it waited lock_timeout, then gave up
        one_line(proc.stderr, "nbd-prerun", lock, "pid %d" % pid,
                 "lock_timeout")
        assert env.sessions() == [] and env.overlays() == []
        assert lab.disk_source(dom, "vda") == base
    server = serve(virt, env, {"vm": base})      # the lock is free again
    held = lab.HeldConnection(server.port, "vm")
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    held.close()
    assert_clean(env, dom, base)
    assert lab.read_range(base, 0, MiB) == b"\x5a" * MiB


def test_lock_holder_with_newlines_in_its_command_line(env):
    env.configure(lock_timeout=1)
    base = lab.make_image(env.path("base.raw"), 1)
    with lock_held(env, base, LOCKER.replace("; ", "\n")) as (pid, lock):
        proc = env.hook("nbd-prerun", base, check=1)
    one_line(proc.stderr, "nbd-prerun", lock, "pid %d" % pid)


def _config(env):
    from nbdsnap.hooks import config
    return config.load(env.config)


def test_two_recovers_at_once(virt, env):
    dom, base, _ = freeze_and_kill(virt, env, signal.SIGKILL)
    cmd = [hook_path("nbdsnap"), "recover", "--all"]
    with started(cmd, env) as one, started(cmd, env) as two:
        outs = [p.communicate(timeout=120) for p in (one, two)]
    assert [one.returncode, two.returncode] == [0, 0], outs
    assert sum("online commit" in out for out, _ in outs) == 1, outs
    assert all(err == "" for _, err in outs), outs
    assert_clean(env, dom, base)
    assert lab.read_range(base, 2 * MiB, MiB) == b"\x5a" * MiB


# -- 6. many cycles under a busy guest ---------------------------------------

RECORD = 64 * 1024


def records_of(path, size):
    """Each 64 KiB record of a file: its byte if uniform, else None."""
    out = []
    with open(path, "rb") as f:
        for _ in range(size // RECORD):
            data = f.read(RECORD)
            out.append(data[0] if data == bytes([data[0]]) * RECORD
                       else None)
    return out


class Writer(threading.Thread):
    """Guest writes without pause: 64 KiB records at moving offsets, each
    with a pattern other than the one it overwrites, all recorded."""

    def __init__(self, dom, size):
        super().__init__(daemon=True)
        self.dom = dom
        self.records = size // RECORD
        self.done = []            # (record index, pattern), in order
        self.stop = threading.Event()
        self.error = None

    def run(self):
        i = 0
        try:
            while not self.stop.is_set():
                index = (i * 37) % self.records          # moving offsets
                pattern = 0x20 + i % 200                 # never 0x11's
                lab.guest_write(self.dom, "vda", pattern, index * RECORD,
                                RECORD)
                self.done.append((index, pattern))
                i += 1
        except Exception as e:       # noqa: BLE001 - reported by the test
            self.error = e


def image_after(start, writes):
    image = list(start)
    for index, pattern in writes:
        image[index] = pattern
    return image


def frozen_at(start, writes, lo, hi, copy):
    """The k in [lo, hi] for which the copy is start plus writes[:k]."""
    image = image_after(start, writes[:lo])
    for k in range(lo, hi + 1):
        if image == copy:
            return k
        if k < len(writes):
            image[writes[k][0]] = writes[k][1]
    return None


def test_twenty_multiconnection_cycles_under_guest_writes(virt, env):
    size = 32 * MiB
    dom, base = export_domain(virt, env)
    start = records_of(base, size)
    server = serve(virt, env, {"vm": base})
    writer = Writer(dom, size)
    writer.start()
    try:
        lab.wait_until(lambda: len(writer.done) >= 10, 30,
                       what="the guest to write")
        for cycle in range(20):
            copy = env.path("copy.raw")
            lo = len(writer.done)
            lab.nbdcopy(server.uri("vm"), copy, connections=4)
            hi = len(writer.done) + 1          # one may be in flight
            got = records_of(copy, size)
            assert None not in got, "cycle %d: a torn record" % cycle
            assert frozen_at(start, writer.done, lo, hi, got) is not None, \
                "cycle %d: the copy is no state the base had" % cycle
            env.wait_clean()
            assert writer.error is None, writer.error
            os.unlink(copy)
    finally:
        writer.stop.set()
        writer.join(60)
    assert writer.error is None, writer.error
    assert_clean(env, dom, base)
    assert status(env) == []
    assert records_of(base, size) == image_after(start, writer.done)


def test_committing_without_merged_is_compared_not_assumed(virt, env):
    """A session left 'committing' before its commit pivoted (a recover
    interrupted during its comparison, say): the overlay holds writes the
    base lacks, so it is kept and reported, never deleted unread."""
    dom, base, _ = freeze_and_kill(virt, env, signal.SIGTERM)
    (entry,) = status(env)
    overlay = entry["overlay"]
    dom.destroy()
    # By hand, as an operator might: back on the base, the overlay unmerged.
    subprocess.run(["virsh", "-c", lab.URI, "detach-disk", dom.name(), "vda",
                    "--config"], check=True, capture_output=True)
    subprocess.run(["virsh", "-c", lab.URI, "attach-disk", dom.name(), base,
                    "vda", "--config", "--subdriver", "raw"], check=True,
                   capture_output=True)
    path = session_file(env, base)
    with open(path) as f:
        state = json.load(f)
    state["phase"] = "committing"
    with open(path, "w") as f:
        json.dump(state, f)
    proc = env.hook("nbdsnap", "recover", "--all", check=1)
    assert "without the writes in overlay" in proc.stdout
    assert os.path.exists(overlay)
    assert lab.image_reads(overlay, 0x5a, 2 * MiB, MiB)


def test_recover_goes_on_past_a_disk_it_cannot_lock(virt, env):
    """One disk's lock held by a hung process: recover --all reports it
    stuck and still brings back the other disk."""
    env.configure(lock_timeout=2)
    other = lab.make_image(env.path("other.raw"), 16, fill=0x22)
    dom, base = export_domain(virt, env, disks=[lab.disk_xml(other, "vdb")])
    server = serve(virt, env, {"vm": base, "vm2": other})
    held = [lab.HeldConnection(server.port, "vm"),
            lab.HeldConnection(server.port, "vm2")]
    lab.guest_write(dom, "vdb", 0x6b, 0, MiB)
    server.stop(signal.SIGTERM)
    for h in held:
        h.drop()
    with lock_held(env, base):
        proc = env.hook("nbdsnap", "recover", "--all", check=1)
        assert "STUCK" in proc.stdout and "lock_timeout" in proc.stdout
        assert lab.disk_source(dom, "vdb") == other       # the other one
        assert lab.read_range(other, 0, MiB) == b"\x6b" * MiB
    env.hook("nbdsnap", "recover", "--all", check=0)
    assert_clean(env, dom, base)


def test_managed_save_image_on_the_overlay_is_kept_until_started(virt, env):
    """A domain saved (virsh managedsave) while frozen: its saved state runs
    on the overlay, so no offline commit; once started, recover commits."""
    dom, base, _ = freeze_and_kill(virt, env, signal.SIGTERM)
    overlay = status(env)[0]["overlay"]
    dom.managedSave(0)
    proc = env.hook("nbdsnap", "recover", "--all", check=1)
    assert "managed save image" in proc.stdout
    assert os.path.exists(overlay)
    dom.create()                        # resumes from the save, on overlay
    assert lab.disk_source(dom, "vda") == overlay
    env.hook("nbdsnap", "recover", "--all", check=0)
    assert_clean(env, dom, base)
    assert lab.read_range(base, 2 * MiB, MiB) == b"\x5a" * MiB


# -- 7. a snapshot still under way, a merged commit that fails, a symlink ----

def qemu_pid(dom):
    with open("/run/libvirt/qemu/%s.pid" % dom.name()) as f:
        return int(f.read())


@contextlib.contextmanager
def creation_watch(folder):
    """wait(timeout): block until a file is created in folder (inotify: a
    reaction within a millisecond, inside libvirt's 70 ms window)."""
    import ctypes
    import select
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    assert fd >= 0 and libc.inotify_add_watch(
        fd, os.fsencode(folder), 0x100) >= 0        # IN_CREATE

    def wait(timeout):
        assert select.select([fd], [], [], timeout)[0], "nothing created"
        os.read(fd, 4096)
    try:
        yield wait
    finally:
        os.close(fd)


@contextlib.contextmanager
def stopped(pid):
    """A process held with SIGSTOP, continued whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_recover_waits_for_the_snapshot_of_a_killed_prerun(virt, env):
    """The prerun is killed once libvirt has created the overlay, and QEMU
    is stopped there, so that libvirtd's snapshot job waits on its monitor:
    the domain is still on its base, the overlay is there.  recover must
    wait for the job, then see the domain on the overlay and commit it, not
    take the overlay for a leftover."""
    dom, base = export_domain(virt, env)
    sessions.SessionStore(_config(env)).prepare()
    qemu = qemu_pid(dom)
    with creation_watch(env.snapshot_dir) as created:
        hook = HookByHand(env, base)
        try:
            created(60)
            with stopped(qemu):
                overlay = read_session(env, base)["overlay"]
                assert lab.disk_source(dom, "vda") == base
                assert os.path.exists(overlay)
                hook.kill()
                assert hook.wait()[0] == 1
                cmd = [hook_path("nbdsnap"), "recover", "--all"]
                with started(cmd, env) as recover:
                    time.sleep(3)
                    assert recover.poll() is None, recover.communicate()
                    os.kill(qemu, signal.SIGCONT)
                    lab.guest_write(dom, "vda", 0x5a, 2 * MiB, MiB)
                    out, err = recover.communicate(timeout=120)
        finally:
            hook.close()
    assert recover.returncode == 0, out + err
    assert "online commit" in out, out
    assert_clean(env, dom, base)
    assert lab.read_range(base, 2 * MiB, MiB) == b"\x5a" * MiB


def test_a_failure_after_the_pivot_keeps_merged(virt, env):
    """The definition check after the pivot fails (an operator redefined the
    disk meanwhile): the failed session still says merged, so that once the
    definition is right again recover deletes the overlay without comparing
    it with a base the guest has written on since."""
    dom, base = export_domain(virt, env)
    original = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    lab.guest_write(dom, "vda", 0x5a, 2 * MiB, MiB)
    overlay = read_session(env, base)["overlay"]
    other = lab.make_image(env.path("other.raw"), 1)
    virt.conn.defineXML(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                        .replace(overlay, other))
    held.close()
    lab.wait_until(lambda: (read_session(env, base) or {}).get("phase")
                   == "failed", 60, what="the commit to fail")
    state = read_session(env, base)
    assert "is not on its base" in state["error"]
    assert state["merged"] is True
    assert lab.disk_source(dom, "vda") == base            # it had pivoted
    assert os.path.exists(overlay)
    lab.guest_write(dom, "vda", 0x6c, 2 * MiB, 4096)       # the guest goes on
    virt.conn.defineXML(original)
    proc = env.hook("nbdsnap", "recover", "--all", check=0)
    assert "discard overlay" in proc.stdout and "pivoted" in proc.stdout
    assert_clean(env, dom, base)
    assert lab.read_range(base, 2 * MiB, 4096) == b"\x6c" * 4096
    assert lab.read_range(base, 2 * MiB + 4096, MiB - 4096) == \
        b"\x5a" * (MiB - 4096)


def test_an_overlay_replaced_by_a_symlink_is_refused(virt, env):
    """The live overlay's path made a symlink to another file: nothing is
    handed to libvirt (it would chown the target), everything is kept and
    reported, and once the file is back recover commits it."""
    dom, base = export_domain(virt, env)
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    overlay = read_session(env, base)["overlay"]
    victim = lab.make_image(env.path("victim"), 1)
    os.chown(victim, 12345, 12345)
    os.rename(overlay, overlay + ".moved")      # QEMU keeps its open file
    os.symlink(victim, overlay)
    held.close()
    lab.wait_until(lambda: (read_session(env, base) or {}).get("phase")
                   == "failed", 60, what="the commit to be refused")
    assert "symlink to %s" % victim in read_session(env, base)["error"]
    proc = env.hook("nbdsnap", "recover", "--all", check=1)
    assert "symlink to %s" % victim in proc.stdout
    st = os.stat(victim)
    assert (st.st_uid, st.st_gid) == (12345, 12345)
    assert lab.disk_source(dom, "vda") == overlay
    assert os.path.islink(overlay)
    os.unlink(overlay)
    os.rename(overlay + ".moved", overlay)
    env.hook("nbdsnap", "recover", "--all", check=0)
    assert_clean(env, dom, base)
    assert lab.read_range(base, 0, MiB) == b"\x5a" * MiB
