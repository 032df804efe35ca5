"""Benchmark of the freeze-time manifest: incremental against full (issue 10).

Part of `make bench` (lab/bench.py writes its section into BENCHMARKS.md);
alone: .venv/bin/python -m lab.bench manifest [--size GIB], which rewrites
only its section.  Issue 10's aim, on a disk of random data with about 1 %
changed in scattered 4 KiB writes: the incremental manifest reads at most
1.5 × the changed 64 KiB blocks, in under 5 % of the full digest's time
plus half a second.

One domain (no OS) on a raw base of SIZE GiB of random data, the hooks run
by hand with digest = on, four freezes in a row:

    1 full          the chain's first manifest
      writes A      1 % of the disk's bytes, 4 KiB each at random offsets
    2 incremental
      writes B      one 4 KiB write in each of 1 % of the 64 KiB blocks
    3 incremental
    4 full          digest_full_days = 0, no write since 3: the same base

The guest's writes go through QEMU's active layer (qemu-io over HMP),
between freezes.  Before each freeze, the base's pages are dropped from
the page cache (fsync, then POSIX_FADV_DONTNEED): every digest reads the
base from the disk, as on a VM host whose bases do not fit in memory,
while the hooks' code stays cached, as it mostly is there.  Times come
from the hooks' history (manifest_seconds: from the freeze to the complete
manifest) and from the bench's clock (from the prerun's start, its
snapshot and bitmap read included).  Manifest 3 and 4 must hold the same digests.  Context: what a
user would otherwise run for a whole-image digest of the same base, cold.
Times are reported; the aims are computed, never asserted.
"""

import os
import random
import shutil
import struct
import subprocess
import time

import libvirt_qemu

import lab

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZE = 4            # GiB, the default
BLOCK = 64 * KiB    # the manifest's block, QEMU's bitmap granularity
WRITE = 4 * KiB     # one guest write
CHANGED = 0.01      # of the bytes (writes A), of the blocks (writes B)
AIM_READ = 1.5      # bytes read ÷ changed blocks' bytes, at most
AIM_SHARE, AIM_PLUS = 0.05, 0.5     # time: share of the full's, + seconds
TARGET = "vda"
HEADING = "## Freeze-time manifests"


# -- pure: where the guest writes, what the aims say --------------------------

def scattered(size, fraction, rng, write=WRITE):
    """Distinct write-aligned offsets covering fraction of size's bytes."""
    slots = size // write
    return [s * write for s in rng.sample(range(slots),
                                          round(slots * fraction))]


def one_per_block(size, fraction, rng, block=BLOCK, write=WRITE):
    """One write-aligned offset in each of fraction of size's blocks."""
    blocks = size // block
    return [b * block + rng.randrange(block // write) * write
            for b in rng.sample(range(blocks), round(blocks * fraction))]


def changed_blocks(offsets, length=WRITE, block=BLOCK):
    """How many distinct blocks writes of length at offsets touch."""
    return len({b for o in offsets
                for b in range(o // block, (o + length - 1) // block + 1)})


def aims(bytes_read, changed_bytes, seconds, full_seconds):
    """Issue 10's aims for one incremental manifest against the full."""
    if changed_bytes:
        ratio = bytes_read / changed_bytes
    else:                           # nothing changed: anything read is waste
        ratio = float("inf") if bytes_read else 0.0
    limit = AIM_SHARE * full_seconds + AIM_PLUS
    return {"ratio": ratio, "read_met": ratio <= AIM_READ,
            "share": seconds / full_seconds, "limit": limit,
            "time_met": seconds <= limit}


# -- the rig -------------------------------------------------------------------

def random_image(path, size, piece=64 * MiB):
    """size bytes of random data, fast: one random piece written again and
    again, each 64 KiB block's first 8 bytes its own number, so that no
    two blocks are alike."""
    buf = bytearray(os.urandom(piece))
    with open(path, "wb") as f:
        for start in range(0, size, piece):
            for off in range(0, piece, BLOCK):
                struct.pack_into("<Q", buf, off, (start + off) // BLOCK)
            f.write(buf[:min(piece, size - start)])
    return path


def evict(path):
    """Drop path's pages from the page cache, QEMU's dirty ones written
    first: the next read of it comes from the disk.  Only this file's:
    drop_caches would also make every hook run load Python and its
    modules from the disk, which a VM host's hooks seldom do."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def guest_writes(dom, offsets, pattern):
    """4 KiB writes as the guest would, through one HMP call each (the
    output goes to QEMU's log: checked on the base afterwards)."""
    hmp = ('qemu-io -d /machine/peripheral/%s/virtio-backend '
           '"write -P 0x%02x %%d %d"' % (lab.disk_alias(dom, TARGET),
                                         pattern, WRITE))
    flag = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    started = time.monotonic()
    for offset in offsets:
        libvirt_qemu.qemuMonitorCommand(dom, hmp % offset, flag)
    return time.monotonic() - started


def check_written(base, offsets, pattern, count=64):
    for offset in offsets[:count]:
        if lab.read_range(base, offset, WRITE) != bytes([pattern]) * WRITE:
            raise RuntimeError("the guest's write at %d is not in %s"
                               % (offset, base))


class Rig:
    """The domain, its base, the hooks' configuration."""

    def __init__(self, virt, folder, size):
        self.folder, self.size = folder, size
        self.base = random_image(os.path.join(folder, "base.raw"), size)
        self.name = "nbdsnap-bench-manifest-" + os.path.basename(folder)[-6:]
        self.dom = virt.define(self.name, [lab.disk_xml(self.base, TARGET)])
        self.manifests = os.path.join(folder, "manifests")
        self.manifest = os.path.join(self.manifests, "%s-%s.manifest"
                                     % (self.name, TARGET))
        self.state = os.path.join(folder, "state")
        self.config = os.path.join(folder, "nbdsnap.conf")
        self.env = dict(os.environ, NBDSNAP_CONFIG=self.config,
                        LIBVIRT_DEFAULT_URI=lab.URI)
        self.configure()

    def configure(self, **more):
        lab.write_config(self.config, self.state,
                         os.path.join(self.folder, "overlays"),
                         quiesce="off", digest="on", digest_timeout=600,
                         manifest_dir=self.manifests, **more)

    def hook(self, name):
        proc = subprocess.run([os.path.join(lab.VENV_BIN, name), self.base],
                              env=self.env, capture_output=True, text=True,
                              timeout=600, stdin=subprocess.DEVNULL)
        if proc.returncode:
            raise RuntimeError("%s: exit %d: %s" % (name, proc.returncode,
                                                    proc.stderr.strip()))

    def header(self):
        from nbdsnap.verify import manifest2
        with manifest2.FileReader(self.manifest) as reader:
            return manifest2.read_header(reader)

    def freeze(self):
        """One freeze, cold: {prerun, complete (bench clock), history}."""
        evict(self.base)
        t0 = time.monotonic()
        self.hook("nbd-prerun")
        prerun = time.monotonic() - t0
        header = lab.wait_until(lambda: _complete(self.header), 900, 0.01,
                                "the manifest to complete")
        complete = time.monotonic() - t0
        self.hook("nbd-postrun")
        lab.wait_until(lambda: not _sessions(self), 120, 0.05,
                       "the session to end")
        from nbdsnap.hooks import history
        from nbdsnap.hooks.config import Config
        entry = history.read(Config(state_dir=self.state))[-1]
        return {"kind": entry["manifest_kind"], "prerun": prerun,
                "complete": complete, "seconds": entry["manifest_seconds"],
                "read": entry["manifest_bytes_read"],
                "generation": header.generation, "digest": header.digest}


def _sessions(rig):
    folder = os.path.join(rig.state, "sessions")
    return os.path.isdir(folder) and os.listdir(folder)


def _complete(read_header):
    try:
        header = read_header()
    except Exception:       # noqa: BLE001 -- being replaced: look again
        return None
    return header if header.complete else None


def _load():
    return "%.2f %.2f %.2f" % os.getloadavg()


def body(path):
    from nbdsnap.verify import manifest2
    with open(path, "rb") as f:
        return f.read()[manifest2.HEADER_SIZE:]


def cold(cmd, path):
    """Wall time of cmd, path out of the page cache."""
    evict(path)
    started = time.monotonic()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True, timeout=900)
    return time.monotonic() - started


def others(base):
    """{tool: seconds} for a whole-image digest of base, tools present."""
    tools = [("nbd-verify digest (sha256, v1 manifest, both cores)",
              [os.path.join(lab.VENV_BIN, "nbd-verify"), "digest", base]),
             ("sha256sum", ["sha256sum", base]),
             ("openssl dgst -sha256", ["openssl", "dgst", "-sha256", base]),
             ("b3sum (blake3, all cores)", ["b3sum", base])]
    return [(label, cold(cmd, base)) for label, cmd in tools
            if shutil.which(cmd[0])]


def measure(folder, size_gib=SIZE, seed=10):
    rng = random.Random(seed)
    size = size_gib * GiB
    virt = lab.Lab()
    r = {"size": size, "freezes": [], "load": [_load()]}
    rig = None
    try:
        print("manifest: %d GiB of random data" % size_gib, flush=True)
        rig = Rig(virt, folder, size)
        plan = [("first freeze", None, None),
                ("1 % of the bytes", scattered(size, CHANGED, rng), 0x5a),
                ("1 % of the 64 KiB blocks",
                 one_per_block(size, CHANGED, rng), 0x5b),
                ("same base, digest_full_days = 0", None, None)]
        for label, offsets, pattern in plan:
            row = {"label": label, "writes": 0, "blocks": 0}
            if offsets:
                print("manifest: %d guest writes (%s)" % (len(offsets),
                                                          label), flush=True)
                row["write_seconds"] = guest_writes(rig.dom, offsets, pattern)
                check_written(rig.base, offsets, pattern)
                row.update(writes=len(offsets),
                           blocks=changed_blocks(offsets))
            if label.startswith("same base"):
                shutil.copyfile(rig.manifest, rig.manifest + ".before")
                rig.configure(digest_full_days=0)
            print("manifest: freeze (%s)" % label, flush=True)
            row.update(rig.freeze())
            r["freezes"].append(row)
        incremental, full = r["freezes"][-2:]
        r["same"] = (incremental["digest"] == full["digest"]
                     and body(rig.manifest) == body(rig.manifest + ".before"))
        print("manifest: whole-image digests by other tools", flush=True)
        r["others"] = others(rig.base)
        r["load"].append(_load())
    finally:
        if rig is not None and _sessions(rig):
            # Cut short while frozen: end the session (stops its digest).
            subprocess.run([os.path.join(lab.VENV_BIN, "nbd-postrun"),
                            rig.base], env=rig.env, capture_output=True,
                           timeout=600, stdin=subprocess.DEVNULL)
        virt.close()
        lab.remove_domains("nbdsnap-bench-manifest-"
                           + os.path.basename(folder)[-6:])
    return r


# -- the report ----------------------------------------------------------------

def _size(n):
    return "%.0f MiB" % (n / MiB) if n >= 10 * MiB else "%.1f MiB" % (n / MiB)


INTRO = """\
Issue 10: the manifest a freeze makes with `digest = on`, incremental (from
QEMU's dirty bitmap) against full, on one software-emulated domain (no OS)
with a %(gib)d GiB raw base of random data; the hooks run by hand, one after
another, in one run (lab/bench_manifest.py). The guest's 4 KiB writes go
through QEMU's active layer (qemu-io over HMP) between freezes. Before each
freeze and each tool the base's pages are dropped from the page cache
(fsync, then POSIX_FADV_DONTNEED; the hooks' code stays cached): every
digest reads the base from the disk. *Freeze → complete*: the history's
manifest_seconds, from the freeze (the snapshot's end; the bitmap swap and
read count) to the complete manifest; the digest runs on one thread under
nice and ionice. *÷ full*: against the faster of the two full digests (the
less disturbed). *Prerun → complete*: the bench's clock, from the prerun's
start (Python, snapshot, bitmap swap and read included). *Changed*: the
distinct 64 KiB blocks the writes touched, × 64 KiB. Load average %(load0)s
at the start, %(load1)s at the end."""

READING = """\
Reading. Scattered 4 KiB writes over 1 % of the bytes touch about
1 − e^(−16 × 1 %) ≈ 15 % of the 64 KiB blocks, and each touched block must
be read and hashed again: no incremental manifest can then take 5 % of the
full digest's time, whatever its reads cost; the time aim is reachable
where about 1 % of the blocks changed (freeze 3). The reads are the other
cost: the digest runs one thread, so it announces the scattered blocks to
the kernel 64 MiB ahead (POSIX_FADV_WILLNEED) to keep several reads in
flight, where the full digest's sequential reads get the kernel's
readahead (compare the MiB/s column)."""


def _mibs(n, seconds):
    return "%.0f" % (n / MiB / seconds) if seconds else "–"


def _verdict(i, row, a, full_seconds):
    return ("- **%s** (freeze %d): bytes read %.2f × the changed blocks "
            "(aim ≤ %.1f: %s); %.2f s against %.2f s allowed (%d %% of the "
            "full's %.2f s + %.1f s: %s)." % (
                row["label"], i, a["ratio"], AIM_READ,
                "met" if a["read_met"] else "MISSED", row["seconds"],
                a["limit"], 100 * AIM_SHARE, full_seconds, AIM_PLUS,
                "met" if a["time_met"] else "MISSED"))


def section(r):
    rows = r["freezes"]
    full = min(x["seconds"] for x in rows if x["kind"] == "full")
    lines = [HEADING, "", INTRO % dict(gib=r["size"] // GiB,
                                       load0=r["load"][0], load1=r["load"][1]),
             "",
             "| freeze | manifest | 4 KiB writes before | changed | bytes "
             "read | read ÷ changed | freeze → complete | MiB/s | ÷ full | "
             "prerun → complete | prerun |",
             "|" + " --- |" * 11]
    verdicts = []
    for i, row in enumerate(rows, 1):
        changed = row["blocks"] * BLOCK
        cells = ["%d. %s" % (i, row["label"]), row["kind"],
                 "%d" % row["writes"] if row["writes"] else "–",
                 "%d blocks, %s" % (row["blocks"], _size(changed))
                 if row["writes"] else "–", _size(row["read"]), "–",
                 "%.2f s" % row["seconds"], _mibs(row["read"], row["seconds"]),
                 "%.1f %%" % (100 * row["seconds"] / full),
                 "%.2f s" % row["complete"], "%.2f s" % row["prerun"]]
        if row["kind"] == "incremental" and row["writes"]:
            a = aims(row["read"], changed, row["seconds"], full)
            cells[5] = "%.2f" % a["ratio"]
            verdicts.append(_verdict(i, row, a, full))
        lines.append("| " + " | ".join(cells) + " |")
    a_row = rows[1]
    lines += [
        "", "Aims (issue 10):", ""] + verdicts + [
        "- Manifests 3 (incremental) and 4 (full) of the same base hold "
        "%s." % ("the same digests, byte for byte past the header"
                 if r["same"] else "DIFFERENT digests: a bug"),
        "- The writes before freeze 2 touched %.1f %% of the 64 KiB "
        "blocks; its %d writes over HMP took %.1f s (%.2f ms each)." % (
            100 * a_row["blocks"] * BLOCK / r["size"], a_row["writes"],
            a_row["write_seconds"],
            1000 * a_row["write_seconds"] / a_row["writes"]),
        "- The two full digests took %s. This machine is itself a VM: "
        "the base leaves its page cache, perhaps not its host's; the first "
        "full reads what was just written." % " and ".join(
            "%.2f s" % x["seconds"] for x in rows if x["kind"] == "full"),
        "",
        READING,
        "",
        "| whole-image digest of the same base, cold | time | MiB/s | "
        "÷ the hooks' full |",
        "| --- | --- | --- | --- |",
        "| the hooks' full manifest (the faster, one thread, nice) | %.2f s "
        "| %s | 1.00 |" % (full, _mibs(r["size"], full)),
    ]
    lines += ["| %s | %.2f s | %s | %.2f |" % (label, t, _mibs(r["size"], t),
                                              t / full)
              for label, t in r["others"]]
    return "\n".join(lines) + "\n"


def run(size_gib=SIZE):
    with lab.scratch("nbdsnap-bench-manifest-") as folder:
        return section(measure(folder, size_gib))


if __name__ == "__main__":
    print(run())
