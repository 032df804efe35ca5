"""nbd-pull --define: a standby that boots, on the real small guest.

The guest (lab/guest.py) writes files named after their checksum to its
disk without pause.  A pull with --define makes a shut-off standby of it
on this libvirtd, its disk on the copy; after the original is stopped
(the failover), the standby boots, its agent answers, and the files it
reads back through the agent are those the copy holds, each matching its
name; the copy's file system is clean (the freeze was quiesced).
"""

import hashlib
import json
import os
import subprocess
import xml.etree.ElementTree as ET

import libvirt

import lab
from lab import guest as lab_guest
from test_quiesce import assert_files_intact, guest  # noqa: F401 (fixture)

from nbdsnap.pull import standby_xml


def pull(env, server, copy, name, check=0):
    proc = subprocess.run(
        [os.path.join(lab.VENV_BIN, "nbd-pull"), "--json", "--define", name,
         "--connect", lab.URI, "--syslog-socket", env.path("syslog"),
         server.uri("vm"), copy],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == check, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_the_standby_boots_and_holds_what_the_guest_wrote(virt, env, guest):
    env.configure(digest="on", manifest_dir=env.path("manifests"),
                  quiesce="require")
    manifest = os.path.join(env.path("manifests"),
                            "%s-vda.manifest" % guest.dom.name())
    server = virt.nbd_server(env.folder, {
        "vm": (guest.data, None),
        "vm.manifest": (manifest, {"prerun": "", "postrun": ""})},
        env.vars)
    copy = env.path("standby-vda.img")
    name = env.name("standby")
    try:
        report, err = pull(env, server, copy, name)
        assert report["standby"]["status"] == 0, err
        assert "failover is" in err
        env.wait_clean()
        status, out = lab_guest.fsck(copy)
        assert status == 0, out
        files = assert_files_intact(copy, env.path("dump"))

        standby = virt.conn.lookupByName(name)
        assert not standby.isActive() and not standby.autostart()
        root = ET.fromstring(standby.XMLDesc(0))
        assert root.find("devices/disk/source").get("file") == copy
        assert root.findtext("uuid") != guest.dom.UUIDString()
        assert standby_xml.mark_of(standby.XMLDesc(0))["origin-name"] == \
            guest.dom.name()

        # A second pull updates it in place (same UUID) while shut off.
        uuid = standby.UUIDString()
        pull(env, server, copy, name)
        env.wait_clean()
        assert virt.conn.lookupByName(name).UUIDString() == uuid
        files = assert_files_intact(copy, env.path("dump2"))

        # The failover: the original stops, the standby starts.
        guest.dom.destroy()
        standby = virt.conn.lookupByName(name)
        standby.create()
        lab.wait_until(lambda: lab_guest.agent_answers(standby), 90, 0.2,
                       "the standby's agent to answer")
        # The standby's own writer starts again at 1 and removes files
        # 300 behind it: read the highest-numbered ones first.
        names = sorted(files, key=lambda n: -int(n.split("-")[0]))[:8]
        for fname in names:
            data = lab_guest.agent_read_bytes(standby,
                                              "/data/files/" + fname)
            assert hashlib.sha256(data).hexdigest() == fname.split("-", 1)[1]

        # Running, neither its copy nor itself is updated: exit 1 (try
        # later), a line for each.
        report, err = pull(env, server, copy, name, check=1)
        assert "is in use" in err and "not updated" in err
        assert report["pulls"][0]["status"] == 1
        assert report["standby"]["status"] == 1
    finally:
        lab.remove_domains(name)


def test_a_domain_it_did_not_make_is_never_touched(virt, env):
    env.configure(digest="on", manifest_dir=env.path("manifests"))
    base = lab.make_image(env.path("base.raw"), 16, fill=0x11)
    dom = virt.define(env.name("orig"), [lab.disk_xml(base, "vda")])
    other = virt.define(env.name("other"),
                        [lab.disk_xml(lab.make_image(env.path("o.raw"), 1),
                                      "vda")], start=False)
    before = other.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    manifest = os.path.join(env.path("manifests"),
                            "%s-vda.manifest" % dom.name())
    server = virt.nbd_server(env.folder, {
        "vm": (base, None),
        "vm.manifest": (manifest, {"prerun": "", "postrun": ""})},
        env.vars)
    report, err = pull(env, server, env.path("c.img"), other.name(),
                       check=2)
    assert "nbd-pull did not make it: not touched" in err
    assert report["pulls"][0]["status"] == 0       # the copy itself is done
    assert other.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == before
    env.wait_clean()
