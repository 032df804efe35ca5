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
    40 s here); with group kvm it takes a fraction of a second.
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
    # script there, so that the tests' libvirt hooks are run.
    if not os.path.exists(KEEP_HOOK):
        os.makedirs(HOOKS_DIR, exist_ok=True)
        with open(KEEP_HOOK, "w") as f:
            f.write("#!/bin/sh\n# nbdsnap's tests: keeps libvirtd running "
                    "the hooks in this folder.\ncat >/dev/null\n")
        os.chmod(KEEP_HOOK, 0o755)
        if _running("libvirtd"):
            subprocess.run(["pkill", "-x", "libvirtd"], check=False)
            wait_until(lambda: not _running("libvirtd"), 30,
                       what="libvirtd to stop")
    if not _libvirt_answers():
        if not _running("libvirtd"):
            subprocess.run(["libvirtd", "-d"], check=True)
        wait_until(_libvirt_answers, 60, 0.2, "libvirtd to answer")


def workdir(prefix="nbdsnap-lab-"):
    """A folder QEMU (user libvirt-qemu) can reach: 0711, not in /tmp."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")
    os.chmod(path, 0o711)
    return path


def write_config(path, state_dir, snapshot_dir, **settings):
    lines = ["[nbdsnap]", "state_dir = %s" % state_dir,
             "snapshot_dir = %s" % snapshot_dir]
    lines += ["%s = %s" % kv for kv in settings.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def cleanup_folder(path):
    shutil.rmtree(path, ignore_errors=True)


# -- libvirtd restarted under a test --------------------------------------------

LIBVIRTD_PIDFILE = "/run/libvirtd.pid"


def restart_libvirtd(the_lab, timeout=60):
    """Stop libvirtd with SIGTERM, start it again and wait until it answers.

    Running domains survive (QEMU is not libvirtd's child for life), but
    every connection breaks: the_lab's is opened again and its domains are
    looked up anew by UUID, in the same order.  Other users of this machine
    lose their connections too: keep this rare and short.
    """
    uuids = [dom.UUIDString() for dom in the_lab.domains]
    with open(LIBVIRTD_PIDFILE) as f:
        pid = int(f.read())
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not os.path.exists("/proc/%d" % pid), timeout, 0.05,
               "libvirtd (pid %d) to stop" % pid)
    subprocess.run(["libvirtd", "-d"], check=True)
    wait_until(_libvirt_answers, timeout, 0.1, "libvirtd to answer again")
    with contextlib.suppress(libvirt.libvirtError):
        the_lab.conn.close()
    the_lab.conn = libvirt.open(URI)
    domains = []
    for uuid in uuids:
        with contextlib.suppress(libvirt.libvirtError):
            domains.append(the_lab.conn.lookupByUUIDString(uuid))
    the_lab.domains = domains
    return domains
