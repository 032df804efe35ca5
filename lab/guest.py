"""A small Linux guest with a real qemu-guest-agent, for quiesced freezes:
its data disk, its domain and its control at run time.

    kernel, initrd = build()          # cached in /var/cache/nbdsnap-lab/guest
    guest = define_guest(the_lab, folder, name, data_image)
    guest_control(guest.dom, "stop-agent")

The build is lab/guest_build.py (from the Debian packages of
lab/guest_debs.py), the guest's own scripts lab/guest_init.py.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import textwrap
import time
import uuid as uuid_mod

import libvirt
import libvirt_qemu

from .domains import disk_xml, live_device
from .guest_build import (CACHE_DIR, KERNEL_META, MODULES,  # noqa: F401
                          PACKAGES, _run, build, manifest)
from .guest_init import AGENT_PORT, CONTROL_PORT, FSFREEZE_HOOK, INIT  # noqa
from .host import wait_until

CMDLINE = "console=ttyS0 quiet panic=-1"


# -- the data disk and what the guest wrote to it ------------------------------------

def make_data_disk(path, size_mib=64):
    """A raw file with an empty ext4 filesystem, as the guest's vda."""
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    _run(["mkfs.ext4", "-q", "-F", "-L", "data", "-E",
          "lazy_itable_init=0,lazy_journal_init=0", path])
    return path


def fsck(image, repair=False):
    """e2fsck -f, read-only (-n) or repairing (-y): (exit status, output).
    A repair replays the journal first."""
    proc = subprocess.run(["fsck.ext4", "-y" if repair else "-n", "-f", image],
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def written_files(image, dest):
    """Dump /files of the filesystem in image to dest (debugfs: read-only,
    no journal replay); return {name: (expected sha256, actual sha256)}."""
    os.makedirs(dest, exist_ok=True)
    _run(["debugfs", "-R", "rdump /files %s" % dest, image])
    folder = os.path.join(dest, "files")
    result = {}
    for name in sorted(os.listdir(folder)):
        expected = name.split("-", 1)[1] if "-" in name else None
        with open(os.path.join(folder, name), "rb") as f:
            result[name] = (expected, hashlib.sha256(f.read()).hexdigest())
    return result


# -- the domain ------------------------------------------------------------------------

@dataclasses.dataclass
class Guest:
    dom: object
    console: str            # the serial console, as a file on the host
    data: str               # the data disk, the guest's vda
    boot_seconds: float     # from defineXML to the first guest-ping answer

    def console_text(self):
        with open(self.console, "rb") as f:
            return f.read().decode(errors="replace")


def guest_xml(name, kernel, initrd, data_image, console):
    return textwrap.dedent("""\
        <domain type='qemu'>
          <name>%s</name>
          <uuid>%s</uuid>
          <memory unit='MiB'>256</memory>
          <vcpu>1</vcpu>
          <os>
            <type arch='x86_64' machine='pc'>hvm</type>
            <kernel>%s</kernel>
            <initrd>%s</initrd>
            <cmdline>%s</cmdline>
          </os>
          <on_poweroff>destroy</on_poweroff>
          <on_reboot>destroy</on_reboot>
          <on_crash>destroy</on_crash>
          <devices>
            %s
            <controller type='virtio-serial' index='0'/>
            <controller type='usb' model='none'/>
            <channel type='unix'><target type='virtio' name='%s'/></channel>
            <channel type='unix'><target type='virtio' name='%s'/></channel>
            <serial type='file'><source path='%s'/><target port='0'/></serial>
            <memballoon model='none'/>
          </devices>
        </domain>
        """) % (name, uuid_mod.uuid4(), kernel, initrd, CMDLINE,
                disk_xml(data_image, "vda"), AGENT_PORT, CONTROL_PORT, console)


def define_guest(the_lab, folder, name, data_image, boot_timeout=60):
    """Define and start the guest on data_image; return once its agent
    answers guest-ping."""
    kernel, initrd = build()
    console = os.path.join(folder, name + "-console.log")
    open(console, "w").close()
    started = time.monotonic()
    dom = the_lab.conn.defineXML(guest_xml(name, kernel, initrd, data_image,
                                           console))
    the_lab.domains.append(dom)
    dom.create()
    guest = Guest(dom, console, data_image, 0.0)
    try:
        wait_until(lambda: agent_answers(dom), boot_timeout, 0.2,
                   "the guest agent of %s to answer guest-ping" % name)
    except TimeoutError as e:
        raise TimeoutError("%s; console:\n%s" % (e, guest.console_text()))
    guest.boot_seconds = time.monotonic() - started
    return guest


def agent_command(dom, command, timeout=10, **arguments):
    """A guest agent command through libvirt; its "return" value."""
    msg = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(msg), timeout, 0)
    return json.loads(reply)["return"]


def agent_answers(dom):
    try:
        agent_command(dom, "guest-ping", timeout=2)
        return True
    except libvirt.libvirtError:
        return False


def agent_read_bytes(dom, path, timeout=10):
    """A file of the guest, read through the agent, as bytes."""
    import base64
    handle = agent_command(dom, "guest-file-open", timeout, path=path,
                           mode="r")
    data = b""
    try:
        while True:
            r = agent_command(dom, "guest-file-read", timeout, handle=handle,
                              count=65536)
            data += base64.b64decode(r["buf-b64"])
            if r["eof"]:
                return data
    finally:
        agent_command(dom, "guest-file-close", timeout, handle=handle)


def agent_read_file(dom, path, timeout=10):
    """A text file of the guest, read through the agent."""
    return agent_read_bytes(dom, path, timeout).decode(errors="replace")


def _channel_path(dom, port):
    return live_device(dom, "channel", "name", port).find("source").get(
        "path")


def guest_control(dom, command, timeout=10):
    """Send command to the guest's control loop, not through the agent;
    return its answer.  Commands: ping, stop-agent, cont-agent, kill-agent,
    start-agent, agent-pid, agent-state, written (files finished so far),
    thaw (fsfreeze --unfreeze /data), stop-agent-after-freeze SECONDS (the
    next freeze hook stops the agent SECONDS later, between freeze and
    thaw)."""
    word = command.split()[0]
    deadline = time.monotonic() + timeout
    with contextlib.closing(socket.socket(socket.AF_UNIX)) as s:
        s.settimeout(timeout)
        s.connect(_channel_path(dom, CONTROL_PORT))
        s.sendall(command.encode() + b"\n")
        buf = b""
        while time.monotonic() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
            # A reply the guest could not send to an earlier client that
            # had gone may come first: wait for ours.
            for line in buf.decode(errors="replace").splitlines():
                if line.startswith(word + ": ") and buf.endswith(b"\n"):
                    return line[len(word) + 2:]
    raise TimeoutError("the guest did not answer %r on its control port"
                       % command)
