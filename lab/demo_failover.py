"""The end of make demo: the failover.  A standby that nbd-pull --define
made boots from the copy, and holds what the guest wrote.

    the small Debian guest (lab/guest.py) writes files named after their
    sha256 ─► a quiesced pull with --define ─► the copy fsck-clean, every
    file matching its name ─► the original destroyed, the standby started
    ─► its agent reads the newest files back, each matching its name

say and show are lab.demo's: the steps are numbered and printed as the
rest of the demo's.
"""

import hashlib
import json
import os
import subprocess
import time

import lab
from lab import guest as lab_guest
from lab.tls import Pki, uri as tls_uri

BIN = lab.VENV_BIN


def failover(virt, folder, name, say, show):
    """Steps 10 to 14: a standby from nbd-pull --define boots from the
    copy.  folder holds the guest's disk, its copy and its own nbd-server
    (whose config and pid file must not be the first one's)."""
    say(10, "The small Debian guest boots; it writes files named after "
        "their sha256, without pause")
    os.makedirs(folder)
    data = lab_guest.make_data_disk(os.path.join(folder, "guest-vda.raw"))
    guest = lab_guest.define_guest(virt, folder, name + "-guest", data)
    lab.wait_until(lambda: written(guest.dom) >= 20, 60,
                   what="the guest's writer to finish 20 files")
    show("domain %s: its agent answered %.1f s after the start; %d files "
         "written so far" % (guest.dom.name(), guest.boot_seconds,
                             written(guest.dom)))

    say(11, "nbd-pull --define: a quiesced pull, and a shut-off standby "
        "on the copy")
    state = os.path.join(folder, "state")
    config = lab.write_config(os.path.join(folder, "nbdsnap.conf"), state,
                              os.path.join(folder, "overlays"),
                              digest="on", quiesce="require")
    env = {"NBDSNAP_CONFIG": config, "LIBVIRT_DEFAULT_URI": lab.URI}
    manifest = os.path.join(state, "manifests",
                            "%s-vda.manifest" % guest.dom.name())
    pki = Pki(os.path.join(folder, "tls"))
    server = virt.nbd_server(folder, {
        "vm": (data, {"force_tls": "true"}),
        "vm.manifest": (manifest, {"prerun": "", "postrun": "",
                                   "force_tls": "true"})}, env,
        generic=pki.generic())
    copy = os.path.join(folder, "standby-vda.img")
    standby_name = name + "-standby"
    cmd = ["--define", standby_name, "--connect", lab.URI,
           tls_uri(server, "vm", pki.client()), copy]
    proc = subprocess.run([os.path.join(BIN, "nbd-pull"), "--json"] + cmd,
                          capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    show("$ nbd-pull %s\n%sexit status %d" % (" ".join(cmd), proc.stderr,
                                              proc.returncode))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["standby"]["status"] == 0, proc.stderr
    lab.wait_until(lambda: not os.listdir(os.path.join(state, "sessions")),
                   120, what="the commit")
    standby = virt.conn.lookupByName(standby_name)
    virt.domains.append(standby)
    source = lab.disk_source(standby, "vda", inactive=True)
    show("standby %s: active %s, autostart %s, vda = %s" % (
        standby_name, bool(standby.isActive()), bool(standby.autostart()),
        source))
    assert not standby.isActive() and not standby.autostart()
    assert source == copy

    say(12, "The copy: its file system is clean, every file matches its "
        "name")
    status, out = lab_guest.fsck(copy)
    summary = [line for line in out.splitlines() if " files (" in line]
    show("$ fsck.ext4 -n -f %s\n%s\nexit status %d" % (
        copy, "\n".join(summary), status))
    assert status == 0, out
    files = lab_guest.written_files(copy, os.path.join(folder, "dump"))
    good = [n for n, (expected, actual) in files.items() if expected == actual]
    show("files whose sha256 matches their name: %d of %d" % (len(good),
                                                              len(files)))
    assert len(files) >= 20 and len(good) == len(files)

    say(13, "The failover: the original stops, the standby boots from the "
        "copy")
    guest.dom.destroy()
    show("domain %s destroyed" % guest.dom.name())
    start = time.monotonic()
    virsh = subprocess.run(["virsh", "-c", lab.URI, "start", standby_name],
                           capture_output=True, text=True, timeout=60)
    show("$ virsh -c %s start %s\n%s%sexit status %d" % (
        lab.URI, standby_name, virsh.stdout.strip() + "\n", virsh.stderr,
        virsh.returncode))
    assert virsh.returncode == 0, virsh.stderr
    lab.wait_until(lambda: lab_guest.agent_answers(standby), 90, 0.2,
                   "the standby's agent to answer")
    show("the standby's agent answered %.1f s after virsh start"
         % (time.monotonic() - start))

    say(14, "The standby reads the 3 newest files back through its agent")
    # Its own writer starts again at 1 and removes files 300 behind it:
    # the highest-numbered are the copy's newest and stay.
    newest = sorted(files, key=lambda n: -int(n.split("-")[0]))[:3]
    for fname in newest:
        got = hashlib.sha256(lab_guest.agent_read_bytes(
            standby, "/data/files/" + fname)).hexdigest()
        show("/data/files/%s...: sha256 %s..., matches its name: %s" % (
            fname[:fname.index("-") + 13], got[:12],
            got == fname.split("-", 1)[1]))
        assert got == fname.split("-", 1)[1], fname


def written(dom):
    """How many files the guest's writer has finished."""
    return int(lab_guest.guest_control(dom, "written"))
