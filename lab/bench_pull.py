"""Benchmark: nbd-pull against nbdcopy and rsync, on a link of a real speed.

Part of `make bench` (lab/bench.py writes its section into BENCHMARKS.md);
alone: .venv/bin/python -m lab.bench pull [--pull-size GIB].

A clone host keeps a copy of a VM's disk: nbd-pull refreshes it from the
VM host's nbd-server with the freeze-time manifest beside the export
(pull/run.py).  What else would one run?  nbdcopy (a full copy each time)
or rsync (its delta algorithm reads the whole image on both sides).  All
three, in one run, inside a network namespace whose loopback is shaped to
RATE (lab/netns.py); the VM host's side is a plain read-only nbd-server
(no hooks) serving IMAGE as "d" and its v2 manifest (nbd-verify digest,
the format the hooks write) as "d.manifest", and an rsync daemon with a
read-only module on IMAGE's folder:

    1 first copy    nbdcopy full, nbd-pull into a missing copy, rsync full
      change A      1 % of the bytes in scattered 4 KiB writes, seeded
    2 incremental   nbd-pull, rsync; nbdcopy full again
      change B      1 % of the 64 KiB blocks rewritten whole
    3 incremental   nbd-pull, rsync

IMAGE is SIZE GiB of random data with ZEROS of it zero 1 MiB regions
(holes).  After each change the manifest is made again, untimed (the VM
host's work).  Before each timed run IMAGE leaves the page cache
(bench_manifest.evict); each run is timed until its copy is on the disk
(the copy is fsynced after the command: nbd-pull fsyncs by itself), and
each copy is then compared with IMAGE (sha256): a benchmark of a wrong
copy is worthless.  Times are reported; the aims are computed, never
asserted.
"""

import contextlib
import json
import os
import random
import subprocess
import time

import lab
from lab.bench_client import _version
from lab.bench_manifest import changed_blocks, evict, one_per_block, scattered
from lab.bench_pull_report import HEADING, section  # noqa: F401 (lab.bench)
from lab.netns import ShapedLink

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZE = 4            # GiB, the default
RATE = "1gbit"
BLOCK = 64 * KiB    # the manifest's block
WRITE = 4 * KiB
CHANGED = 0.01      # of the bytes (change A), of the blocks (change B)
ZEROS, REGION = 0.25, MiB
SEED = 30
PLAIN = {"prerun": "", "postrun": ""}


# -- pure: where the zeros are, what a change touched -------------------------

def zero_regions(size, fraction, rng, region=REGION):
    """Sorted offsets of the region-sized zero regions: fraction of them."""
    n = size // region
    return sorted(r * region
                  for r in rng.sample(range(n), round(n * fraction)))


def whole_blocks(offsets, block=BLOCK):
    """Blocks written whole at offsets, each a block's start."""
    return len({o // block for o in offsets})


# -- the rig ------------------------------------------------------------------

def sparse_image(path, size, zeros, region=REGION, piece=64 * MiB):
    """Random data but for the zero regions, left as holes; each 64 KiB
    block's first 8 bytes its number, so that no two blocks are alike
    (one random piece is written again and again: fast)."""
    holes = set(zeros)
    buf = bytearray(os.urandom(piece))
    with open(path, "wb") as f:
        f.truncate(size)
        for start in range(0, size, piece):
            for off in range(0, piece, BLOCK):
                number = (start + off) // BLOCK
                buf[off:off + 8] = number.to_bytes(8, "little")
            for r in range(start, min(start + piece, size), region):
                if r not in holes:
                    os.pwrite(f.fileno(), buf[r - start:r - start + region],
                              r)
    return path


def rewrite(path, offsets, length, rng):
    """Seeded random data of length at each offset, on the disk."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in offsets:
            os.pwrite(fd, rng.randbytes(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def make_manifest(image, manifest):
    subprocess.run([os.path.join(lab.VENV_BIN, "nbd-verify"), "digest",
                    "--manifest-version", "2", "--manifest", manifest, image],
                   check=True, capture_output=True, timeout=1800)


def on_disk(path):
    """Seconds to fsync path (what the command left in the page cache)."""
    t0 = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - t0


class Rsyncd:
    """An rsync daemon inside link: module "m", read only, on folder."""

    def __init__(self, link, folder, served):
        self.link, self.port = link, lab.free_port()
        self.conf = os.path.join(folder, "rsyncd.conf")
        with open(self.conf, "w") as f:
            f.write("pid file = %s\nuse chroot = no\naddress = 127.0.0.1\n"
                    "[m]\n    path = %s\n    read only = yes\n"
                    "    uid = root\n    gid = root\n    list = no\n"
                    % (os.path.join(folder, "rsyncd.pid"), served))
        self.log = os.path.join(folder, "rsyncd.log")
        self.proc = link.popen(["rsync", "--daemon", "--no-detach",
                                "--config", self.conf, "--port",
                                str(self.port), "--log-file", self.log],
                               stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        lab.wait_until(lambda: link.run(
            ["rsync", "rsync://127.0.0.1:%d/" % self.port],
            capture_output=True, check=False).returncode == 0, 10, 0.1,
            "rsync --daemon to listen")

    def url(self, name):
        return "rsync://127.0.0.1:%d/m/%s" % (self.port, name)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Bench:
    """IMAGE served twice inside one shaped link; one timed run a call."""

    def __init__(self, folder, link, size):
        self.folder, self.link, self.size = folder, link, size
        served = os.path.join(folder, "vmhost")
        os.mkdir(served)
        self.image = os.path.join(served, "image.raw")
        self.manifest = os.path.join(served, "image.manifest")
        self.rows, self.sha, self.changed = [], None, 0
        self.step = ""
        self.server = self.rsyncd = None

    def start(self, zeros):
        sparse_image(self.image, self.size, zeros)
        self.new_state(None)
        sub = os.path.join(self.folder, "nbd-server")
        os.mkdir(sub)
        self.server = lab.NbdServer(
            sub, {"d": (self.image, PLAIN), "d.manifest": (self.manifest,
                                                           PLAIN)},
            {}, wrap=self.link.argv([]))
        self.server.start()
        self.rsyncd = Rsyncd(self.link, self.folder, os.path.dirname(
            self.image))

    def stop(self):
        for daemon in (self.rsyncd, self.server):
            if daemon is not None:
                daemon.stop()

    def new_state(self, changed):
        """IMAGE changed (changed blocks; None: new): its manifest again."""
        make_manifest(self.image, self.manifest)
        self.sha = lab.sha256(self.image)
        self.changed = changed

    def timed(self, tool, cmd, copy):
        """Run cmd inside the link, IMAGE cold; a row of the table."""
        print("pull: %s: %s" % (self.step, tool), flush=True)
        evict(self.image)
        tx0, t0 = self.link.tx_bytes(), time.monotonic()
        proc = self.link.run(cmd, capture_output=True, text=True,
                             check=False, timeout=1800)
        ran = time.monotonic() - t0
        flush = on_disk(copy)
        row = {"step": self.step, "tool": tool, "ran": ran,
               "seconds": ran + flush, "flush": flush,
               "link": self.link.tx_bytes() - tx0, "changed": self.changed}
        if proc.returncode:
            raise RuntimeError("%s: exit %d: %s" % (
                tool, proc.returncode,
                (proc.stderr.strip().splitlines() or [""])[-1]))
        if tool.startswith("nbd-pull"):
            row["json"] = json.loads(proc.stdout)["pulls"][0]
        row["equal"] = lab.sha256(copy) == self.sha
        row["allocated"] = os.stat(copy).st_blocks * 512
        self.rows.append(row)
        return row

    def nbdcopy(self):
        copy = os.path.join(self.folder, "nbdcopy.raw")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(copy)
        return self.timed("nbdcopy, full", [
            "nbdcopy", "--connections=4", "--threads=4",
            self.server.uri("d"), copy], copy)

    def pull(self, kind):
        copy = os.path.join(self.folder, "pull.raw")
        return self.timed("nbd-pull, " + kind, [
            os.path.join(lab.VENV_BIN, "nbd-pull"), "--json", "--progress",
            "never", "--syslog-socket", os.path.join(self.folder, "no-log"),
            self.server.uri("d"), copy], copy)

    def rsync(self, kind):
        copy = os.path.join(self.folder, "rsync.raw")
        return self.timed("rsync, " + kind, [
            "rsync", "--inplace", "--no-whole-file",
            self.rsyncd.url(os.path.basename(self.image)), copy], copy)


def measure(folder, size_gib=SIZE, rate=RATE, seed=SEED):
    rng = random.Random(seed)
    size = size_gib * GiB
    zeros = zero_regions(size, ZEROS, rng)
    r = {"size": size, "rate": rate, "server": _version(), "zeros": ZEROS,
         "rsync": _rsync_version(), "load": [_load()],
         "data_blocks": (size - len(zeros) * REGION) // BLOCK}
    print("pull: %d GiB image, %d %% zeros, and its manifest"
          % (size_gib, 100 * ZEROS), flush=True)
    with ShapedLink(rate) as link:
        b = Bench(folder, link, size)
        try:
            b.start(zeros)
            b.step, b.changed = "1. first copy", r["data_blocks"]
            b.nbdcopy()
            b.pull("full")
            b.rsync("full")
            offsets = scattered(size, CHANGED, rng)
            print("pull: change A: %d scattered 4 KiB writes" % len(offsets),
                  flush=True)
            rewrite(b.image, offsets, WRITE, rng)
            b.new_state(changed_blocks(offsets))
            r["writes"] = len(offsets)
            b.step = "2. 1 % of the bytes, 4 KiB writes"
            b.pull("incremental")
            b.rsync("incremental")
            b.nbdcopy()
            offsets = [o - o % BLOCK for o in one_per_block(size, CHANGED,
                                                            rng)]
            print("pull: change B: %d blocks rewritten" % len(offsets),
                  flush=True)
            rewrite(b.image, offsets, BLOCK, rng)
            b.new_state(whole_blocks(offsets))
            b.step = "3. 1 % of the blocks rewritten"
            b.pull("incremental")
            b.rsync("incremental")
        finally:
            b.stop()
    r["rows"] = b.rows
    r["load"].append(_load())
    return r


def _load():
    return "%.2f %.2f %.2f" % os.getloadavg()


def _rsync_version():
    p = subprocess.run(["rsync", "--version"], capture_output=True, text=True)
    return " ".join(p.stdout.split()[1:3]) if p.stdout else "?"


def run(size_gib=SIZE, rate=RATE):
    with lab.scratch("nbdsnap-bench-pull-") as folder:
        return section(measure(folder, size_gib, rate))

if __name__ == "__main__":
    import sys
    print(run(int(sys.argv[1]) if len(sys.argv) > 1 else SIZE))
