"""nbdsnap export and lint against real libvirtd, QEMU and nbd-server.

The section export writes is served by nbd-server as it reads it (through
its includedir, with the authfile beside it): a 4-connection copy freezes
and commits, and a client the authfile does not list is refused.  lint
reads real files and asks the real libvirtd about the exportnames.
"""

import os
import signal
import stat
import subprocess

import pytest

import lab
from test_freeze import MiB, assert_clean, export_domain, serve
from test_group import group_domain, sessions


def nbdsnap(env, *args, check=None, **extra):
    vars_ = dict(env.vars, **extra)
    saved, env.vars = env.vars, vars_
    try:
        return env.hook("nbdsnap", *args, check=check)
    finally:
        env.vars = saved


def included_server(virt, env, confd):
    """nbd-server whose main file has only [generic] and an includedir."""
    server = lab.NbdServer(env.folder, {}, env.vars)

    def write_config():
        with open(server.conf, "w") as f:
            f.write("[generic]\n    listenaddr = 127.0.0.1\n    port = %d\n"
                    "    includedir = %s\n" % (server.port, confd))
    server.write_config = write_config
    server.start()
    virt.servers.append(server)
    return server


def test_exported_section_is_served_frozen_committed_and_guarded(virt, env):
    dom, base = export_domain(virt, env)
    frozen = lab.sha256(base)
    confd = env.path("conf.d")
    os.mkdir(confd)
    conf = os.path.join(confd, "vm.conf")
    nbdsnap(env, "export", dom.name(), "--allow", "127.0.0.1", "-o", conf,
            check=0)
    nbdsnap(env, "export", dom.name(), "--name", "denied", "--allow",
            "127.0.0.2", "-o", os.path.join(confd, "denied.conf"), check=0)
    name = dom.name() + "-vda"
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o644
    with open(conf) as f:
        text = f.read()
    prerun = os.path.join(os.path.realpath(lab.VENV_BIN), "nbd-prerun")
    assert "prerun = %s --domain %s --disk vda %%s" % (prerun, dom.name()) \
        in text
    assert "authfile = %s" % os.path.join(confd, name + ".allow") in text
    with open(os.path.join(confd, "denied.allow")) as f:
        assert f.read().splitlines()[1:] == ["127.0.0.2"]

    server = included_server(virt, env, confd)
    assert nbdsnap(env, "lint", server.conf, check=0).stdout == ""

    held = lab.HeldConnection(server.port, name)        # the freeze starts
    lab.guest_write(dom, "vda", 0x5a, MiB, MiB)
    copy = env.path("copy.raw")
    lab.nbdcopy(server.uri(name), copy, connections=4)
    assert lab.sha256(copy) == frozen
    assert lab.sha256(base) == frozen
    held.close()
    assert_clean(env, dom, base)
    assert env.sessions() == []
    assert lab.read_range(base, MiB, MiB) == b"\x5a" * MiB

    with pytest.raises(lab.RefusedError):
        lab.HeldConnection(server.port, "denied")       # from 127.0.0.1
    assert env.sessions() == [] and env.overlays() == []


def test_a_domains_disks_are_exported_to_freeze_together(virt, env):
    """Two disks: both sections' prerun name both (--group), lint finds
    nothing, and one connection freezes both; --separate: one each."""
    dom, bases = group_domain(virt, env)
    confd = env.path("conf.d")
    os.mkdir(confd)
    conf = os.path.join(confd, "vm.conf")
    nbdsnap(env, "export", dom.name(), "--allow", "127.0.0.1", "-o", conf,
            check=0)
    with open(conf) as f:
        text = f.read()
    prerun = os.path.join(os.path.realpath(lab.VENV_BIN), "nbd-prerun")
    for target in ("vda", "vdb"):
        assert "prerun = %s --domain %s --disk %s --group vda,vdb %%s" % (
            prerun, dom.name(), target) in text
    assert "# The disks vda, vdb are frozen together, at one instant" in text
    server = included_server(virt, env, confd)
    assert nbdsnap(env, "lint", server.conf, check=0).stdout == ""

    held = lab.HeldConnection(server.port, dom.name() + "-vdb")
    found = sessions(env)
    assert sorted(found) == ["vda", "vdb"]
    assert found["vda"]["group"] == found["vdb"]["group"]
    held.close()
    env.wait_clean()
    assert env.overlays() == []
    for target, base in bases.items():
        assert lab.disk_source(dom, target) == base

    nbdsnap(env, "export", dom.name(), "--separate", "--allow", "127.0.0.1",
            "-o", conf, check=0)
    with open(conf) as f:
        text = f.read()
    assert "--group" not in text and "together" not in text
    assert "prerun = %s --domain %s --disk vdb %%s" % (prerun, dom.name()) \
        in text
    assert nbdsnap(env, "lint", server.conf, check=0).stdout == ""


def test_printed_sections_never_serve_an_open_export(virt, env):
    """--allow without -o: printed sections would name an authfile nothing
    writes, and nbd-server lets every address in when it is missing."""
    dom, base = export_domain(virt, env, start=False)
    confd = env.path("conf.d")
    os.mkdir(confd)
    nbdsnap(env, "export", dom.name(), "--name", "closed", "--allow",
            "127.0.0.2", "-o", os.path.join(confd, "closed.conf"), check=0)
    printed = nbdsnap(env, "export", dom.name(), "--name", "printed",
                      "--allow", "127.0.0.2")
    with open(os.path.join(confd, "printed.conf"), "w") as f:
        f.write(printed.stdout)                 # pasted into conf.d
    server = included_server(virt, env, confd)
    for name in ("closed", "printed"):
        with pytest.raises(lab.RefusedError):
            lab.HeldConnection(server.port, name)       # from 127.0.0.1
    assert env.sessions() == []
    assert printed.returncode == 2 and printed.stdout == ""
    assert printed.stderr.count("\n") == 1 and "-o FILE" in printed.stderr


def test_export_refuses_and_keeps_foreign_files(virt, env):
    spaced = lab.make_image(env.path("a b.raw"), 8)
    dom = virt.define(env.name("spaced"),
                      [lab.disk_xml(spaced, "vda")], start=False)
    proc = nbdsnap(env, "export", dom.name(), check=1)
    assert "a b.raw" in proc.stderr and proc.stderr.count("\n") == 1
    nbdsnap(env, "export", "no-such-domain-nbdsnap", check=1)

    dom, base = export_domain(virt, env, start=False)
    mine = env.path("mine.conf")
    with open(mine, "w") as f:
        f.write("[generic]\n")
    proc = nbdsnap(env, "export", dom.name(), "-o", mine, check=1)
    assert "--force" in proc.stderr
    with open(mine) as f:
        assert f.read() == "[generic]\n"
    nbdsnap(env, "export", dom.name(), "-o", mine, "--force", check=0)
    nbdsnap(env, "export", dom.name(), "-o", mine, check=0)   # ours now
    # A usage error: exit 2, one line, nothing written.
    missing = env.path("no-such-folder", "dom.conf")
    proc = nbdsnap(env, "export", dom.name(), "--allow", "127.0.0.1", "-o",
                   missing, check=2)
    assert proc.stderr.count("\n") == 1 and missing in proc.stderr
    proc = nbdsnap(env, "export", dom.name(), "--disk", "vdz", check=1)
    assert "no disk vdz" in proc.stderr


def write_config(env, sections, generic="    listenaddr = 127.0.0.1\n"):
    path = env.path("lint.conf")
    with open(path, "w") as f:
        f.write("[generic]\n" + generic)
        for name, items in sections.items():
            f.write("[%s]\n" % name)
            f.writelines("    %s = %s\n" % kv for kv in items.items())
    return path


def hooks(prerun_args=""):
    return {"prerun": "%s %s%%s" % (os.path.join(lab.VENV_BIN, "nbd-prerun"),
                                    prerun_args),
            "postrun": os.path.join(lab.VENV_BIN, "nbd-postrun") + " %s"}


def findings(env, path, **extra):
    proc = nbdsnap(env, "lint", path, **extra)
    lines = proc.stdout.splitlines()
    assert proc.returncode == (1 if lines else 0), proc.stderr
    return lines


def test_lint_asks_libvirt_about_every_exportname(virt, env):
    dom, base = export_domain(virt, env)
    template = lab.make_image(env.path("template.raw"), 8)
    top = lab.make_image(env.path("top.qcow2"), 8, fmt="qcow2",
                         backing=template)
    virt.define(env.name("foreign"),
                [lab.disk_xml(top, "vda", fmt="qcow2")])
    allow = env.path("allow")
    with open(allow, "w") as f:
        f.write("127.0.0.1\n")
    other = lab.make_image(env.path("other.raw"), 1)
    ok = dict(exportname=base, readonly="true", authfile=allow, **hooks())
    path = write_config(env, {
        "ok": ok,
        "named": dict(ok, **hooks("--domain %s --disk vda " % dom.name())),
        "wrong": dict(ok, **hooks("--domain %s --disk vdb " % dom.name())),
        "nodisk": dict(ok, exportname=other),
        "nohooks": dict(exportname=base, readonly="true", authfile=allow),
        "foreign": dict(ok, exportname=template),
        "missing": dict(ok, exportname=env.path("missing.raw")),
    })
    lines = findings(env, path)
    by = {}
    for line in lines:
        section, _, text = line.partition(": ")
        by.setdefault(section, []).append(text)
    assert set(by) == {"wrong", "nodisk", "nohooks", "foreign", "missing"}, \
        lines
    assert "has no disk vdb" in by["wrong"][0]
    assert "no disk of any libvirt domain" in by["nodisk"][0]
    assert "has no nbdsnap hooks" in by["nohooks"][0]
    assert "nbdsnap did not make" in by["foreign"][0]
    assert "does not exist" in by["missing"][0]

    # libvirt out of reach: the file checks still run, the domain ones not.
    lines = findings(env, path, LIBVIRT_DEFAULT_URI="qemu+unix:///system?"
                     "socket=/nonexistent/libvirt-sock")
    assert [l for l in lines if l.startswith("host:")] and \
        "domain checks were skipped" in lines[-1]
    assert not [l for l in lines if l.startswith(("nodisk", "foreign"))]


def test_lint_names_a_stale_overlay(virt, env):
    dom, base = export_domain(virt, env)
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    path = write_config(env, {"vm": dict(exportname=base, readonly="true",
                                         authfile="/dev/null", **hooks())})
    (live,) = [l for l in findings(env, path) if "overlay" in l]
    assert "right now: a client is copying it" in live
    server.stop(signal.SIGTERM)            # no postrun: the session is stale
    held.drop()
    lines = findings(env, path)
    (stale,) = [l for l in lines if "overlay" in l]
    assert "stale session" in stale and "nbdsnap recover %s" % base in stale
    nbdsnap(env, "recover", "--all", check=0)
    assert [l for l in findings(env, path) if "overlay" in l] == []
    assert_clean(env, dom, base)


def test_export_serves_the_manifest_when_digests_are_on(virt, env):
    env.configure(digest="on", manifest_dir=env.path("manifests"))
    dom, base = export_domain(virt, env)
    confd = env.path("conf.d")
    os.mkdir(confd)
    nbdsnap(env, "export", dom.name(), "--allow", "127.0.0.1", "-o",
            os.path.join(confd, "vm.conf"), check=0)
    name = dom.name() + "-vda"
    server = included_server(virt, env, confd)
    held = lab.HeldConnection(server.port, name)        # the freeze starts
    copy = env.path("copy.raw")
    lab.nbdcopy(server.uri(name), copy)
    # The cron recipe: check the copy against the session's own manifest,
    # over NBD, waiting (bounded) for the digest to complete.
    proc = subprocess.run(
        [os.path.join(lab.VENV_BIN, "nbd-verify"), "check", "--wait", "60",
         server.uri(name + ".manifest"), copy],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    held.close()
    assert_clean(env, dom, base)


def test_qcow2_and_linked_clone_exports_say_what_the_copy_is(virt, env):
    """nbd-server serves the file: a qcow2 disk is copied as the qcow2
    file, a linked clone as one that names a backing file."""
    plain = lab.make_image(env.path("plain.qcow2"), 8, fmt="qcow2")
    template = lab.make_image(env.path("template.raw"), 8, fill=0x55)
    top = lab.make_image(env.path("top.qcow2"), 8, fmt="qcow2",
                         backing=template)
    qdom = virt.define(env.name("q"), [lab.disk_xml(plain, "vda",
                                                    fmt="qcow2")],
                       start=False)
    clone = virt.define(env.name("clone"), [lab.disk_xml(top, "vda",
                                                         fmt="qcow2")])
    confd = env.path("conf.d")
    os.mkdir(confd)
    shown = {}
    for dom in (qdom, clone):
        proc = nbdsnap(env, "export", dom.name(), "--allow", "127.0.0.1",
                       "-o", os.path.join(confd, dom.name() + ".conf"),
                       check=0)
        (warning,) = [line for line in proc.stderr.splitlines()
                      if "no --tls" not in line]
        with open(os.path.join(confd, dom.name() + ".conf")) as f:
            above = f.read().split("[%s-vda]" % dom.name())[0]
        shown[dom] = (warning, " ".join(above.replace("#", "").split()))
    warning, comment = shown[qdom]
    said = "the qcow2 file itself, not the disk the guest sees"
    assert "clients copy " + said in warning
    assert "Clients copy " + said in comment
    warning, comment = shown[clone]
    said = "the qcow2 file itself, which names backing file " + template
    assert "clients copy " + said in warning
    assert "Clients copy " + said in comment

    server = included_server(virt, env, confd)
    lines = nbdsnap(env, "lint", server.conf, check=1).stdout.splitlines()
    assert lines == ["%s-vda: %s:vda: clients copy the qcow2 file itself, "
                     "which names backing file %s: the copy holds only what "
                     "differs from it and is of no use where that file is "
                     "missing" % (clone.name(), clone.name(), template)]

    proc = env.hook("nbd-prerun", top, check=0)
    (line,) = [l for l in proc.stderr.splitlines() if "snapshot into" in l]
    assert "clients copy the qcow2 file itself, which names backing file " \
        "%s" % template in line
    env.hook("nbd-postrun", top, check=0)
    assert_clean(env, clone, top)
    proc = env.hook("nbd-prerun", plain, check=0)
    assert "clients copy the qcow2 file itself" in proc.stderr
    env.hook("nbd-postrun", plain, check=0)
    env.wait_clean()
