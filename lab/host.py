"""The host: its daemons, the lab's folders and the hooks' settings.

/dev/kvm usable, virtlogd and libvirtd running (ensure_host), a folder QEMU
can reach (workdir), a config file for the hooks (write_config), and
libvirtd restarted under a test (restart_libvirtd).
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import libvirt

URI = "qemu:///system"
HOOKS_DIR = "/etc/libvirt/hooks/qemu.d"
KEEP_HOOK = os.path.join(HOOKS_DIR, "00-nbdsnap-lab")
# The hooks are the entry points installed beside the running interpreter.
VENV_BIN = os.path.dirname(sys.executable)


def wait_until(pred, timeout=30.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("timed out after %g s waiting for %s"
                               % (timeout, what))
        time.sleep(interval)


# -- the host ----------------------------------------------------------------

def _running(name):
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/%s/comm" % pid) as f:
                    if f.read().strip() == name:
                        return True
            except OSError:
                pass
    return False


def _libvirt_answers():
    try:
        libvirt.open(URI).close()
        return True
    except libvirt.libvirtError:
        return False


def ensure_host():
    """/dev/kvm with Debian's permissions, virtlogd and libvirtd running.

    With /dev/kvm root-only, libvirt re-probes QEMU on every define (about
    40 s here); with group kvm it takes a fraction of a second.  A daemon is
    started only when absent; a libvirtd is stopped only if the lab started
    it (started_by_lab): another's may serve other users, or systemd.
    """
    libvirt.registerErrorHandler(lambda *a: None, None)
    if os.path.exists("/dev/kvm"):
        st = os.stat("/dev/kvm")
        if st.st_mode & 0o060 != 0o060:
            subprocess.run(["chgrp", "kvm", "/dev/kvm"], check=True)
            os.chmod("/dev/kvm", 0o660)
    if not _running("virtlogd"):
        subprocess.run(["virtlogd", "-d"], check=True)
    # libvirtd looks for hook scripts when it starts, and runs the ones
    # added later only if its qemu.d folder held one then: keep a no-op
    # script there, so that the tests' libvirt hooks are run.  A libvirtd
    # that started without it runs none until it is restarted: the lab
    # restarts its own; of another's, libvirt_hooks_missing() tells the
    # tests that need the hooks.
    if not os.path.exists(KEEP_HOOK):
        os.makedirs(HOOKS_DIR, exist_ok=True)
        with open(KEEP_HOOK, "w") as f:
            f.write("#!/bin/sh\n# nbdsnap's tests: keeps libvirtd running "
                    "the hooks in this folder.\ncat >/dev/null\n")
        os.chmod(KEEP_HOOK, 0o755)
        if started_by_lab():
            _stop_libvirtd()
    if not _libvirt_answers():
        if not _running("libvirtd"):
            _start_libvirtd()
        wait_until(_libvirt_answers, 60, 0.2, "libvirtd to answer")


# -- which libvirtd: the lab's own, and does it run hooks -----------------

LIBVIRTD_PIDFILE = "/run/libvirtd.pid"
# The libvirtd the lab started, as "PID START": the only one it ever stops.
# Under /run: gone with a reboot, as the daemon is.
STARTED_RECORD = "/run/nbdsnap-lab/libvirtd"


def _proc_start(pid):
    """pid's start time in clock ticks since boot, or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _libvirtd():
    """(pid, start) of the running libvirtd, from its pid file, or None."""
    try:
        with open(LIBVIRTD_PIDFILE) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return None
    start = _proc_start(pid)
    return None if start is None else (pid, start)


def started_by_lab():
    """True if the running libvirtd is one the lab started (not reused)."""
    running = _libvirtd()
    try:
        with open(STARTED_RECORD) as f:
            recorded = tuple(int(x) for x in f.read().split())
    except (OSError, ValueError):
        return False
    return running is not None and recorded == running


def _start_libvirtd(timeout=60):
    subprocess.run(["libvirtd", "-d"], check=True)
    wait_until(_libvirt_answers, timeout, 0.1, "libvirtd to answer")
    running = wait_until(_libvirtd, timeout, 0.05, "libvirtd's pid file")
    os.makedirs(os.path.dirname(STARTED_RECORD), exist_ok=True)
    with open(STARTED_RECORD, "w") as f:
        f.write("%d %d\n" % running)


def _stop_libvirtd(timeout=60):
    """SIGTERM to libvirtd; wait until it is gone.  The lab's own only."""
    pid = _libvirtd()[0]
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not os.path.exists("/proc/%d" % pid), timeout, 0.05,
               "libvirtd (pid %d) to stop" % pid)


def _hook_scripts():
    """The qemu hook scripts libvirtd would find: qemu, and qemu.d/*."""
    paths = [os.path.join(os.path.dirname(HOOKS_DIR), "qemu")]
    with contextlib.suppress(OSError):
        paths += [os.path.join(HOOKS_DIR, n) for n in os.listdir(HOOKS_DIR)]
    return [p for p in paths if os.path.isfile(p) and os.access(p, os.X_OK)]


def _boot_time():
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return int(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")


def libvirt_hooks_missing():
    """None if libvirtd runs the hook scripts in HOOKS_DIR, else why not.

    libvirtd looks for hook scripts once, when it starts: scripts added to
    a qemu.d that held none then are never run (libvirt's virHookInitialize).
    """
    running = _libvirtd()
    if running is None:
        return "libvirtd is not running"
    scripts = _hook_scripts()
    if scripts and started_by_lab():
        return None             # the lab writes KEEP_HOOK before it starts one
    started = _boot_time() + running[1] / os.sysconf("SC_CLK_TCK")
    if any(os.stat(p).st_ctime < started for p in scripts):
        return None
    return ("libvirtd (pid %d) started before any hook script was in %s, so "
            "it runs none: restart libvirtd once (the lab stops only a "
            "libvirtd it started)" % (running[0], HOOKS_DIR))


def workdir(prefix="nbdsnap-lab-"):
    """A folder QEMU (user libvirt-qemu) can reach: 0711, not in /tmp."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")
    os.chmod(path, 0o711)
    return path


def write_config(path, state_dir, snapshot_dir, **settings):
    # digest = on is the default: manifests go beside the state, never in
    # the host's /var/lib/nbdsnap.
    settings.setdefault("manifest_dir", os.path.join(state_dir, "manifests"))
    lines = ["[nbdsnap]", "state_dir = %s" % state_dir,
             "snapshot_dir = %s" % snapshot_dir]
    lines += ["%s = %s" % kv for kv in settings.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def cleanup_folder(path):
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def scratch(prefix="nbdsnap-lab-"):
    """A workdir() for the with block, removed at its end."""
    folder = workdir(prefix)
    try:
        yield folder
    finally:
        cleanup_folder(folder)


# -- libvirtd restarted under a test --------------------------------------------

def restart_libvirtd(the_lab, timeout=60):
    """Stop libvirtd with SIGTERM, start it again and wait until it answers.

    Running domains survive (QEMU is not libvirtd's child for life), but
    every connection breaks: the_lab's is opened again and its domains are
    looked up anew by UUID, in the same order.  Only a libvirtd the lab
    started: another's serves other users, or belongs to systemd, which a
    libvirtd started by hand would fight.
    """
    if not started_by_lab():
        running = _libvirtd()
        raise RuntimeError(
            "libvirtd%s was not started by the lab, and this test restarts "
            "libvirtd: stop it and run again (the lab then starts its own)"
            % (" (pid %d)" % running[0] if running else ""))
    uuids = [dom.UUIDString() for dom in the_lab.domains]
    _stop_libvirtd(timeout)
    _start_libvirtd(timeout)
    with contextlib.suppress(libvirt.libvirtError):
        the_lab.conn.close()
    the_lab.conn = libvirt.open(URI)
    domains = []
    for uuid in uuids:
        with contextlib.suppress(libvirt.libvirtError):
            domains.append(the_lab.conn.lookupByUUIDString(uuid))
    the_lab.domains = domains
    return domains
