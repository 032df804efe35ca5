"""The lab: real parts for the tests, the demo and the benchmarks.

Used by the real tests (tests/real), the demo (lab/demo.py) and the
benchmarks (lab/bench.py).  Everything runs as root on this machine: domains are
software-emulated (type='qemu') and need no operating system, nbd-server
listens on a loopback port of its own, clients are userspace (nbdcopy and
the tiny NBD client below).
"""

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid as uuid_mod

import libvirt
import libvirt_qemu

URI = "qemu:///system"
HOOKS_DIR = "/etc/libvirt/hooks/qemu.d"
KEEP_HOOK = os.path.join(HOOKS_DIR, "00-nbdsnap-lab")
# The hooks are the entry points installed beside the running interpreter.
VENV_BIN = os.path.dirname(sys.executable)


def wait_until(pred, timeout=30.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("timed out after %g s waiting for %s"
                               % (timeout, what))
        time.sleep(interval)


# -- the host ----------------------------------------------------------------

def _running(name):
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/%s/comm" % pid) as f:
                    if f.read().strip() == name:
                        return True
            except OSError:
                pass
    return False


def _libvirt_answers():
    try:
        libvirt.open(URI).close()
        return True
    except libvirt.libvirtError:
        return False


def ensure_host():
    """/dev/kvm with Debian's permissions, virtlogd and libvirtd running.

    With /dev/kvm root-only, libvirt re-probes QEMU on every define (about
    40 s here); with group kvm it takes a fraction of a second.
    """
    libvirt.registerErrorHandler(lambda *a: None, None)
    if os.path.exists("/dev/kvm"):
        st = os.stat("/dev/kvm")
        if st.st_mode & 0o060 != 0o060:
            subprocess.run(["chgrp", "kvm", "/dev/kvm"], check=True)
            os.chmod("/dev/kvm", 0o660)
    if not _running("virtlogd"):
        subprocess.run(["virtlogd", "-d"], check=True)
    # libvirtd looks for hook scripts when it starts, and runs the ones
    # added later only if its qemu.d folder held one then: keep a no-op
    # script there, so that the tests' libvirt hooks are run.
    if not os.path.exists(KEEP_HOOK):
        os.makedirs(HOOKS_DIR, exist_ok=True)
        with open(KEEP_HOOK, "w") as f:
            f.write("#!/bin/sh\n# nbdsnap's tests: keeps libvirtd running "
                    "the hooks in this folder.\ncat >/dev/null\n")
        os.chmod(KEEP_HOOK, 0o755)
        if _running("libvirtd"):
            subprocess.run(["pkill", "-x", "libvirtd"], check=False)
            wait_until(lambda: not _running("libvirtd"), 30,
                       what="libvirtd to stop")
    if not _libvirt_answers():
        if not _running("libvirtd"):
            subprocess.run(["libvirtd", "-d"], check=True)
        wait_until(_libvirt_answers, 60, 0.2, "libvirtd to answer")


def workdir(prefix="nbdsnap-lab-"):
    """A folder QEMU (user libvirt-qemu) can reach: 0711, not in /tmp."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")
    os.chmod(path, 0o711)
    return path


def write_config(path, state_dir, snapshot_dir, **settings):
    lines = ["[nbdsnap]", "state_dir = %s" % state_dir,
             "snapshot_dir = %s" % snapshot_dir]
    lines += ["%s = %s" % kv for kv in settings.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# -- images ------------------------------------------------------------------

def make_image(path, size_mib, fmt="raw", backing=None, backing_fmt="raw",
               fill=None):
    """A raw or qcow2 image; fill=byte writes that pattern over all of it."""
    cmd = ["qemu-img", "create", "-q", "-f", fmt]
    if backing:
        cmd += ["-b", backing, "-F", backing_fmt]
    cmd += [path]
    if not backing:
        cmd += ["%dM" % size_mib]
    subprocess.run(cmd, check=True)
    if fill is not None:
        with open(path, "r+b") as f:
            chunk = bytes([fill]) * (1 << 20)
            for _ in range(size_mib):
                f.write(chunk)
    return path


def read_range(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def sha256(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def loop_device(image):
    dev = subprocess.run(["losetup", "-f", "--show", image], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


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

    def nbd_server(self, folder, exports, env):
        server = NbdServer(folder, exports, env)
        server.start()
        self.servers.append(server)
        return server


def disk_alias(dom, target):
    from lxml import etree
    root = etree.fromstring(dom.XMLDesc(0).encode())
    for d in root.findall("devices/disk"):
        if d.find("target").get("dev") == target:
            return d.find("alias").get("name")
    raise KeyError(target)


def disk_source(dom, target, inactive=False):
    from lxml import etree
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    root = etree.fromstring(dom.XMLDesc(flags).encode())
    for d in root.findall("devices/disk"):
        if d.find("target").get("dev") == target:
            src = d.find("source")
            return src.get("file") or src.get("dev")
    raise KeyError(target)


def _qemu_io(dom, target, command):
    """Run qemu-io in the domain's QEMU; return what it printed.

    HMP's qemu-io prints to QEMU's stdout, which libvirt sends to the
    domain's log, not into the monitor's reply: read it from the log.
    """
    log = "/var/log/libvirt/qemu/%s.log" % dom.name()
    start = os.path.getsize(log) if os.path.exists(log) else 0
    hmp = 'qemu-io -d /machine/peripheral/%s/virtio-backend "%s"' % (
        disk_alias(dom, target), command)
    reply = libvirt_qemu.qemuMonitorCommand(
        dom, hmp, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
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


# -- nbd-server --------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NbdServer:
    """nbd-server with our hooks on a loopback port of its own.

    exports: {name: (path, extra settings dict)}.  Hooks are the venv's
    entry points, by absolute path, as an operator would write them.
    """

    def __init__(self, folder, exports, env, prerun=None, postrun=None):
        self.folder = folder
        self.exports = exports
        self.env = env
        self.port = free_port()
        self.conf = os.path.join(folder, "nbd-server.conf")
        self.pidfile = os.path.join(folder, "nbd-server.pid")
        self.prerun = prerun or os.path.join(VENV_BIN, "nbd-prerun") + " %s"
        self.postrun = postrun or os.path.join(VENV_BIN, "nbd-postrun") + " %s"
        self.pid = None

    def write_config(self):
        lines = ["[generic]", "    listenaddr = 127.0.0.1",
                 "    port = %d" % self.port]
        for name, (path, extra) in self.exports.items():
            lines += ["[%s]" % name, "    exportname = %s" % path,
                      "    readonly = true"]
            settings = {"prerun": self.prerun, "postrun": self.postrun}
            settings.update(extra or {})
            lines += ["    %s = %s" % kv for kv in settings.items() if kv[1]]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self):
        self.write_config()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pidfile)
        env = dict(os.environ, **self.env)
        log = open(os.path.join(self.folder, "nbd-server.log"), "ab")
        subprocess.run(["nbd-server", "-C", self.conf, "-p", self.pidfile],
                       env=env, check=True, stdout=log, stderr=log)
        wait_until(lambda: os.path.exists(self.pidfile)
                   and open(self.pidfile).read().strip(), 10,
                   what="nbd-server's pid file")
        self.pid = int(open(self.pidfile).read())
        wait_until(self._accepts, 10, what="nbd-server to listen")

    def _accepts(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), 1).close()
            return True
        except OSError:
            return False

    def uri(self, name):
        return "nbd://127.0.0.1:%d/%s" % (self.port, name)

    def children(self):
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.pid)],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self, sig=signal.SIGTERM):
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not os.path.exists("/proc/%d" % self.pid), 10)
        self.pid = None


def nbdcopy(uri, dest, connections=4, timeout=300):
    # nbdcopy caps its connections at its threads, which default to the
    # number of cores (2 here): ask for both to get real multi-connection.
    subprocess.run(["nbdcopy", "--connections=%d" % connections,
                    "--threads=%d" % connections, uri, dest],
                   check=True, timeout=timeout)


# -- a client that holds a connection ------------------------------------------

NBD_MAGIC = 0x4e42444d41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3e889045565a9
NBD_OPT_GO = 7
NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_CMD_READ = 0
NBD_CMD_DISC = 2


class RefusedError(Exception):
    pass


class HeldConnection:
    """One NBD connection, opened with NBD_OPT_GO and held until close().

    nbd-server runs prerun while it handles NBD_OPT_GO, so once open()
    returns, this connection's prerun has finished and succeeded.
    """

    def __init__(self, port, name, host="127.0.0.1"):
        self.sock = socket.create_connection((host, port), 30)
        self.size = None
        self._handshake(name.encode())

    def _recv(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise RefusedError("server closed the connection")
            buf += chunk
        return buf

    def _handshake(self, name):
        magic, opt, _flags = struct.unpack(">QQH", self._recv(18))
        assert magic == NBD_MAGIC and opt == IHAVEOPT
        self.sock.sendall(struct.pack(">I", 3))   # FIXED_NEWSTYLE|NO_ZEROES
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, NBD_OPT_GO, len(data))
                          + data)
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII",
                                                       self._recv(20))
            payload = self._recv(length)
            if rtype == NBD_REP_ACK:
                return
            if rtype & 0x80000000:
                raise RefusedError("export refused (reply 0x%x): %r"
                                   % (rtype, payload))
            if rtype == NBD_REP_INFO and payload[:2] == b"\0\0":
                self.size = struct.unpack(">Q", payload[2:10])[0]

    def read(self, offset, length):
        self.sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0,
                                      NBD_CMD_READ, 1, offset, length))
        magic, error, _handle = struct.unpack(">IIQ", self._recv(16))
        assert magic == NBD_SIMPLE_REPLY_MAGIC
        if error:
            raise OSError(error, "NBD read error")
        return self._recv(length)

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0,
                                          NBD_CMD_DISC, 2, 0, 0))
        self.sock.close()

    def drop(self):
        """Vanish without NBD_CMD_DISC, as a killed client does."""
        self.sock.close()


def cleanup_folder(path):
    shutil.rmtree(path, ignore_errors=True)


# -- more nodes and images -------------------------------------------------------

def device_node(device, path):
    """A second node of device's numbers at path, as /dev/mapper/vg-lv and
    /dev/dm-N are of one LV; removed with the folder it is made in."""
    rdev = os.stat(device).st_rdev
    subprocess.run(["mknod", path, "b", str(os.major(rdev)),
                    str(os.minor(rdev))], check=True)
    return path


def image_reads(path, pattern, offset, length):
    """True if the image chain at path reads pattern over the range
    (qemu-io, read-only: the image must not be open for writing)."""
    proc = subprocess.run(["qemu-io", "-r", "-c", "read -P 0x%02x %d %d"
                           % (pattern, offset, length), path],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode and "Pattern verification failed" not in proc.stdout:
        raise RuntimeError("qemu-io cannot read %s: %s%s"
                           % (path, proc.stdout, proc.stderr))
    return proc.returncode == 0



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


# -- libvirtd restarted under a test --------------------------------------------

LIBVIRTD_PIDFILE = "/run/libvirtd.pid"


def restart_libvirtd(the_lab, timeout=60):
    """Stop libvirtd with SIGTERM, start it again and wait until it answers.

    Running domains survive (QEMU is not libvirtd's child for life), but
    every connection breaks: the_lab's is opened again and its domains are
    looked up anew by UUID, in the same order.  Other users of this machine
    lose their connections too: keep this rare and short.
    """
    uuids = [dom.UUIDString() for dom in the_lab.domains]
    with open(LIBVIRTD_PIDFILE) as f:
        pid = int(f.read())
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not os.path.exists("/proc/%d" % pid), timeout, 0.05,
               "libvirtd (pid %d) to stop" % pid)
    subprocess.run(["libvirtd", "-d"], check=True)
    wait_until(_libvirt_answers, timeout, 0.1, "libvirtd to answer again")
    with contextlib.suppress(libvirt.libvirtError):
        the_lab.conn.close()
    the_lab.conn = libvirt.open(URI)
    domains = []
    for uuid in uuids:
        with contextlib.suppress(libvirt.libvirtError):
            domains.append(the_lab.conn.lookupByUUIDString(uuid))
    the_lab.domains = domains
    return domains
