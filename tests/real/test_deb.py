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
from lab.systemd import Systemd
from test_export_lint import included_server
from test_freeze import MiB, export_domain

RECOVER_LINK = "/etc/systemd/system/multi-user.target.wants/" \
    "nbdsnap-recover.service"
UNITS = ("/lib/systemd/system/nbdsnap-recover.service",
         "/lib/systemd/system/nbd-pull@.service",
         "/lib/systemd/system/nbd-pull@.timer")
HOOK = "/etc/libvirt/hooks/qemu.d/nbdsnap"
# The clone host's side as it runs without libvirt, lxml or the hooks.
BLOCKED = ("import sys\n"
           "for name in ('libvirt', 'lxml', 'nbdsnap.hooks'):\n"
           "    sys.modules[name] = None\n"
           "sys.argv[0] = sys.argv[1]\n"
           "from nbdsnap.pull.cli import main as pull\n"
           "from nbdsnap.verify.cli import main as verify\n"
           "sys.exit({'nbd-pull': pull, 'nbd-verify': verify}[sys.argv[1]]"
           "(sys.argv[2:]))\n")
# The packages' tests build, install, upgrade and purge: more than the
# suite's 300 s a test.
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def built():
    """The packages of this tree, built once for the module's tests."""
    folder = lab.workdir("nbdsnap-debs-")
    try:
        yield deb.build(folder)
    finally:
        lab.cleanup_folder(folder)


@pytest.fixture
def packages():
    """A machine without nbdsnap's packages before and after the test
    (lab/deb.py's machine())."""
    folder = lab.workdir("nbdsnap-deb-")
    try:
        with deb.machine():
            try:
                yield folder
            finally:
                with contextlib.suppress(Exception):
                    subprocess.run(["/usr/bin/nbdsnap", "recover", "--all"],
                                   capture_output=True, timeout=300)
    finally:
        lab.cleanup_folder(folder)


def client(*argv, check=0):
    """nbd-pull or nbd-verify as installed, with libvirt, lxml and the
    hooks impossible to import."""
    return run("/usr/bin/python3", "-I", "-c", BLOCKED, *argv, check=check)


def run(*argv, check=0, env=None):
    proc = subprocess.run(list(argv), capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, **(env or {})))
    if check is not None:
        assert proc.returncode == check, (argv, proc.stdout, proc.stderr)
    return proc


def listed(package):
    return run("dpkg", "-L", package).stdout.split()


def test_packages_install_work_upgrade_and_purge(virt, packages, built):
    folder = packages
    debs = built
    # A clone host installs no libvirt: the client depends on Python only.
    depends = run("dpkg-deb", "-f", debs["nbdsnap-client"], "Depends").stdout
    assert "libvirt" not in depends and "nbd-server" not in depends
    # Debian's own checks find nothing to say.
    where = os.path.dirname(debs["nbdsnap"])
    (changes,) = [n for n in os.listdir(where) if n.endswith(".changes")]
    lint = run("lintian", os.path.join(where, changes), check=None)
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
    for command in ("nbd-pull", "nbd-verify"):
        assert "usage: %s" % command in client(command, "--help").stdout
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
    env, dom, base, server, name = served(virt, folder, "deb")
    frozen = lab.sha256(base)
    held = lab.HeldConnection(server.port, name)
    try:
        lab.guest_write(dom, "vda", 0x5a, 0, 4096)
        # Removing nbdsnap now would strand the overlay: refused, kept;
        # also when nbdsnap status cannot answer (a broken configuration):
        # then the session files say it.
        conf = open("/etc/nbdsnap.conf").read()
        for broken in (False, True):
            if broken:
                with open("/etc/nbdsnap.conf", "a") as f:
                    f.write("quiesce = sometimes\n")
                assert run("/usr/bin/nbdsnap", "status",
                           check=None).returncode == 2
            removal = deb.dpkg("-r", "nbdsnap", check=False)
            assert removal.returncode != 0
            assert "1 disk session(s) are not ended" in removal.stderr
            assert deb.installed("nbdsnap")
        with open("/etc/nbdsnap.conf", "w") as f:
            f.write(conf)
        copy = env.path("copy.raw")
        pull = client("nbd-pull", server.uri(name), copy, check=None)
        assert pull.returncode == 0, pull.stderr
        assert lab.sha256(copy) == frozen
        assert client("nbd-verify", "compare", server.uri(name),
                      copy).returncode == 0
    finally:
        held.close()
    wait_clean()
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
    history = run("/usr/bin/nbdsnap", "history", env=env.vars).stdout
    assert dom.name() in history
    assert os.path.islink(RECOVER_LINK)
    files = set(listed("nbdsnap") + listed("nbdsnap-client"))
    run("systemctl", "enable", "nbd-pull@%s.timer" % dom.name())
    timer_link = "/etc/systemd/system/timers.target.wants/nbd-pull@%s.timer" \
        % dom.name()
    assert os.path.islink(timer_link)

    # Removed, not purged: the libvirt hook (a conffile) stays, and lets
    # every domain start.
    assert lab.libvirt_hooks_missing() is None
    deb.dpkg("-r", "nbdsnap", "nbdsnap-client")
    assert os.path.exists(HOOK) and not os.path.exists("/usr/bin/nbdsnap")
    later = virt.define(env.name("later"), [lab.disk_xml(lab.make_image(
        env.path("later.raw"), 4), "vda")])
    assert later.isActive()

    # Purge: nothing of either package is left, nor what they made.
    deb.dpkg("--purge", "nbdsnap", "nbdsnap-client")
    assert deb.installed("nbdsnap") is None
    shared = {"/etc", "/lib", "/usr", "/usr/bin", "/usr/lib", "/usr/share",
              "/."}
    left = [f for f in files if os.path.lexists(f) and f not in shared
            and not os.path.isdir(f)]
    assert left == []
    for path in deb.MADE + (RECOVER_LINK, timer_link, HOOK,
                            "/usr/lib/python3/dist-packages/nbdsnap"):
        assert not os.path.lexists(path), path
    assert not run("dpkg-query", "-W", "nbdsnap", check=None).stdout


def served(virt, folder, name):
    """A domain exported by the installed nbdsnap, with the shipped
    /etc/nbdsnap.conf (no NBDSNAP_CONFIG), served by nbd-server."""
    env = Env(folder, {"LIBVIRT_DEFAULT_URI": lab.URI})
    dom, base = export_domain(virt, env, name=name)
    confd = env.path("conf.d")
    os.mkdir(confd)
    run("/usr/bin/nbdsnap", "export", dom.name(), "--allow", "127.0.0.1",
        "-o", os.path.join(confd, "deb.conf"), env=env.vars)
    section = open(os.path.join(confd, "deb.conf")).read()
    assert "prerun = /usr/bin/nbd-prerun " in section
    server = included_server(virt, env, confd)
    return env, dom, base, server, dom.name() + "-vda"


def wait_clean():
    lab.wait_until(lambda: not os.listdir("/var/lib/nbdsnap/sessions"), 120,
                   what="the installed postrun to end the session")


def test_the_clone_hosts_timer_pulls_under_systemd(virt, packages, built):
    """The installed nbd-pull@ units, run by a real systemd (PID 1 of a
    namespace, lab/systemd.py): the service pulls what NAME.args names, a
    timer with a drop-in as `systemctl edit` writes it refreshes the copy,
    a pull that fails leaves the unit failed, no NAME.args runs nothing."""
    folder = packages
    deb.dpkg("-i", built["nbdsnap-client"], built["nbdsnap"])
    env, dom, base, server, name = served(virt, folder, "unit")
    os.mkdir(env.path("clones"))
    copy = env.path("clones", "unit vda.img")       # a space: one line
    metrics = env.path("pull.prom")
    args = "/etc/nbdsnap/pull/%s.args" % dom.name()
    with open(args, "w") as f:
        f.write("# what nbd-pull@%s pulls\n--metrics %s\n\n%s\n%s\n"
                % (dom.name(), metrics, server.uri(name), copy))
    service = "nbd-pull@%s.service" % dom.name()
    timer = "nbd-pull@%s.timer" % dom.name()
    systemd = Systemd(env.path("systemd"))
    try:
        for unit in ("nbd-pull@.service", "nbd-pull@.timer"):
            systemd.add("/lib/systemd/system/" + unit)
        proc = systemd.systemctl("start", service)
        assert proc.returncode == 0, proc.stderr + open(systemd.log).read()
        assert systemd.show(service, "Result") == "success"
        wait_clean()
        assert lab.sha256(copy) == lab.sha256(base)
        assert 'nbdsnap_pull_last_result{' in open(metrics).read()
        # Hourly, unless a drop-in says otherwise.
        assert "OnCalendar=hourly" in open(
            "/lib/systemd/system/nbd-pull@.timer").read()
        assert systemd.show(timer, "TimersCalendar").startswith(
            "{ OnCalendar=*-*-* *:00:00 ;")
        lab.guest_write(dom, "vda", 0x3c, 5 * MiB, 4096)
        started = systemd.show(service, "ExecMainStartTimestampMonotonic")
        systemd.add(os.path.join(systemd.units, timer + ".d",
                                 "override.conf"),
                    "[Timer]\nOnCalendar=\nOnCalendar=*:*:0/2\n"
                    "RandomizedDelaySec=0\n")
        systemd.systemctl("start", timer, check=True)
        lab.wait_until(lambda: systemd.show(
            service, "ExecMainStartTimestampMonotonic") != started
            and systemd.show(service, "ActiveState") == "inactive", 120,
            what="the timer to pull again")
        systemd.systemctl("stop", timer, check=True)
        assert systemd.show(service, "Result") == "success"
        wait_clean()
        assert lab.read_range(copy, 5 * MiB, 4096) == b"\x3c" * 4096
        assert lab.sha256(copy) == lab.sha256(base)
        # The VM host gone: the unit fails, the copy stays as it was.
        pulled = lab.sha256(copy)
        server.stop()
        assert systemd.systemctl("start", service).returncode != 0
        assert systemd.show(service, "Result") == "exit-code"
        assert systemd.show(service, "ExecMainStatus") == "1"
        assert lab.sha256(copy) == pulled
        # A NAME without its .args (a typo): a failed unit, not a silent
        # skip every hour.
        other = "nbd-pull@nothing-%s.service" % dom.name()
        assert systemd.systemctl("start", other).returncode != 0
        assert systemd.show(other, "ExecMainStatus") == "2"
        assert systemd.systemctl("is-failed", other).stdout.strip() == \
            "failed"
    finally:
        systemd.close()
        os.unlink(args)


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
