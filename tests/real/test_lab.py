"""The lab never stops a daemon it did not start.

The machine's libvirtd may serve other users (or systemd): a test suite that
kills it by name takes their connections and jobs down.  Each test runs the
lab in a PID namespace of its own, where a stand-in named libvirtd (a copy
of sleep, its pid in a pid file of the test's) is all that a kill by name
or by pid file can reach; libvirt itself is the machine's, through its
socket.
"""

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# In the namespace: stand-ins for libvirtd and virtlogd, the lab pointed at
# the test's folder, then ACTION; prints what became of the stand-in.
SCRIPT = r"""
import json, os, subprocess, sys, types
sys.path.insert(0, %(root)r)
import lab
from lab import host
folder = %(folder)r
procs = {}
for name in ("libvirtd", "virtlogd"):
    procs[name] = subprocess.Popen([os.path.join(folder, name), "600"])
    lab.wait_until(lambda: open("/proc/%%d/comm" %% procs[name].pid).read()
                   == name + "\n", 10, 0.01, "the exec of " + name)
with open(os.path.join(folder, "libvirtd.pid"), "w") as f:
    f.write("%%d\n" %% procs["libvirtd"].pid)
host.LIBVIRTD_PIDFILE = os.path.join(folder, "libvirtd.pid")
host.STARTED_RECORD = os.path.join(folder, "started")
host.HOOKS_DIR = os.path.join(folder, "hooks", "qemu.d")
host.KEEP_HOOK = os.path.join(host.HOOKS_DIR, "00-nbdsnap-lab")
os.environ["PATH"] = folder + ":" + os.environ["PATH"]
error = None
try:
    %(action)s
except Exception as e:
    error = str(e)
alive = procs["libvirtd"].poll() is None
print(json.dumps({"alive": alive, "error": error,
                  "missing": host.libvirt_hooks_missing() if alive else None}))
for p in procs.values():
    p.kill()
"""


def in_namespace(tmp_path, action):
    folder = str(tmp_path)
    for name in ("libvirtd", "virtlogd"):
        shutil.copy("/bin/sleep", os.path.join(folder, name))
    code = SCRIPT % {"root": ROOT, "folder": folder, "action": action}
    proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc",
                           sys.executable, "-I", "-c", code],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_ensure_host_never_stops_a_libvirtd_it_did_not_start(tmp_path):
    # The keep-hook is missing and a libvirtd runs: it stays, and the tests
    # that need libvirt's hooks are told why they would not run.
    out = in_namespace(tmp_path, "lab.ensure_host()")
    assert out["alive"], out
    assert out["error"] is None
    assert os.path.exists(tmp_path / "hooks" / "qemu.d" / "00-nbdsnap-lab")
    assert "restart libvirtd once" in out["missing"]


def test_restart_libvirtd_only_restarts_the_labs_own(tmp_path):
    out = in_namespace(tmp_path, "lab.restart_libvirtd(types.SimpleNamespace("
                       "domains=[], conn=None))")
    assert out["alive"], out
    assert "was not started by the lab" in out["error"]


def test_a_build_keeps_the_guests_other_branches_use(tmp_path):
    # Two worktrees on one machine have two recipes, so two keys: a build of
    # one must not delete the guest the other is booting.
    from lab import guest_build
    now = 10 ** 9
    for name, days in (("mine", 0), ("theirs", 1), ("old", 8)):
        (tmp_path / name).mkdir()
        manifest = tmp_path / name / "manifest.json"
        manifest.write_text("{}")
        os.utime(manifest, (now - days * 86400,) * 2)
    (tmp_path / ".build-x").mkdir()
    guest_build.prune(str(tmp_path), "mine", now=now)
    assert sorted(os.listdir(tmp_path)) == [".build-x", "mine", "theirs"]
