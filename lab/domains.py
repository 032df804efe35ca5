"""Domains: their XML, the Lab that owns a test's domains and servers,
and guest I/O through QEMU's active layer (qemu-io over HMP)."""

import contextlib
import os
import textwrap
import uuid as uuid_mod

import libvirt
import libvirt_qemu

from .host import URI, _libvirt_answers, ensure_host, wait_until
from .nbd import NbdServer


# -- domains -----------------------------------------------------------------

def disk_xml(path, target, kind="file", fmt="raw", device="disk",
             shareable=False):
    attr = "dev" if kind == "block" else "file"
    source = "<source %s='%s'/>" % (attr, path) if path else ""
    bus = "virtio" if device == "disk" else "sata"
    extra = "<shareable/>" if shareable else ""
    if device == "cdrom":
        extra += "<readonly/>"
    return ("<disk type='%s' device='%s'><driver name='qemu' type='%s'/>%s"
            "<target dev='%s' bus='%s'/>%s</disk>"
            % (kind, device, fmt, source, target, bus, extra))


def domain_xml(name, disks):
    return textwrap.dedent("""\
        <domain type='qemu'>
          <name>%s</name>
          <uuid>%s</uuid>
          <memory unit='MiB'>64</memory>
          <vcpu>1</vcpu>
          <os><type arch='x86_64' machine='pc'>hvm</type></os>
          <on_poweroff>destroy</on_poweroff>
          <devices>
            %s
            <controller type='sata' index='0'/>
          </devices>
        </domain>
        """) % (name, uuid_mod.uuid4(), "\n    ".join(disks))


class Lab:
    """Domains and servers made by one test, all removed by close()."""

    def __init__(self):
        ensure_host()
        self.conn = libvirt.open(URI)
        self.domains = []
        self.servers = []

    def define(self, name, disks, start=True):
        dom = self.conn.defineXML(domain_xml(name, disks))
        self.domains.append(dom)
        if start:
            dom.create()
        return dom

    def stop(self):
        """Stop the servers and the domains, keeping the definitions: what
        must happen before the disks under them (a loop device) go."""
        for server in self.servers:
            server.stop()
        for dom in self.domains:
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()

    def close(self):
        self.stop()
        for dom in self.domains:
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
        self.conn.close()

    def nbd_server(self, folder, exports, env, **settings):
        """An NbdServer started (settings: its generic=, wrap=...),
        stopped with the Lab."""
        server = NbdServer(folder, exports, env, **settings)
        server.start()
        self.servers.append(server)
        return server


def live_device(dom, kind, attr, value):
    """The <kind> device of dom's live XML whose <target attr=value>."""
    from lxml import etree
    root = etree.fromstring(dom.XMLDesc(0).encode())
    for d in root.findall("devices/" + kind):
        if d.find("target").get(attr) == value:
            return d
    raise KeyError(value)


def disk_alias(dom, target):
    return live_device(dom, "disk", "dev", target).find("alias").get("name")


def disk_source(dom, target, inactive=False):
    from lxml import etree
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    root = etree.fromstring(dom.XMLDesc(flags).encode())
    for d in root.findall("devices/disk"):
        if d.find("target").get("dev") == target:
            src = d.find("source")
            return src.get("file") or src.get("dev")
    raise KeyError(target)


def hmp(dom, command):
    """Send an HMP command to the domain's QEMU; its reply.  A qemu-io
    write returns once written (what it prints goes to the log)."""
    return libvirt_qemu.qemuMonitorCommand(
        dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)


def _qemu_io(dom, target, command):
    """Run qemu-io in the domain's QEMU; return what it printed.

    HMP's qemu-io prints to QEMU's stdout, which libvirt sends to the
    domain's log, not into the monitor's reply: read it from the log.
    """
    log = "/var/log/libvirt/qemu/%s.log" % dom.name()
    start = os.path.getsize(log) if os.path.exists(log) else 0
    command_line = ('qemu-io -d /machine/peripheral/%s/virtio-backend "%s"'
                    % (disk_alias(dom, target), command))
    reply = hmp(dom, command_line)
    # virtlogd writes the log a moment later: wait for qemu-io's last line.
    done = ("wrote ", "read ", "Pattern verification failed", "failed")

    def printed():
        with open(log, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        return text if any(d in text for d in done) else None
    try:
        return reply + wait_until(printed, 30, 0.01, "qemu-io's output")
    except TimeoutError:
        return reply


def guest_write(dom, target, pattern, offset, length):
    """Write as if the guest did, through the disk's active layer."""
    out = _qemu_io(dom, target, "write -P 0x%02x %d %d"
                   % (pattern, offset, length))
    if "wrote " not in out or "failed" in out.lower():
        raise RuntimeError("qemu-io write failed: %s" % out)


def guest_reads(dom, target, pattern, offset, length):
    """True if the guest reads pattern over the range."""
    out = _qemu_io(dom, target, "read -P 0x%02x %d %d"
                   % (pattern, offset, length))
    if "Pattern verification failed" in out:
        return False
    if "read " not in out:
        raise RuntimeError("qemu-io read failed: %s" % out)
    return True


def remove_domains(prefix):
    """Destroy and undefine every domain whose name starts with prefix,
    through a new connection: cleanup that survives a libvirtd restart, which
    leaves a Lab's own connection dead.  Returns the names removed."""
    wait_until(_libvirt_answers, 60, 0.2, "libvirtd to answer")
    conn = libvirt.open(URI)
    removed = []
    try:
        for dom in conn.listAllDomains(0):
            with contextlib.suppress(libvirt.libvirtError):
                if not dom.name().startswith(prefix):
                    continue
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
                removed.append(dom.name())
    finally:
        conn.close()
    return removed
