"""A small Linux guest with a real qemu-guest-agent, for quiesced freezes.

    kernel, initrd = build()          # cached in /var/cache/nbdsnap-lab/guest
    guest = define_guest(the_lab, folder, name, data_image)
    guest_control(guest.dom, "stop-agent")

Built from Debian's packages without installing them on the host
(``apt-get download`` + ``dpkg-deb -x``): the kernel of linux-image-amd64,
booted uncompressed (the kernel has PVH: QEMU loads the ELF directly and the
emulated CPU does not decompress it, which halves the boot under TCG); an
initramfs with busybox-static, qemu-guest-agent and the shared libraries it
links, and the kernel modules in MODULES with their dependencies.

The guest's /init loads the modules, mounts the data disk (vda, ext4) at
/data, starts qemu-ga (verbose, logging to /run/qga.log and to the console,
with an fsfreeze hook that logs "freeze" and "thaw"), runs a writer without
pause, and answers commands on a second virtio-serial port (CONTROL_PORT) so
that a test can stop, resume, kill and restart the agent without the agent.

Every finished file of the writer is /data/files/SEQ-SHA256, where SHA256
is the checksum of its content: written to /data/tmp/SEQ, fsync'd, then
renamed.  A copy is consistent when every file in files/ matches its name.

The build is cached under a key made of the packages' versions (and this
file): built in a temporary folder, renamed into place when complete.
"""

import contextlib
import dataclasses
import hashlib
import json
import lzma
import os
import re
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
import uuid as uuid_mod

import libvirt
import libvirt_qemu

from . import disk_xml, wait_until

CACHE_DIR = "/var/cache/nbdsnap-lab/guest"
KERNEL_META = "linux-image-amd64"
# What the initramfs needs; qemu-guest-agent's libraries are added from its
# dependencies (library_packages), the kernel's package from KERNEL_META.
PACKAGES = ("busybox-static", "qemu-guest-agent")
# Loaded in this order after their own dependencies (read from each .ko's
# depends=).  crc32c_generic is a soft dependency of jbd2 and ext4 that
# nothing would load for us: there is no modprobe in the guest.
MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic",
           "ext4")
AGENT_PORT = "org.qemu.guest_agent.0"
CONTROL_PORT = "org.nbdsnap.control"
CMDLINE = "console=ttyS0 quiet panic=-1"
MULTIARCH = "lib/x86_64-linux-gnu"


# -- the guest's own scripts ---------------------------------------------------

INIT = r"""#!/bin/busybox sh
# /init of the nbdsnap test guest (lab/guest.py).  PID 1: must never exit.
/bin/busybox --install -s /bin
export PATH=/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
say() { echo "nbdsnap-guest: $*" > /dev/console; }
uptime_s() { read up _ < /proc/uptime; echo $up; }

for m in $(cat /etc/modules.load); do
    insmod /lib/modules/$m.ko || say "insmod $m failed"
done

# No udev: name the virtio ports as udev would.
ports() {
    mkdir -p /dev/virtio-ports
    for p in /sys/class/virtio-ports/*; do
        name=$(cat $p/name 2>/dev/null)
        [ -n "$name" ] && ln -sf ../${p##*/} /dev/virtio-ports/$name
    done
    [ -e /dev/virtio-ports/@AGENT@ ] && [ -e /dev/virtio-ports/@CONTROL@ ]
}
n=0
until [ -b /dev/vda ] && ports; do
    n=$((n + 1)); [ $n -gt 400 ] && { say "no vda or ports"; break; }
    sleep 0.05
done

mkdir -p /data
mount -t ext4 /dev/vda /data || say "cannot mount /dev/vda"

start_agent() {
    [ -p /run/qga.fifo ] || mkfifo /run/qga.fifo
    tee -a /run/qga.log < /run/qga.fifo > /dev/console &
    qemu-ga -m virtio-serial -p /dev/virtio-ports/@AGENT@ -t /run -v \
        -F/etc/fsfreeze-hook > /run/qga.fifo 2>&1 &
    echo $! > /run/qga.pid
    say "agent started, pid $! at $(uptime_s)"
}

# Files that carry their checksum in their name, without pause.
writer() {
    mkdir -p /data/files /data/tmp
    i=0
    while :; do
        i=$((i + 1))
        t=/data/tmp/$i
        head -c $(( (i % 16 + 1) * 4096 )) /dev/urandom > $t
        sync $t
        s=$(sha256sum $t)
        mv $t /data/files/$i-${s%% *}
        rm -f /data/files/$((i - 300))-*
        echo $i > /run/written.new && mv /run/written.new /run/written
    done
}

# Commands from the host on the control port, one a line; the reply is
# "COMMAND: RESULT".  The agent is acted on by pid, as a hung agent would be.
control() {
    exec 3<>/dev/virtio-ports/@CONTROL@
    while :; do
        # With no host connected the port reads end of file: poll.
        read -r cmd arg <&3 || { sleep 0.2; continue; }
        pid=$(cat /run/qga.pid)
        case "$cmd" in
        ping) r=pong ;;
        stop-agent) kill -STOP $pid && r=ok || r=failed ;;
        cont-agent) kill -CONT $pid && r=ok || r=failed ;;
        kill-agent) kill -KILL $pid && r=ok || r=failed ;;
        start-agent) start_agent; r=ok ;;
        agent-pid) r=$pid ;;
        agent-state) r=$(sed -n 's/^State:[[:space:]]*//p' /proc/$pid/status 2>/dev/null) ;;
        written) r=$(cat /run/written 2>/dev/null || echo 0) ;;
        thaw) fsfreeze --unfreeze /data && r=ok || r=failed ;;
        stop-agent-after-freeze)
            echo "${arg:-0.5}" > /run/stop-after-freeze; r=ok ;;
        *) r="unknown command" ;;
        esac
        echo "$cmd: ${r:-none}" >&3
    done
}

start_agent
writer &
control &
say "ready at $(uptime_s)"
while :; do sleep 3600; done
""".replace("@AGENT@", AGENT_PORT).replace("@CONTROL@", CONTROL_PORT)

# qemu-ga runs it with "freeze" before freezing and "thaw" after thawing,
# with stdout and stderr on /dev/null: it writes where the host can read.
FSFREEZE_HOOK = r"""#!/bin/sh
read up _ < /proc/uptime
echo "nbdsnap-guest: fsfreeze-hook $1 at $up" | tee -a /run/fsfreeze.log > /dev/console
# Armed by the control command stop-agent-after-freeze SECONDS (once): the
# agent hangs after it has frozen /data, before the thaw.
if [ "$1" = freeze ] && [ -e /run/stop-after-freeze ]; then
    delay=$(cat /run/stop-after-freeze); rm -f /run/stop-after-freeze
    (sleep $delay; kill -STOP $(cat /run/qga.pid)
     echo "nbdsnap-guest: agent stopped $delay s after freeze" > /dev/console) \
        < /dev/null > /dev/null 2>&1 &
fi
"""


# -- Debian's packages -------------------------------------------------------------

def _run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True,
                          timeout=kw.pop("timeout", 600), **kw).stdout


def _depends(package, recurse=False):
    cmd = ["apt-cache", "depends", "--no-recommends", "--no-suggests",
           "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances",
           "--no-pre-depends"]
    out = _run(cmd + (["--recurse"] if recurse else []) + [package])
    if recurse:
        return sorted({l for l in out.splitlines()
                       if l and not l.startswith(" ") and "<" not in l})
    return [l.split(":", 1)[1].strip() for l in out.splitlines()
            if l.strip().startswith("Depends:")]


def library_packages():
    """qemu-guest-agent's run-time closure: the packages its libraries are
    in.  ldd later picks the files it links; the rest is left out."""
    return [p for p in _depends("qemu-guest-agent", recurse=True)
            if p != "qemu-guest-agent"]


def versions(packages):
    """{package: candidate version}; apt-get update once if one is unknown."""
    def candidates():
        out = _run(["apt-cache", "policy"] + list(packages))
        found, name = {}, None
        for line in out.splitlines():
            if not line.startswith(" "):
                name = line.rstrip(":")
            elif line.strip().startswith("Candidate:"):
                v = line.split(":", 1)[1].strip()
                if v != "(none)":
                    found[name] = v
        return found
    found = candidates()
    if set(found) != set(packages):
        _run(["apt-get", "update", "-qq"])
        found = candidates()
    missing = sorted(set(packages) - set(found))
    if missing:
        raise RuntimeError("no Debian package %s in apt's lists"
                           % ", ".join(missing))
    return found


def wanted_packages():
    kernel = [p for p in _depends(KERNEL_META)
              if p.startswith("linux-image-")]
    if len(kernel) != 1:
        raise RuntimeError("%s depends on %r, not on one kernel"
                           % (KERNEL_META, kernel))
    pkgs = kernel + list(PACKAGES) + library_packages()
    return kernel[0], versions(pkgs)


def cache_key(pinned):
    """Changes when a package version or this recipe changes."""
    h = hashlib.sha256()
    for name in sorted(pinned):
        h.update(("%s=%s\n" % (name, pinned[name])).encode())
    with open(__file__, "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:16]


# -- the pieces ----------------------------------------------------------------------

def extract_vmlinux(bzimage, dest):
    """The uncompressed ELF kernel inside a bzImage (Debian: xz)."""
    with open(bzimage, "rb") as f:
        data = f.read()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        return False
    d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elf = d.decompress(data[start:])
    if not (d.eof and elf[:4] == b"\x7fELF"):
        return False
    with open(dest, "wb") as f:
        f.write(elf)
    return True


def module_order(moddir, names):
    """Paths of names' modules and their dependencies, dependencies first."""
    with open(os.path.join(moddir, "modules.order")) as f:
        paths = {os.path.basename(l.strip())[:-3].replace("-", "_"):
                 os.path.join(moddir, l.strip()) for l in f if l.strip()}
    order = []

    def add(name):
        if name in order:
            return
        path = paths.get(name)
        if path is None:
            raise RuntimeError("no kernel module %s in %s" % (name, moddir))
        with open(path, "rb") as f:
            m = re.search(rb"\0depends=([^\0]*)\0", f.read())
        for dep in filter(None, (m.group(1).decode() if m else "").split(",")):
            add(dep.replace("-", "_"))
        order.append(name)
    for name in names:
        add(name)
    return [(n, paths[n]) for n in order]


def linked_libraries(root, binary):
    """The shared libraries binary links, resolved inside root only."""
    libdirs = [os.path.join(root, MULTIARCH),
               os.path.join(root, "usr", MULTIARCH)]
    ldso = os.path.join(root, MULTIARCH, "ld-linux-x86-64.so.2")
    out = _run([ldso, "--library-path", ":".join(libdirs), "--list",
                os.path.join(root, binary.lstrip("/"))])
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts:
            path = parts[parts.index("=>") + 1]
            if path == "not" or not path.startswith(root):
                raise RuntimeError("%s: %s is not in the downloaded "
                                   "packages" % (binary, line.strip()))
            libs.append(path)
    return libs + [ldso]


def _download(folder, pinned):
    _run(["apt-get", "download", "-o", "APT::Sandbox::User=root"]
         + ["%s=%s" % kv for kv in sorted(pinned.items())], cwd=folder)
    root = os.path.join(folder, "root")
    for deb in sorted(os.listdir(folder)):
        if deb.endswith(".deb"):
            _run(["dpkg-deb", "-x", os.path.join(folder, deb), root])
    return root


def _install(src, dest, mode=0o644):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copyfile(src, dest)
    os.chmod(dest, mode)


def _make_initramfs(root, kernel_version, tree, initrd):
    busybox = os.path.join(root, "bin", "busybox")
    for d in ("bin", "dev", "proc", "sys", "run", "data", "etc",
              "lib/modules", "lib64", MULTIARCH):
        os.makedirs(os.path.join(tree, d), exist_ok=True)
    os.makedirs(os.path.join(tree, "var"))
    os.symlink("/run", os.path.join(tree, "var", "run"))
    _install(busybox, os.path.join(tree, "bin", "busybox"), 0o755)
    _install(os.path.join(root, "usr/sbin/qemu-ga"),
             os.path.join(tree, "bin", "qemu-ga"), 0o755)
    for lib in linked_libraries(root, "/usr/sbin/qemu-ga"):
        _install(lib, os.path.join(tree, MULTIARCH, os.path.basename(lib)),
                 0o755)
    os.symlink("/%s/ld-linux-x86-64.so.2" % MULTIARCH,
               os.path.join(tree, "lib64", "ld-linux-x86-64.so.2"))
    moddir = os.path.join(root, "lib", "modules", kernel_version)
    order = module_order(moddir, MODULES)
    for name, path in order:
        _install(path, os.path.join(tree, "lib", "modules", name + ".ko"))
    with open(os.path.join(tree, "etc", "modules.load"), "w") as f:
        f.write("\n".join(n for n, _ in order) + "\n")
    with open(os.path.join(tree, "init"), "w") as f:
        f.write(INIT)
    os.chmod(os.path.join(tree, "init"), 0o755)
    with open(os.path.join(tree, "etc", "fsfreeze-hook"), "w") as f:
        f.write(FSFREEZE_HOOK)
    os.chmod(os.path.join(tree, "etc", "fsfreeze-hook"), 0o755)
    # No cpio on the host: busybox has one.  Uncompressed: the emulated CPU
    # would spend longer inflating it than QEMU spends loading it.
    names = _run([busybox, "find", "."], cwd=tree)
    with open(initrd, "wb") as out:
        subprocess.run([busybox, "cpio", "-o", "-H", "newc"], input=
                       names.encode(), stdout=out, stderr=subprocess.DEVNULL,
                       cwd=tree, check=True, timeout=120)


_built = {}


def build(cache_dir=CACHE_DIR):
    """(kernel_path, initrd_path), built once per set of package versions.

    The build goes to a temporary folder in cache_dir, renamed into place
    when complete: a reader never sees half a guest, and two builds racing
    leave one.  Asking apt for the versions takes seconds here: a process
    asks once.
    """
    if cache_dir not in _built or not os.path.exists(_built[cache_dir][1]):
        _built[cache_dir] = _build(cache_dir)
    return _built[cache_dir]


def _lists_fingerprint():
    """Changes whenever apt's package lists do (apt-get update)."""
    with open(__file__, "rb") as f:
        h = hashlib.sha256(f.read())
    folder = "/var/lib/apt/lists"
    for name in sorted(os.listdir(folder)):
        if "Packages" in name:
            st = os.stat(os.path.join(folder, name))
            h.update(("%s %d %d\n" % (name, st.st_size, st.st_mtime_ns))
                     .encode())
    return h.hexdigest()


def _build(cache_dir):
    # apt-cache takes seconds per call here: while apt's lists are the
    # same, the versions (so the key) are too, remembered in SEEN.
    seen_path = os.path.join(cache_dir, "SEEN")
    fingerprint = _lists_fingerprint()
    with contextlib.suppress(OSError, ValueError):
        with open(seen_path) as f:
            seen = json.load(f)
        if seen["lists"] == fingerprint:
            final = os.path.join(cache_dir, seen["key"])
            if os.path.exists(os.path.join(final, "manifest.json")):
                return (os.path.join(final, "vmlinux"),
                        os.path.join(final, "initrd"))
    kernel_pkg, pinned = wanted_packages()
    key = cache_key(pinned)
    final = os.path.join(cache_dir, key)
    kernel, initrd = (os.path.join(final, "vmlinux"),
                      os.path.join(final, "initrd"))
    if not os.path.exists(os.path.join(final, "manifest.json")):
        _build_into(cache_dir, key, kernel_pkg, pinned)
    fd, tmp = tempfile.mkstemp(prefix=".seen-", dir=cache_dir)
    with os.fdopen(fd, "w") as f:
        json.dump({"lists": fingerprint, "key": key}, f)
    os.chmod(tmp, 0o644)
    os.replace(tmp, seen_path)
    return kernel, initrd


def _build_into(cache_dir, key, kernel_pkg, pinned):
    final = os.path.join(cache_dir, key)
    os.makedirs(cache_dir, exist_ok=True)
    os.chmod(cache_dir, 0o755)
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix=".build-", dir=cache_dir)
    try:
        os.mkdir(os.path.join(work, "debs"))
        root = _download(os.path.join(work, "debs"), pinned)
        out = os.path.join(work, "out")
        os.mkdir(out)
        kversion = kernel_pkg[len("linux-image-"):]
        bzimage = os.path.join(root, "boot", "vmlinuz-" + kversion)
        uncompressed = extract_vmlinux(bzimage, os.path.join(out, "vmlinux"))
        if not uncompressed:
            shutil.copyfile(bzimage, os.path.join(out, "vmlinux"))
        _make_initramfs(root, kversion, os.path.join(work, "tree"),
                        os.path.join(out, "initrd"))
        manifest = {"packages": pinned, "kernel": kernel_pkg,
                    "uncompressed_kernel": uncompressed,
                    "build_seconds": round(time.monotonic() - started, 1),
                    "bytes": {n: os.path.getsize(os.path.join(out, n))
                              for n in ("vmlinux", "initrd")}}
        with open(os.path.join(out, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        for name in os.listdir(out):
            os.chmod(os.path.join(out, name), 0o644)
        os.chmod(out, 0o755)
        try:
            os.rename(out, final)
        except OSError:
            if not os.path.exists(os.path.join(final, "manifest.json")):
                raise           # not another build that won the race
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for old in os.listdir(cache_dir):   # guests of older package versions
        path = os.path.join(cache_dir, old)
        if old != key and not old.startswith(".") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


def manifest(kernel):
    with open(os.path.join(os.path.dirname(kernel), "manifest.json")) as f:
        return json.load(f)


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


def agent_read_file(dom, path, timeout=10):
    """A file of the guest, read through the agent."""
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
                return data.decode(errors="replace")
    finally:
        agent_command(dom, "guest-file-close", timeout, handle=handle)


def _channel_path(dom, port):
    from lxml import etree
    root = etree.fromstring(dom.XMLDesc(0).encode())
    for ch in root.findall("devices/channel"):
        if ch.find("target").get("name") == port:
            return ch.find("source").get("path")
    raise KeyError(port)


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
