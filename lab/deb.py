"""The Debian packages, built from this tree as an operator builds them
(`make deb` in a copy), installed and purged with dpkg.

Used by the package's tests and the Ansible roles' test: they install the
packages on this machine inside `with deb.machine():`, which takes them
one at a time, refuses a machine where nbdsnap is installed or has left
files (purging those would destroy somebody's freeze or CA), and purges
the packages afterwards.
"""

import contextlib
import fcntl
import os
import shutil
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("nbdsnap", "nbdsnap-client")
# What the packages own or make, which purge removes.
MADE = ("/etc/nbdsnap.conf", "/var/lib/nbdsnap", "/etc/nbdsnap",
        "/var/lib/nbd-pull")
LOCK = "/run/lock/nbdsnap-package-tests.lock"
# Present while a test has the packages installed: what an interrupted
# test left is then a test's, and purged.
MARK = "/var/lib/nbdsnap-package-test"


@contextlib.contextmanager
def machine(timeout=900):
    """This machine's dpkg for one test: no other package test at the same
    time, nbdsnap neither installed nor left by anyone but a test, and
    both packages purged at the end."""
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError("another package test holds %s"
                                       % LOCK) from None
                time.sleep(1)
        if os.path.exists(MARK):
            purge()             # left by an interrupted test
        if any(installed(p) for p in PACKAGES):
            raise RuntimeError("nbdsnap's packages are installed on this "
                               "machine, not by a test; the package tests "
                               "install and purge them: remove them first")
        there = [p for p in MADE if os.path.lexists(p)]
        if there:
            raise RuntimeError("not the packages' and purge would remove "
                               "it: %s" % ", ".join(there))
        open(MARK, "w").close()
        try:
            yield
        finally:
            purge()
            os.unlink(MARK)
    finally:
        os.close(fd)


def build(folder, version=None):
    """Build both packages in folder/src, a copy of this tree's files
    (tracked, or new and not ignored: what the next commit holds).  With
    version, the copy's changelog first gets that version, as an upgrade
    would.  Returns {package: path of its .deb}."""
    src = os.path.join(folder, "src")
    files = subprocess.run(
        ["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others",
         "--exclude-standard"], check=True, capture_output=True,
        text=True).stdout.split("\0")
    for name in filter(None, files):
        source = os.path.join(ROOT, name)
        if not os.path.lexists(source):
            continue        # deleted in the work tree, not yet committed
        target = os.path.join(src, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    if version:
        _new_version(os.path.join(src, "debian", "changelog"), version)
    proc = subprocess.run(["make", "-s", "-C", src, "deb"],
                          capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    if proc.returncode:
        raise RuntimeError("make deb failed:\n%s%s" % (proc.stdout[-3000:],
                                                      proc.stderr[-3000:]))
    debs = {}
    for name in os.listdir(folder):
        package = name.split("_")[0]
        if name.endswith("_all.deb") and package in PACKAGES:
            debs[package] = os.path.join(folder, name)
    assert sorted(debs) == sorted(PACKAGES), os.listdir(folder)
    return debs


def _new_version(changelog, version):
    with open(changelog) as f:
        text = f.read()
    entry = ("nbdsnap (%s) unstable; urgency=medium\n\n"
             "  * A rebuild, to test upgrades.\n\n"
             " -- nbdsnap developers <nbdsnap@example.org>  "
             "Wed, 02 Dec 2026 03:00:00 +0000\n\n" % version)
    with open(changelog, "w") as f:
        f.write(entry + text)


def dpkg(*args, check=True):
    """dpkg, non-interactive: a changed conffile keeps the operator's.
    It waits while another dpkg or apt holds dpkg's lock."""
    deadline = time.monotonic() + 600
    while True:
        proc = subprocess.run(
            ["dpkg", "--force-confdef", "--force-confold"] + list(args),
            capture_output=True, text=True, timeout=600,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if "lock was locked" not in proc.stderr or \
                time.monotonic() > deadline:
            break
        time.sleep(2)
    if check and proc.returncode:
        raise RuntimeError("dpkg %s failed: %s%s" % (
            " ".join(args), proc.stdout, proc.stderr))
    return proc


def installed(package):
    """The installed version of package, or None (whatever its selection:
    a refused removal leaves it installed, selected for deinstall)."""
    proc = subprocess.run(["dpkg-query", "-W", "-f",
                           "${Status} ${Version}", package],
                          capture_output=True, text=True)
    words = proc.stdout.split()
    if proc.returncode or words[1:3] != ["ok", "installed"]:
        return None
    return words[3]


def purge():
    """Purge both packages (if installed or left configured)."""
    dpkg("--purge", *PACKAGES)
