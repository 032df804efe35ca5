"""systemd as PID 1 of a PID and mount namespace of the test's own.

This machine's PID 1 is not systemd, and a clone host's is: to run our
units as a user's systemd runs them (ExecStart's parsing and %i,
conditions, exit statuses and a failed unit, a timer and its drop-in),
Debian's own /lib/systemd/systemd is started as init of a new PID
namespace, in a mount namespace of its own, loading only the units in
its folder (SYSTEMD_UNIT_PATH): the test's copies of the installed unit
files and empty stand-ins for the targets they name.  Nothing else of the
host's boot is started, and what systemd sets for the whole host (a few
sysctls) is put back.  Its /run is a tmpfs of its own with the host's
/run/libvirt in it, so that it never meets a host systemd's sockets; the
services it runs see the host's files, network and libvirtd.

    systemd = Systemd(folder)
    systemd.add("/lib/systemd/system/nbd-pull@.service")
    systemd.systemctl("start", "nbd-pull@web1.service")
    systemd.close()           # everything in the namespace ends

systemctl reaches it through nsenter.  close() kills the namespace's init,
which ends every process in it, and removes the cgroups it made (its
init.scope and system.slice); so does the death of the test's process
(unshare dies with it, and kills the init it forked).
"""

import ctypes
import os
import shutil
import signal
import subprocess

from .host import wait_until

SYSTEMD = "/lib/systemd/systemd"
CGROUPS = "/sys/fs/cgroup"
# What a service's and a timer's default dependencies name, and what our
# units name: empty, so that nothing of the host's boot runs.
TARGETS = ("sysinit", "basic", "shutdown", "timers", "sockets", "paths",
           "slices", "network", "network-online", "time-set", "time-sync",
           "multi-user", "default")
STAND_IN_SERVICES = ("libvirtd", "virtqemud")
OURS = ("init.scope", "system.slice")       # the cgroups it makes
# What systemd 252 as PID 1 raises for the whole host (main.c's bumps),
# put back by close(): a larger net.unix.max_dgram_qlen changes when a
# full syslog socket blocks its writers, which other tests rely on.
SYSCTLS = ("/proc/sys/net/unix/max_dgram_qlen", "/proc/sys/fs/file-max",
           "/proc/sys/fs/nr_open")
# The namespace's PID 1 until it execs systemd: its own /run, the host's
# libvirt socket folder moved into it.  $1 the unit folder, $2 a stash.
INIT = """set -e
if [ -d /run/libvirt ]; then mount --bind /run/libvirt "$2"; fi
mount -t tmpfs -o mode=0755 tmpfs /run
if mountpoint -q "$2"; then
    mkdir /run/libvirt
    mount --move "$2" /run/libvirt
fi
exec env container=nbdsnap-lab SYSTEMD_UNIT_PATH="$1" %s --system
""" % SYSTEMD
PR_SET_PDEATHSIG = 1


def _die_with_parent():
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG,
                                            signal.SIGKILL)


class Systemd:
    def __init__(self, folder):
        self.units = os.path.join(folder, "units")
        os.makedirs(self.units, exist_ok=True)
        for target in TARGETS:
            self._write(target + ".target", "[Unit]\nDescription=%s\n"
                        % target)
        for service in STAND_IN_SERVICES:
            self._write(service + ".service", "[Unit]\nDescription=%s\n"
                        "[Service]\nType=oneshot\nExecStart=/bin/true\n"
                        % service)
        self._cgroups = set(_cgroup_dirs())
        self._sysctls = {path: open(path).read() for path in SYSCTLS}
        self.log = os.path.join(folder, "systemd.log")
        stash = os.path.join(folder, "run-libvirt")
        os.makedirs(stash, exist_ok=True)
        with open(self.log, "ab") as log:
            self._unshare = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--kill-child", "--mount",
                 "--mount-proc", "--propagation", "private", "--uts",
                 "--ipc", "sh", "-c",
                 INIT, "init", self.units, stash],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, preexec_fn=_die_with_parent)
        self.pid = None
        try:
            self.pid = wait_until(self._init, 10, interval=0.05,
                                  what="systemd to start")
            wait_until(self._running, 30, interval=0.1,
                       what="systemd to be running")
        except Exception:
            self.close()
            raise

    def _write(self, name, text):
        with open(os.path.join(self.units, name), "w") as f:
            f.write(text)

    def _init(self):
        """The namespace's PID 1, the child unshare forked."""
        try:
            with open("/proc/%d/task/%d/children" % ((self._unshare.pid,)
                                                     * 2)) as f:
                children = f.read().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def _running(self):
        state = self.systemctl("is-system-running").stdout.strip()
        return state in ("running", "degraded")

    def add(self, path, text=None):
        """A unit file, copied as it is (or text as that unit); a path
        ending in .d/NAME.conf is a drop-in.  systemd reloads."""
        name = os.path.basename(path)
        parent = os.path.basename(os.path.dirname(path))
        if parent.endswith(".d"):
            os.makedirs(os.path.join(self.units, parent), exist_ok=True)
            name = os.path.join(parent, name)
        if text is None:
            shutil.copyfile(path, os.path.join(self.units, name))
        else:
            self._write(name, text)
        self.systemctl("daemon-reload", check=True)

    def systemctl(self, *args, check=False, timeout=300):
        proc = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "systemctl",
             "--no-pager"] + list(args), capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode:
            raise RuntimeError("systemctl %s: %s" % (" ".join(args),
                                                     proc.stderr.strip()))
        return proc

    def show(self, unit, prop):
        return self.systemctl("show", "-P", prop, unit,
                              check=True).stdout.strip()

    def close(self):
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self._unshare.wait(30)
        except subprocess.TimeoutExpired:
            self._unshare.kill()
            self._unshare.wait(30)
        for path, value in self._sysctls.items():
            if open(path).read() != value:
                with open(path, "w") as f:
                    f.write(value)
        # The cgroups systemd made, deepest first (empty now: their
        # processes died with the namespace); none of libvirt's.
        made = [path for path in set(_cgroup_dirs()) - self._cgroups
                if set(path.split(os.sep)) & set(OURS)]
        for path in sorted(made, key=len, reverse=True):
            try:
                os.rmdir(path)
            except OSError:
                pass


def _cgroup_dirs():
    for top, dirs, _ in os.walk(CGROUPS):
        for name in dirs:
            yield os.path.join(top, name)
