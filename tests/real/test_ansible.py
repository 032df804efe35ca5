"""The Ansible roles (contrib/ansible/site.yml) on this machine, as an
operator runs them: Debian's ansible-core, connection local, this host
both the VM host and the clone host, the packages built from this tree.
This host's PID 1 is not systemd: the roles enable the units and start
nothing, and the pull runs under a systemd of the test's own.

Check mode first (it changes nothing), then for real, then again: the
second run changes nothing (the PLAY RECAP says changed=0), nor does a
check after it.  Then what a user would look at: lint passes on the
configuration written, the clone's arguments, its timer enabled, its TLS
folder 0700 with its files 0600; and the pull the timer runs (the
installed units with the role's drop-in, under systemd) copies the disk
through nbd-server on that configuration, over TLS; a new export is
served once nbd-server restarts.  (No --define: the test's systemd has a
/run of its own, without libvirtd's socket.)  The packages are purged at
the end, whatever happened: other tests install them too.
"""

import contextlib
import os
import stat
import subprocess

import pytest

import lab
from lab import deb, playbook
from lab.systemd import Systemd

MiB = 1 << 20
SIZE = 16               # MiB
ARGS_DIR = "/etc/nbdsnap/pull"
WANTS = "/etc/systemd/system/timers.target.wants"
def enabled(unit):
    return subprocess.run(["systemctl", "is-enabled", unit],
                          capture_output=True, text=True).stdout.strip()


def disks(domain):
    """virsh domblklist: a new connection, whatever became of the lab's
    (another test may restart libvirtd)."""
    return subprocess.run(["virsh", "-c", lab.URI, "domblklist", domain],
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture
def site(host):
    """The test's folder, a running domain, and an inventory of this host
    in both groups; afterwards the pull's files, the timer, the packages
    and the domain are gone."""
    was_enabled = enabled("nbd-server.service")
    # machine(): no other package test meanwhile, no nbdsnap installed
    # before, both packages purged after.
    with deb.machine():
        folder = lab.workdir("ans-")
        name = "ans-" + os.path.basename(folder)[-6:]
        the_lab = lab.Lab()
        try:
            yield Site(folder, name, the_lab)
        finally:
            # nbd-server stopped leaves its clients' freeze: recover it
            # while the domain still runs, as an operator would.
            for server in the_lab.servers:
                server.stop()
            if deb.installed("nbdsnap"):
                subprocess.run(["/usr/bin/nbdsnap", "recover", "--all"],
                               capture_output=True, timeout=300)
            the_lab.close()
            lab.remove_domains(name)    # if libvirtd restarted meanwhile
            subprocess.run(["systemctl", "disable", "--quiet",
                            "nbd-pull@%s.timer" % name], capture_output=True)
            for path in (os.path.join(ARGS_DIR, name + ".args"),
                         "/etc/systemd/system/nbd-pull@%s.timer.d/"
                         "schedule.conf" % name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            with contextlib.suppress(FileNotFoundError):
                os.rmdir("/etc/systemd/system/nbd-pull@%s.timer.d" % name)
            deb.purge()             # before machine()'s: the timer first
            if enabled("nbd-server.service") != was_enabled:
                subprocess.run(["systemctl", "disable" if was_enabled !=
                                "enabled" else "enable", "--quiet",
                                "nbd-server.service"], capture_output=True)
            lab.cleanup_folder(folder)


class Site:
    def __init__(self, folder, name, the_lab):
        self.folder, self.name, self.lab = folder, name, the_lab
        self.base = lab.make_image(self.path("base.raw"), SIZE, fill=0x11)
        self.dom = the_lab.define(name, [lab.disk_xml(self.base, "vda")])
        self.port = lab.free_port()
        self.inventory = self.path("inventory.yml")
        with open(self.inventory, "w") as f:
            f.write("all:\n  hosts:\n    localhost:\n"
                    "      ansible_connection: local\n"
                    "      ansible_python_interpreter: /usr/bin/python3\n"
                    "  children:\n"
                    "    nbdsnap_vmhosts: {hosts: {localhost: }}\n"
                    "    nbdsnap_clones: {hosts: {localhost: }}\n")
        os.makedirs(self.path("metrics"))
        self.vars = {
            "nbdsnap_debs": deb.build(self.path("build")),
            "nbdsnap_deb_cache": self.path("debs"),
            "nbdsnap_config": {
                "state_dir": self.path("state"),
                "snapshot_dir": self.path("overlays"),
                "manifest_dir": self.path("manifests"),
                "quiesce": False},              # YAML's off
            "nbdsnap_nbd_server_config": self.path("nbd-server", "config"),
            "nbdsnap_nbd_server_confd": self.path("nbd-server", "conf.d"),
            "nbdsnap_nbd_server_pidfile": self.path("nbd-server.pid"),
            "nbdsnap_nbd_server_generic": {"listenaddr": "127.0.0.1",
                                           "port": self.port},
            "nbdsnap_tls_dir": self.path("tls"),
            "nbdsnap_tls_server_names": ["localhost", "127.0.0.1"],
            "nbdsnap_exports": [{"domain": name, "allow": ["127.0.0.1"]}],
            "nbdsnap_lint_accept": ["AppArmor is on"],
            "nbdsnap_clone_tls_dir": self.path("vmhosts"),
            "nbdsnap_pull_metrics_dir": self.path("metrics"),
            "nbdsnap_pulls": [{
                "name": name, "vmhost": "localhost", "address": "127.0.0.1",
                "port": self.port, "schedule": "*:0/15",
                "args": ["-c", "2"],
                "disks": [{"export": name + "-vda",
                           "copy": self.path("clones", name + "-vda.img")}],
            }],
        }

    def path(self, *names):
        return os.path.join(self.folder, *names)

    def play(self, check=False):
        run = playbook.run(self.folder, self.inventory, self.vars,
                           check=check)
        # --diff shows what changed: never a key.
        assert "PRIVATE KEY" not in run.output
        return run


def test_roles_install_configure_and_rerun_without_change(site):
    name = site.name
    args = os.path.join(ARGS_DIR, name + ".args")
    first = site.play(check=True)
    assert first.returncode == 0, first.output[-4000:]
    assert first.total("failed") == 0 and first.total("changed") > 0
    # Check mode changed nothing.
    assert deb.installed("nbdsnap") is None
    assert deb.installed("nbdsnap-client") is None
    assert not os.path.exists(args)
    assert not os.path.exists(site.path("nbd-server"))

    real = site.play()
    assert real.returncode == 0, real.output[-4000:]
    assert real.total("changed") > 0
    again = site.play()
    assert again.returncode == 0, again.output[-4000:]
    assert again.total("changed") == 0, again.changed_tasks()
    checked = site.play(check=True)
    assert checked.returncode == 0, checked.output[-4000:]
    assert checked.total("changed") == 0, checked.changed_tasks()

    # What the VM host's side wrote: nbd-server's configuration, linted.
    config = site.path("nbd-server", "config")
    text = open(config).read()
    assert "\tincludedir = %s" % site.path("nbd-server", "conf.d") in text
    assert "\tport = %d" % site.port in text
    assert "user" not in text and "group" not in text
    lint = subprocess.run(["/usr/bin/nbdsnap", "lint", config],
                          capture_output=True, text=True)
    assert (lint.returncode, lint.stdout) == (0, ""), lint.stdout
    section = open(site.path("nbd-server", "conf.d", name + ".conf")).read()
    assert "force_tls = true" in section
    assert "prerun = /usr/bin/nbd-prerun --domain %s --disk vda" % name \
        in section
    assert enabled("nbdsnap-recover.service") == "enabled"

    # The clone's side: its arguments, its timer, its TLS folder.
    tls = site.path("vmhosts", "localhost")
    copy = site.path("clones", name + "-vda.img")
    lines = [line for line in open(args).read().splitlines()
             if line and not line.startswith("#")]
    assert lines == [
        "-c", "2",
        "--metrics", site.path("metrics", "nbd-pull-%s.prom" % name),
        "nbds://127.0.0.1:%d/%s-vda?tls-certificates=%s"
        % (site.port, name, tls), copy]
    link = os.path.join(WANTS, "nbd-pull@%s.timer" % name)
    assert os.readlink(link) == "/lib/systemd/system/nbd-pull@.timer"
    schedule = "/etc/systemd/system/nbd-pull@%s.timer.d/schedule.conf" % name
    assert "OnCalendar=\nOnCalendar=*:0/15\n" in open(schedule).read()
    assert stat.S_IMODE(os.stat(tls).st_mode) == 0o700
    made = site.path("tls", "clients", "localhost")
    for pem in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        st = os.stat(os.path.join(tls, pem))
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
        assert open(os.path.join(tls, pem)).read() == \
            open(os.path.join(made, pem)).read()

    # nbd-server on that configuration, as the role left it.
    server = lab.NbdServer(site.folder, {}, {"LIBVIRT_DEFAULT_URI": lab.URI})
    server.conf, server.port = config, site.port
    server.pidfile = site.path("nbd-server.pid")
    server.write_config = lambda: None
    server.start()
    site.lab.servers.append(server)
    # The timer's pull as systemd runs it (PID 1 of a namespace of the
    # test's own): the installed units, the role's drop-in and args; the
    # copy is the disk.
    service, timer = ("nbd-pull@%s.%s" % (name, kind)
                      for kind in ("service", "timer"))
    systemd = Systemd(site.path("systemd"))
    try:
        for unit in ("nbd-pull@.service", "nbd-pull@.timer"):
            systemd.add("/lib/systemd/system/" + unit)
        systemd.add(schedule)
        assert systemd.show(timer, "TimersCalendar").startswith(
            "{ OnCalendar=*-*-* *:00/15:00 ;")
        pull = systemd.systemctl("start", service)
        assert pull.returncode == 0, systemd.systemctl(
            "status", "--lines=20", service).stdout
        assert systemd.show(service, "Result") == "success"
    finally:
        systemd.close()
    assert lab.sha256(copy) == lab.sha256(site.base)
    metrics = open(site.path("metrics", "nbd-pull-%s.prom" % name)).read()
    assert "nbdsnap_pull_last_complete_timestamp_seconds{" in metrics
    lab.wait_until(lambda: not os.listdir(site.path("state", "sessions")),
                   60, what="the freeze to end")
    assert site.base in disks(name)         # committed, back on its base

    # A new export while nbd-server runs: nbd-server reads it only when
    # it starts again (SIGHUP breaks nbd-server 3.24), which the role does
    # where systemd runs and says here; the restarted server serves it.
    other = lab.make_image(site.path("other.raw"), SIZE, fill=0x22)
    site.lab.define(name + "b", [lab.disk_xml(other, "vda")])
    site.vars["nbdsnap_exports"].append({"domain": name + "b",
                                         "allow": ["127.0.0.1"]})
    added = site.play()
    assert added.returncode == 0, added.output[-4000:]
    assert added.total("changed") == 1, added.changed_tasks()
    assert "nbd-server runs on an older configuration than %s" % site.path(
        "nbd-server", "conf.d", name + "b.conf") in added.output
    assert "systemd does not run this host" in added.output
    server.stop()
    server.start()
    compare = subprocess.run(
        ["/usr/bin/nbd-verify", "compare", "nbds://127.0.0.1:%d/%sb-vda?"
         "tls-certificates=%s" % (site.port, name, tls), other],
        capture_output=True, text=True, timeout=120)
    assert compare.returncode == 0, compare.stdout + compare.stderr + open(
        site.path("nbd-server.log"), errors="replace").read()[-3000:]
    lab.wait_until(lambda: not os.listdir(site.path("state", "sessions")),
                   60, what="the freeze to end")
