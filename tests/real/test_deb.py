"""The Debian packages, as an operator uses them on this machine: built
with `make deb`, installed with dpkg, used as installed (the hooks under
nbd-server with the shipped /etc/nbdsnap.conf, nbd-pull on the client
side), upgraded with a changed conffile kept, and purged, leaving nothing
behind."""

import contextlib
import os
import subprocess

import pytest

import lab
from lab import deb
from test_export_lint import included_server
from test_freeze import export_domain

# What nbdsnap makes on a host that no package lists, and purge removes.
MADE = ("/var/lib/nbdsnap", "/etc/nbdsnap", "/var/lib/nbd-pull")
RECOVER_LINK = "/etc/systemd/system/multi-user.target.wants/" \
    "nbdsnap-recover.service"
UNITS = ("/lib/systemd/system/nbdsnap-recover.service",
         "/lib/systemd/system/nbd-pull@.service",
         "/lib/systemd/system/nbd-pull@.timer")


@pytest.fixture
def packages():
    """A machine without nbdsnap's packages before and after the test."""
    if deb.installed("nbdsnap") or deb.installed("nbdsnap-client"):
        deb.purge()         # left by an interrupted run of this test
    there = [p for p in MADE + ("/etc/nbdsnap.conf",) if os.path.exists(p)]
    assert not there, "not a package's, and purge would remove it: %s" % there
    folder = lab.workdir("nbdsnap-deb-")
    try:
        yield folder
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["/usr/bin/nbdsnap", "recover", "--all"],
                           capture_output=True, timeout=300)
        deb.purge()
        lab.cleanup_folder(folder)


def run(*argv, check=0, env=None):
    proc = subprocess.run(list(argv), capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, **(env or {})))
    if check is not None:
        assert proc.returncode == check, (argv, proc.stdout, proc.stderr)
    return proc


def listed(package):
    return run("dpkg", "-L", package).stdout.split()


def test_packages_install_work_upgrade_and_purge(virt, packages):
    folder = packages
    debs = deb.build(os.path.join(folder, "v1"))
    # A clone host installs no libvirt: the client depends on Python only.
    depends = run("dpkg-deb", "-f", debs["nbdsnap-client"], "Depends").stdout
    assert "libvirt" not in depends and "nbd-server" not in depends
    # Debian's own checks find nothing to say.
    (changes,) = [n for n in os.listdir(os.path.join(folder, "v1"))
                  if n.endswith(".changes")]
    lint = run("lintian", os.path.join(folder, "v1", changes), check=None)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert [line for line in lint.stdout.splitlines()
            if line[:2] in ("E:", "W:")] == []

    deb.dpkg("-i", debs["nbdsnap-client"], debs["nbdsnap"])
    assert deb.installed("nbdsnap") == deb.installed("nbdsnap-client")
    files = set(listed("nbdsnap") + listed("nbdsnap-client"))
    for command in ("nbd-prerun", "nbd-postrun", "nbdsnap", "nbd-verify",
                    "nbd-pull"):
        assert "/usr/bin/" + command in files
        out = run("/usr/bin/" + command, "--help").stdout
        assert "usage: %s" % command in out
    conffiles = run("dpkg-query", "-W", "-f", "${Conffiles}",
                    "nbdsnap").stdout
    assert "/etc/nbdsnap.conf " in conffiles
    assert "/etc/libvirt/hooks/qemu.d/nbdsnap " in conffiles
    for page in ("man8/nbdsnap.8.gz", "man1/nbd-pull.1.gz",
                 "man5/nbdsnap.conf.5.gz"):
        assert "/usr/share/man/" + page in files
    # Recovery at boot is enabled; the units are sound for systemd.
    assert os.path.islink(RECOVER_LINK)
    verify = run("systemd-analyze", "verify", UNITS[0],
                 "nbd-pull@web1.service", "nbd-pull@web1.timer", check=None)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr

    # The installed hooks, with the shipped configuration, freeze and
    # commit a running domain; the installed nbd-pull copies its frozen
    # base.  No NBDSNAP_CONFIG: /etc/nbdsnap.conf as it was installed.
    vars_ = {"LIBVIRT_DEFAULT_URI": lab.URI}
    env = Env(folder, vars_)
    dom, base = export_domain(virt, env, name="deb")
    confd = env.path("conf.d")
    os.mkdir(confd)
    run("/usr/bin/nbdsnap", "export", dom.name(), "--allow", "127.0.0.1",
        "-o", os.path.join(confd, "deb.conf"), env=vars_)
    section = open(os.path.join(confd, "deb.conf")).read()
    assert "prerun = /usr/bin/nbd-prerun " in section
    server = included_server(virt, env, confd)
    name = dom.name() + "-vda"
    frozen = lab.sha256(base)
    held = lab.HeldConnection(server.port, name)
    try:
        lab.guest_write(dom, "vda", 0x5a, 0, 4096)
        # Removing nbdsnap now would strand the overlay: refused, kept.
        removal = deb.dpkg("-r", "nbdsnap", check=False)
        assert removal.returncode != 0
        assert "nbdsnap recover" in removal.stderr
        assert deb.installed("nbdsnap")
        copy = env.path("copy.raw")
        pull = run("/usr/bin/nbd-pull", server.uri(name), copy, check=None)
        assert pull.returncode == 0, pull.stderr
        assert lab.sha256(copy) == frozen
    finally:
        held.close()
    lab.wait_until(lambda: not os.listdir("/var/lib/nbdsnap/sessions"), 120,
                   what="the installed postrun to end the session")
    assert lab.read_range(base, 0, 4096) == b"\x5a" * 4096
    assert lab.disk_source(dom, "vda") == base
    server.stop()

    # Upgrade: the operator's conffile and the history stay.
    with open("/etc/nbdsnap.conf", "a") as f:
        f.write("# the operator's line\n")
    debs2 = deb.build(os.path.join(folder, "v2"), version="0.1.0+up1")
    deb.dpkg("-i", debs2["nbdsnap-client"], debs2["nbdsnap"])
    assert deb.installed("nbdsnap") == "0.1.0+up1"
    assert deb.installed("nbdsnap-client") == "0.1.0+up1"
    assert "# the operator's line" in open("/etc/nbdsnap.conf").read()
    history = run("/usr/bin/nbdsnap", "history", env=vars_).stdout
    assert dom.name() in history
    assert os.path.islink(RECOVER_LINK)
    files = set(listed("nbdsnap") + listed("nbdsnap-client"))

    # Purge: nothing of either package is left, nor what they made.
    deb.dpkg("--purge", "nbdsnap", "nbdsnap-client")
    assert deb.installed("nbdsnap") is None
    shared = {"/etc", "/lib", "/usr", "/usr/bin", "/usr/lib", "/usr/share",
              "/."}
    left = [f for f in files if os.path.lexists(f) and f not in shared
            and not os.path.isdir(f)]
    assert left == []
    for path in MADE + ("/etc/nbdsnap.conf", RECOVER_LINK,
                        "/usr/lib/python3/dist-packages/nbdsnap",
                        "/etc/libvirt/hooks/qemu.d/nbdsnap"):
        assert not os.path.lexists(path), path
    assert not run("dpkg-query", "-W", "nbdsnap", check=None).stdout


class Env:
    """The little of tests/real's Env that export_domain and the server
    use, without an nbdsnap.conf of the test's own."""

    def __init__(self, folder, vars_):
        self.folder = folder
        self.vars = vars_

    def name(self, prefix):
        return prefix + "-" + os.path.basename(self.folder)[-6:]

    def path(self, *names):
        return os.path.join(self.folder, *names)
