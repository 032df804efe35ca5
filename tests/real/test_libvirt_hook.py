"""The libvirt hook, installed as `make install` does, against libvirtd."""

import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import libvirt
import pytest

import lab
from test_freeze import (export_domain, has_open, held_lock,
                         hook_in_background, serve)

from nbdsnap.hooks import procs, sessions


@contextlib.contextmanager
def installed_hook(env):
    """The hook script as `make install` writes it, for this test's config."""
    missing = lab.libvirt_hooks_missing()
    if missing:
        pytest.fail(missing, pytrace=False)
    root = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    with open(os.path.join(root, "contrib", "libvirt-hook-qemu.in")) as f:
        text = f.read().replace("@BINDIR@", lab.VENV_BIN).replace(
            "@CONFIG@", env.config)
    path = os.path.join(lab.HOOKS_DIR,
                        "nbdsnap-test-" + os.path.basename(env.folder))
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        os.unlink(path)


def test_domain_copied_shut_off_cannot_start_until_the_copy_ends(virt, env):
    dom, base = export_domain(virt, env, start=False)
    server = serve(virt, env, {"vm": base})
    with installed_hook(env):
        held = lab.HeldConnection(server.port, "vm")
        with pytest.raises(libvirt.libvirtError, match="being copied"):
            dom.create()
        assert not dom.isActive()
        held.close()
        env.wait_clean()
        dom.create()                     # the copy has ended: it starts
        assert dom.isActive()


def test_hook_lets_every_other_domain_start(virt, env):
    dom, base = export_domain(virt, env, start=False)
    other, _ = export_domain(virt, env, name="other", start=False)
    server = serve(virt, env, {"vm": base})
    with installed_hook(env):
        held = lab.HeldConnection(server.port, "vm")
        other.create()
        assert other.isActive()
        held.close()


def test_domain_started_anyway_is_shown_by_status(virt, env):
    # No hook installed: the start goes through, and status says so.
    dom, base = export_domain(virt, env, start=False)
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    dom.create()
    out = env.hook("nbdsnap", "status", check=0).stdout
    assert "started during the copy" in out
    (entry,) = json.loads(env.hook("nbdsnap", "status", "--json",
                                   check=0).stdout)["sessions"]
    assert entry["domain_state"] == "running" and entry["warning"]
    held.close()
    env.wait_clean()


def test_broken_configuration_never_stops_a_start(virt, env):
    dom, base = export_domain(virt, env, start=False)
    with installed_hook(env):
        with open(env.config, "w") as f:
            f.write("[nbdsnap]\nquiesce = sometimes\n")
        dom.create()
        assert dom.isActive()
    proc = subprocess.run([os.path.join(lab.VENV_BIN, "nbdsnap"),
                           "libvirt-hook", "d", "prepare", "begin", "-"],
                          input="<domain><name>d</name></domain>", text=True,
                          capture_output=True,
                          env=dict(os.environ, NBDSNAP_CONFIG=env.config))
    assert proc.returncode == 0 and "letting it start" in proc.stderr


def bare_run(hook, args, xml):
    """Run the installed hook as libvirtd does: a bare environment."""
    return subprocess.run([hook] + args, input=xml, capture_output=True,
                          text=True, timeout=60,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                               "HOME": "/", "LC_ALL": "C"})


@pytest.mark.parametrize("xml", [
    pytest.param("<domain><name>d</name>", id="truncated"),
    pytest.param("not XML at all", id="not-xml"),
    pytest.param("", id="empty"),
    pytest.param("<domain><uuid>u</uuid><devices><disk><source/></disk>",
                 id="unclosed-disk"),
])
def test_malformed_xml_lets_the_domain_start_with_one_line(env, xml):
    with installed_hook(env) as hook:
        proc = bare_run(hook, ["d", "prepare", "begin", "-"], xml)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert "cannot check domain d for offline copies, letting it start: " \
           "XMLSyntaxError: " in line


def test_malformed_session_never_stops_a_start(virt, env):
    # A session of the domain's disk whose holder entry is malformed: the
    # hook cannot tell whether a copy runs, so it lets libvirtd start it.
    dom, base = export_domain(virt, env, start=False)
    folder = os.path.join(env.state_dir, "sessions")
    os.makedirs(folder, mode=0o700)
    os.chmod(env.state_dir, 0o711)
    key = sessions.disk_key(os.stat(base))
    state = sessions.new_session(
        key, base, dom.name(), dom.UUIDString(), "vda", base,
        sessions.OFFLINE, procs.holder_of(os.getpid()))
    state["holders"] = [{"pid": os.getpid()}]          # no start, no boot
    with open(os.path.join(folder, key + ".json"), "w") as f:
        json.dump(state, f)
    with installed_hook(env):
        dom.create()
        assert dom.isActive()


def test_domain_started_while_prerun_prepares_an_offline_copy_is_not_copied(
        virt, env):
    dom, base = export_domain(virt, env, start=False)
    with installed_hook(env), \
            held_lock(env, "domain-" + dom.UUIDString()) as lock:
        prerun = hook_in_background(env, "nbd-prerun", base)
        # prerun has seen the domain shut off; it waits before its session.
        lab.wait_until(lambda: has_open(prerun.pid, lock)
                       or prerun.poll() is not None, 60,
                       what="prerun to wait for the domain lock")
        assert prerun.poll() is None, prerun.stderr.read()
        dom.create()        # no session yet: the hook lets it start
    assert prerun.wait(120) == 1
    assert "started" in prerun.stderr.read()
    assert env.sessions() == []
    assert dom.isActive() and lab.disk_source(dom, "vda") == base


def disk_lock_name(path):
    st = os.stat(path)
    return "f-%x-%d" % (st.st_dev, st.st_ino)


@contextlib.contextmanager
def offline_copy(env, base):
    """An offline session held by a process of its own (the 'connection')."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "print(subprocess.call(sys.argv[1:]), flush=True)\n"
         "time.sleep(600)", os.path.join(lab.VENV_BIN, "nbd-prerun"), base],
        env=dict(os.environ, **env.vars), stdout=subprocess.PIPE, text=True,
        stderr=subprocess.DEVNULL)
    try:
        assert holder.stdout.readline().strip() == "0"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def start_in_background(dom):
    result = {}

    def start():
        try:
            dom.create()
            result["started"] = True
        except libvirt.libvirtError as e:
            result["error"] = str(e)
    t = threading.Thread(target=start, daemon=True)
    t.start()
    return t, result


def hooks_waiting_on(path, command=b"libvirt-hook"):
    """Pids of our libvirt hook (or of command) that have path open (wait
    for its lock, or hold it)."""
    found = []
    for p in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            with open("/proc/%s/cmdline" % p, "rb") as f:
                if command in f.read() and has_open(int(p), path):
                    found.append(int(p))
    return found


def test_hook_reads_the_session_under_its_disk_lock(virt, env):
    # The copy ends (its holder goes) while a start waits for the disk's
    # lock: the hook must decide on the state it finds once it has the lock.
    dom, base = export_domain(virt, env, start=False)
    with installed_hook(env), offline_copy(env, base) as holder:
        with held_lock(env, disk_lock_name(base)) as lock:
            t, result = start_in_background(dom)
            lab.wait_until(lambda: hooks_waiting_on(lock)
                           or not t.is_alive(), 30,
                           what="the libvirt hook to wait for the disk lock")
            assert t.is_alive(), result
            holder.kill()
            holder.wait()
        t.join(60)
    assert result == {"started": True}
    assert dom.isActive()


def test_hook_refuses_the_start_when_the_disk_lock_stays_held(virt, env):
    env.configure(lock_timeout=2)
    dom, base = export_domain(virt, env, start=False)
    with installed_hook(env), offline_copy(env, base):
        with held_lock(env, disk_lock_name(base)):
            started = time.monotonic()
            with pytest.raises(libvirt.libvirtError, match="lock"):
                dom.create()
            assert time.monotonic() - started >= 2
    assert not dom.isActive()


@contextlib.contextmanager
def gated_start(env, name):
    """A hook script that libvirtd runs before ours (its name sorts first):
    it holds the start of domain name in prepare begin, and with it
    libvirt's lock of that domain, until the test opens the gate."""
    ready, go = env.path("gate-ready"), env.path("gate-go")
    path = os.path.join(lab.HOOKS_DIR,
                        "nbdsnap-gate-" + os.path.basename(env.folder))
    with open(path, "w") as f:
        f.write('#!/bin/sh\ncat >/dev/null\n'
                '[ "$1 $2 $3" = "%s prepare begin" ] || exit 0\n'
                'touch %s\ni=0\n'
                'while [ ! -e %s ] && [ $i -lt 1200 ]; do\n'
                '    sleep 0.1; i=$((i + 1))\ndone\n' % (name, ready, go))
    os.chmod(path, 0o755)
    try:
        yield ready, lambda: open(go, "w").close()
    finally:
        open(go, "w").close()        # never leave a start held
        os.unlink(path)


def test_start_during_the_last_postrun_of_an_offline_copy_goes_through(
        virt, env):
    # The copy ends while libvirtd is in the middle of starting the domain.
    # The last postrun must not ask libvirt about the domain (which waits
    # for the start's hooks) while it holds the disk lock that our hook of
    # that same start waits for: the hook would refuse the start after its
    # bound ("a copy may be under way") though the copy has ended.
    env.configure(lock_timeout=3)
    dom, base = export_domain(virt, env, start=False)
    lock = os.path.join(env.state_dir, "locks",
                        disk_lock_name(base) + ".lock")
    server = serve(virt, env, {"vm": base})
    with installed_hook(env), gated_start(env, dom.name()) as (ready, go):
        held = lab.HeldConnection(server.port, "vm")
        assert len(env.sessions()) == 1
        t, result = start_in_background(dom)
        lab.wait_until(lambda: os.path.exists(ready) or not t.is_alive(),
                       30, what="the start to reach its prepare hooks")
        assert t.is_alive(), result
        held.close()                     # the last postrun runs now
        lab.wait_until(lambda: not env.sessions()
                       or hooks_waiting_on(lock, b"nbd-postrun"),
                       30, what="the last postrun to take the disk lock")
        go()                             # on to our hook
        t.join(60)
    # libvirt's message ends with what the hook said: show that.
    assert result == {"started": True}, result.get("error", "")[-300:]
    assert dom.isActive()
    env.wait_clean()
