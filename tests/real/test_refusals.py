"""Refusals: when a disk cannot be frozen safely, the client is turned away.

Each refusal is checked as an operator would see it: the NBD client is
refused by nbd-server, the hook run by hand exits 1 (2 for a configuration
error) with one clear ``nbd-prerun: ...`` line, no session and no overlay is
left behind, and the domain's definition is what it was.  Then what reaches
syslog, and a domain destroyed while frozen.
"""

import json
import os
import re
import subprocess

import libvirt
import pytest

import lab
from test_freeze import serve

MiB = 1 << 20
SIZE = 16   # MiB per test disk


def definitions(doms):
    """What must not change: every domain's live and persistent XML."""
    return [(d.XMLDesc(0), d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            for d in doms]


def one_line(proc, prog="nbd-prerun", before=()):
    """The hook's refusal: its last stderr line, without the prog prefix.

    Every line is the hook's own (no traceback, no stray libvirt text), and
    only the lines matching a pattern of before (what it tried, logged
    before the call that failed) may precede the refusal.
    """
    lines = proc.stderr.splitlines()
    assert lines and proc.stderr.endswith("\n"), proc.stderr
    assert all(l.startswith(prog + ": ") for l in lines), proc.stderr
    assert len(lines) == 1 + len(before), proc.stderr
    for line, pattern in zip(lines, before):
        assert re.search(pattern, line), proc.stderr
    return lines[-1][len(prog) + 2:]


def assert_refused(virt, env, export, doms, *words, status=1, before=()):
    """nbd-server refuses the client, the hook by hand says why in one line,
    and nothing is left: no session, no overlay, definitions unchanged."""
    defs = definitions(doms)
    server = serve(virt, env, {"vm": export})
    with pytest.raises(lab.RefusedError):
        lab.HeldConnection(server.port, "vm").close()
    assert env.sessions() == [] and env.overlays() == []
    proc = env.hook("nbd-prerun", export, check=status)
    line = one_line(proc, before=before)
    for word in words:
        assert word in line, line
    assert env.sessions() == [] and env.overlays() == []
    assert definitions(doms) == defs
    return line


def a_domain(virt, env, prefix, disks=(), start=True):
    base = lab.make_image(env.path(prefix + "-base.raw"), SIZE, fill=0x11)
    dom = virt.define(env.name(prefix), [lab.disk_xml(base, "vda")]
                      + list(disks), start=start)
    return dom, base


# -- what cannot be frozen ------------------------------------------------------

def test_export_that_is_no_domains_disk(virt, env):
    dom, _ = a_domain(virt, env, "none")
    lonely = lab.make_image(env.path("lonely.raw"), SIZE, fill=0x22)
    assert_refused(virt, env, lonely, [dom], lonely,
                   "is no disk of any libvirt domain")


def test_cdrom(virt, env):
    iso = lab.make_image(env.path("disc.iso"), 4, fill=0x44)
    dom, _ = a_domain(virt, env, "cd", [lab.disk_xml(iso, "sda",
                                                     device="cdrom")])
    assert_refused(virt, env, iso, [dom], iso, "cdrom", "sda",
                   "only disks can be frozen")


def test_shareable_disk_of_two_domains(virt, env):
    shared = lab.make_image(env.path("shared.raw"), SIZE, fill=0x55)
    disk = lab.disk_xml(shared, "vdb", shareable=True)
    doms = [a_domain(virt, env, p, [disk])[0] for p in ("sha", "shb")]
    line = assert_refused(virt, env, shared, doms, shared,
                          "more than one domain")
    assert all(d.name() in line for d in doms)


def test_base_below_a_foreign_overlay(virt, env):
    dom, base = a_domain(virt, env, "foreign")
    foreign = env.path("someone-elses.qcow2")
    subprocess.run(["virsh", "-c", lab.URI, "snapshot-create-as", dom.name(),
                    "--disk-only", "--no-metadata", "--atomic",
                    "--diskspec", "vda,file=%s" % foreign],
                   check=True, capture_output=True, timeout=60)
    assert lab.disk_source(dom, "vda") == foreign
    assert_refused(virt, env, base, [dom], base, foreign,
                   "nbdsnap did not make")
    assert lab.disk_source(dom, "vda") == foreign


# What the hook logs before it calls libvirt: an attempt, not a refusal.
SNAPSHOT_INTO = (r": snapshot into \S+ \(quiesce \w+\); clients copy the raw "
                 r"disk$")


@pytest.fixture
def read_only_overlays(env):
    """snapshot_dir root's, mode 0711 (so nbdsnap accepts it) but on a
    read-only bind mount: neither libvirt nor QEMU can create a file there."""
    os.mkdir(env.snapshot_dir, 0o711)
    subprocess.run(["mount", "--bind", env.snapshot_dir, env.snapshot_dir],
                   check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", env.snapshot_dir],
                       check=True)
        yield env.snapshot_dir
    finally:
        subprocess.run(["umount", env.snapshot_dir], check=True)


def test_snapshot_that_libvirt_refuses(virt, env, read_only_overlays):
    dom, base = a_domain(virt, env, "rofs")
    line = assert_refused(virt, env, base, [dom], "snapshot of domain",
                          "refused", read_only_overlays,
                          before=[SNAPSHOT_INTO])
    assert "read-only" in line.lower(), line
    assert lab.disk_source(dom, "vda") == base


def test_libvirt_unreachable(virt, env):
    dom, base = a_domain(virt, env, "nolv")
    env.vars["LIBVIRT_DEFAULT_URI"] = "qemu:///system?socket=/nonexistent"
    assert_refused(virt, env, base, [dom], "cannot connect to libvirt",
                   "/nonexistent")


def test_missing_configuration(virt, env):
    dom, base = a_domain(virt, env, "nocf")
    missing = env.path("missing.conf")
    env.vars["NBDSNAP_CONFIG"] = missing
    assert_refused(virt, env, base, [dom], missing, "does not exist",
                   status=2)
    assert not os.path.exists(env.state_dir)


def test_quiesce_required_without_a_guest_agent(virt, env):
    env.configure(quiesce="require")
    dom, base = a_domain(virt, env, "qreq")
    assert_refused(virt, env, base, [dom], "quiesce = require", "agent",
                   before=[SNAPSHOT_INTO])
    assert lab.disk_source(dom, "vda") == base
    assert lab.disk_source(dom, "vda", inactive=True) == base


# -- syslog --------------------------------------------------------------------

DAEMON = 3


def priority(severity):
    return "<%d>" % (DAEMON * 8 + severity)


def records(syslog, prog, severity, *words):
    """The syslog records of prog at severity that hold every word."""
    pattern = re.compile(r"^%s%s\[(\d+)\]: " % (re.escape(priority(severity)),
                                                 re.escape(prog)))
    return [r for r in list(syslog)
            if pattern.match(r) and all(w in r for w in words)]


def test_refusal_and_commit_reach_syslog(virt, env, syslog):
    ERR, INFO = 3, 6
    dom, base = a_domain(virt, env, "slog")
    lonely = lab.make_image(env.path("lonely.raw"), SIZE, fill=0x22)

    proc = subprocess.Popen(
        [os.path.join(lab.VENV_BIN, "nbd-prerun"), lonely],
        env=dict(os.environ, **env.vars), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    refusal = lab.wait_until(
        lambda: records(syslog, "nbd-prerun", ERR, lonely, "no disk of any"),
        10, what="the refusal in syslog")
    assert refusal[0].startswith("%snbd-prerun[%d]: " % (priority(ERR),
                                                         proc.pid))

    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    held.close()
    env.wait_clean()
    assert lab.read_range(base, 0, MiB) == b"\x5a" * MiB
    frozen = records(syslog, "nbd-prerun", INFO, base, "frozen")
    committed = records(syslog, "nbd-postrun", INFO, base,
                        "back on its base")
    assert len(frozen) == 1 and len(committed) == 1, list(syslog)
    pids = {int(re.search(r"\[(\d+)\]", r).group(1))
            for r in frozen + committed}
    assert len(pids) == 2 and os.getpid() not in pids


def test_a_bad_hook_string_refuses_and_says_why_in_syslog(virt, env,
                                                           syslog):
    # nbd-server throws the hook's stderr away: syslog is the only trace.
    ERR = 3
    image = lab.make_image(env.path("image.raw"), SIZE, fill=0x22)
    prerun = os.path.join(lab.VENV_BIN, "nbd-prerun") + " --quiesce often %s"
    server = lab.NbdServer(env.folder, {"vm": (image, None)}, env.vars,
                           prerun=prerun)
    virt.servers.append(server)         # stopped with the test's lab
    server.start()
    with pytest.raises(lab.RefusedError):
        lab.HeldConnection(server.port, "vm").close()
    refusal = lab.wait_until(
        lambda: records(syslog, "nbd-prerun", ERR, "bad arguments (--quiesce "
                        "often %s): " % image, "invalid choice: 'often'"),
        10, what="the argument error in syslog")
    assert len(refusal) == 1, list(syslog)
    assert env.sessions() == [] and env.overlays() == []


def test_hooks_work_without_dev_log(virt, env):
    # No syslog daemon: the socket is missing (here on every host, where
    # /dev/log may well be bound).
    env.configure(syslog_socket=env.path("no-syslog-here"))
    dom, base = a_domain(virt, env, "nolog")
    frozen = env.hook("nbd-prerun", base, check=0)
    assert "nbd-prerun: " in frozen.stderr and "frozen" in frozen.stderr
    assert "Traceback" not in frozen.stderr
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    done = env.hook("nbd-postrun", base, check=0)
    assert "nbd-postrun: " in done.stderr
    assert "back on its base" in done.stderr
    assert "Traceback" not in done.stderr
    env.wait_clean()
    assert lab.read_range(base, 0, MiB) == b"\x5a" * MiB
    refused = env.hook("nbd-prerun", env.path("nothing-here"), check=1)
    assert one_line(refused).startswith("cannot open export")


# -- a domain stopped while frozen ----------------------------------------------

def status(env):
    return json.loads(env.hook("nbdsnap", "status", "--json",
                               check=0).stdout)["sessions"]


def frozen_and_written(virt, env, prefix):
    """A domain frozen by a held connection, with guest writes in its
    overlay: (dom, base, server, held, overlay, base's digest)."""
    dom, base = a_domain(virt, env, prefix)
    frozen = lab.sha256(base)
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    (entry,) = status(env)
    overlay = entry["overlay"]
    assert lab.disk_source(dom, "vda") == overlay
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)
    lab.guest_write(dom, "vda", 0x6b, 5 * MiB, MiB)
    return dom, base, server, held, overlay, frozen


def test_domain_destroyed_during_the_freeze_is_committed_offline(virt, env):
    dom, base, server, held, overlay, _ = frozen_and_written(virt, env,
                                                             "dstr")
    dom.destroy()
    held.close()

    env.wait_clean()
    assert env.overlays() == []
    assert lab.disk_source(dom, "vda", inactive=True) == base
    assert lab.read_range(base, 0, MiB) == b"\x5a" * MiB
    assert lab.read_range(base, 5 * MiB, MiB) == b"\x6b" * MiB
    assert lab.read_range(base, MiB, MiB) == b"\x11" * MiB
    dom.create()                           # it starts again, on its base
    assert lab.disk_source(dom, "vda") == base
    assert lab.guest_reads(dom, "vda", 0x5a, 0, MiB)
    copy = env.path("copy.raw")
    lab.nbdcopy(server.uri("vm"), copy)     # and the next client is served
    assert lab.sha256(copy) == lab.sha256(base)
    env.wait_clean()


def test_domain_undefined_during_the_freeze_is_committed_into_its_base(
        virt, env):
    # Destroyed and undefined while frozen: nothing has the base open any
    # more, and the overlay, the only copy of the guest's writes, goes into
    # it (nbd-postrun(8)); nothing is left to refuse the next client.
    dom, base, _, held, _, _ = frozen_and_written(virt, env, "undf")
    dom.destroy()
    dom.undefine()
    held.close()

    env.wait_clean()
    assert env.overlays() == []
    assert lab.read_range(base, 0, MiB) == b"\x5a" * MiB
    assert lab.read_range(base, 5 * MiB, MiB) == b"\x6b" * MiB
    assert lab.read_range(base, MiB, 4 * MiB) == b"\x11" * 4 * MiB
