"""The main job end to end, on this machine, with a throwaway VM.

    make demo        (or: .venv/bin/python -m lab.demo)

1. a domain is defined and started (software emulation, no OS needed);
2. nbd-server serves its disk on loopback with prerun/postrun = our hooks,
   and the freeze-time manifest beside it (digest = on);
3. the guest writes without pause while nbd-pull copies the disk over
   4 NBD connections, which share one freeze, every block checked;
4. nbd-verify proves the copy equals the frozen base, on its own;
5. the last connection ends: the overlay is committed back, and every guest
   write made during the copy is in the base;
6. the guest writes a little; a refresh moves only those blocks;
7. the failover, on the small Debian guest with its agent (lab/guest.py):
   it writes files named after their sha256; nbd-pull --define copies its
   disk, quiesced, and defines a shut-off standby on the copy; the copy is
   fsck-clean and every file matches its name; the original is destroyed,
   `virsh start` boots the standby, whose agent reads the newest files
   back, each matching its name;
8. everything is removed, the standby too.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import lab
from lab import demo_failover
from lab.tls import Pki, uri as tls_uri
from nbdsnap.verify import nbd

MiB = 1 << 20
SIZE = 256
BIN = lab.VENV_BIN


def say(step, text):
    print("\n\033[1m== %s. %s\033[0m" % (step, text) if sys.stdout.isatty()
          else "\n== %s. %s" % (step, text), flush=True)


def show(text):
    for line in text.rstrip("\n").splitlines():
        print("   " + line)
    sys.stdout.flush()


class Syslog:
    """Listen on /dev/log when no syslog daemon does, to show the hooks'
    records; where a daemon runs, they are in its log instead."""

    def __init__(self):
        self.records = []
        self.sock = None
        if os.path.exists("/dev/log"):
            return
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("/dev/log")
        self.sock.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self):
        while not self.stop.is_set():
            try:
                self.records.append(self.sock.recv(65536).decode())
            except socket.timeout:
                pass

    def take(self):
        out, self.records = self.records, []
        # "<30>nbd-prerun[123]: message": drop the priority, keep the tag.
        return [(r.split(">", 1)[1] if r.startswith("<") else r).rstrip("\0 ")
                for r in out]

    def close(self):
        if self.sock is not None:
            self.stop.set()
            self.thread.join()
            self.sock.close()
            os.unlink("/dev/log")


class GuestWriter(threading.Thread):
    """Writes 64 KiB records at a moving offset, like a busy guest."""

    def __init__(self, dom):
        super().__init__(daemon=True)
        self.dom = dom
        self.done = threading.Event()
        self.writes = []

    def run(self):
        offset, n = 64 * MiB, 0
        while not self.done.is_set():
            pattern = 0x40 + n % 64
            lab.guest_write(self.dom, "vda", pattern, offset, 65536)
            self.writes.append((offset, pattern))
            offset += 65536 * 3
            n += 1


def main():
    t0 = time.monotonic()
    say(1, "Host: libvirtd and virtlogd running, /dev/kvm usable")
    lab.ensure_host()
    folder = lab.workdir("nbdsnap-demo-")
    name = "nbdsnap-demo-" + os.path.basename(folder)[-6:]
    # Undone in reverse, each even if one before it failed.
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(lab.cleanup_folder, folder)
        syslog = Syslog()
        cleanup.callback(syslog.close)
        # The standby is nbd-pull's, not the Lab's: every domain named
        # after the demo's goes, even if the Lab lost its connection.
        cleanup.callback(lab.remove_domains, name)
        virt = lab.Lab()
        cleanup.callback(virt.close)
        run(virt, folder, name, syslog)
        demo_failover.failover(virt, os.path.join(folder, "guest"), name,
                               say, show)
    say(15, "Cleaned up: domains undefined (the standby too), nbd-servers "
        "stopped, files removed (%.1f s in all)" % (time.monotonic() - t0))


def run(virt, folder, name, syslog):
    base = os.path.join(folder, "demo-vda.raw")
    lab.make_image(base, SIZE)
    with open(base, "r+b") as f:               # some data, some holes
        f.write(os.urandom(32 * MiB))
    dom = virt.define(name, [lab.disk_xml(base, "vda")])
    show("domain %s running, disk vda = %s (%d MiB)" % (name, base, SIZE))

    say(2, "nbd-server on loopback over TLS (nbdsnap certs made the CA, its "
        "certificate and the clone host's), with our hooks and the "
        "manifest export")
    pki = Pki(os.path.join(folder, "tls"))
    show("$ nbdsnap certs --dir %s --server-name localhost --server-name "
         "127.0.0.1 --client clone\n%s" % (pki.folder, pki.made.rstrip()))
    config = lab.write_config(os.path.join(folder, "nbdsnap.conf"),
                              os.path.join(folder, "state"),
                              os.path.join(folder, "overlays"),
                              quiesce="try")
    env = {"NBDSNAP_CONFIG": config, "LIBVIRT_DEFAULT_URI": lab.URI}
    manifest = os.path.join(folder, "state", "manifests",
                            "%s-vda.manifest" % name)
    server = virt.nbd_server(folder, {
        "vm": (base, {"force_tls": "true"}),
        "vm.manifest": (manifest, {"prerun": "", "postrun": "",
                                   "force_tls": "true"})}, env,
        generic=pki.generic())
    show(open(config).read())
    show(open(server.conf).read())

    def source(export):
        return tls_uri(server, export, pki.client())

    say(3, "A client connects over TLS: the first prerun freezes the base")
    held = nbd.Client(source("vm"))
    status = subprocess.run([os.path.join(BIN, "nbdsnap"), "status"],
                            env=dict(os.environ, **env), capture_output=True,
                            text=True).stdout
    show("$ nbdsnap status\n" + status)
    frozen = subprocess.run([os.path.join(BIN, "nbd-verify"), "digest", base],
                            capture_output=True, text=True,
                            check=True).stdout.split()[0]

    say(4, "The guest writes without pause while nbd-pull copies over "
        "4 connections")
    writer = GuestWriter(dom)
    writer.start()
    copy = os.path.join(folder, "clone", "demo-vda.img")
    os.makedirs(os.path.dirname(copy))
    start = time.monotonic()
    first = pull(source("vm"), copy)
    took = time.monotonic() - start
    writer.done.set()
    writer.join()
    show("pulled %d MiB (%d MiB read, %d zero blocks not read) in %.2f s; "
         "the guest made %d writes meanwhile"
         % (SIZE, first["bytes_read"] >> 20, first["blocks_zero"], took,
            len(writer.writes)))

    say(5, "nbd-verify, on its own: the copy equals the frozen base")
    cmp = subprocess.run([os.path.join(BIN, "nbd-verify"), "compare", base,
                          copy], capture_output=True, text=True)
    check = subprocess.run([os.path.join(BIN, "nbd-verify"), "check",
                            source("vm.manifest"), copy],
                           capture_output=True, text=True)
    show("$ nbd-verify compare %s %s\nexit status %d%s" % (
        base, copy, cmp.returncode, cmp.stdout and "\n" + cmp.stdout))
    show("$ nbd-verify check %s %s\nexit status %d" % (
        source("vm.manifest"), copy, check.returncode))
    show("frozen base digest, taken at the freeze: %s" % frozen)
    show("nbd-pull's digest of the copy:           %s" % first["digest"])
    assert cmp.returncode == 0 and check.returncode == 0
    assert first["digest"] == frozen

    say(6, "The last connection ends: postrun commits the overlay")
    held.close()
    start = time.monotonic()
    lab.wait_until(lambda: not os.listdir(os.path.join(folder, "state",
                                                       "sessions")), 120,
                   what="the commit")
    show("session ended %.2f s after the last disconnect" %
         (time.monotonic() - start))

    say(7, "The guest writes 3 scattered 4 KiB pieces; a refresh moves only "
        "the blocks written since the last pull")
    mine = (5 * MiB, 100 * MiB + 4096, 200 * MiB)
    for i, offset in enumerate(mine):
        lab.guest_write(dom, "vda", 0x61 + i, offset, 4096)
    # These, and what the guest wrote during the first pull (committed
    # into the base after it).
    written = {o // 65536 for o in mine} | {o // 65536
                                           for o, _ in writer.writes}
    again = pull(source("vm"), copy)
    lab.wait_until(lambda: not os.listdir(os.path.join(folder, "state",
                                                       "sessions")), 120,
                   what="the commit")
    show("refresh: %d of %d blocks changed, %d fetched, %.1f KiB read "
         "(blocks and manifest), %.2f s" % (
             again["blocks_changed"], again["blocks_total"],
             again["blocks_fetched"], again["bytes_read"] / 1024,
             again["seconds"]))
    assert lab.sha256(copy) == lab.sha256(base)
    assert again["blocks_fetched"] == len(written)

    say(8, "What the hooks and nbd-pull told syslog")
    records = syslog.take()
    show("\n".join(records) if records else
         "(a syslog daemon runs here: see its log, tags nbd-prerun and "
         "nbd-postrun)")

    say(9, "Nothing lost, nothing left")
    source = lab.disk_source(dom, "vda")
    lost = [(o, p) for o, p in writer.writes
            if lab.read_range(base, o, 65536) != bytes([p]) * 65536]
    show("domain disk vda is back on %s: %s" % (source, source == base))
    show("overlays left: %d" % len(os.listdir(os.path.join(folder,
                                                           "overlays"))))
    show("guest writes made during the pull found in the base: %d of %d"
         % (len(writer.writes) - len(lost), len(writer.writes)))
    assert source == base and not lost


def pull(source, copy):
    """nbd-pull, as cron runs it (no terminal: its line goes to syslog)."""
    proc = subprocess.run(
        [os.path.join(BIN, "nbd-pull"), "--json", source, copy],
        capture_output=True, text=True, stdin=subprocess.DEVNULL)
    show("$ nbd-pull %s %s\n%sexit status %d" % (
        source, copy, proc.stderr, proc.returncode))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["pulls"][0]


if __name__ == "__main__":
    main()
