"""Benchmark: what TLS costs a pull, side by side with plain text.

Part of `make bench` (lab/bench.py writes its section into BENCHMARKS.md);
alone: .venv/bin/python -m lab.bench tls [--tls-size GIB].

One plain nbd-server (no hooks, read-only) inside a network namespace of
its own (lab/netns.py) serves IMAGE and its v2 manifest twice: as "p" and
"p.manifest" in plain text, and as "d" and "d.manifest" with force_tls,
with certificates made by `nbdsnap certs` (lab/tls.py).  On the link
shaped to RATE, then unshaped, nbd-pull (4 connections, its default)
makes a copy from each (first pull), IMAGE changes (1 % of the bytes in
scattered 4 KiB writes, seeded), and each copy is refreshed.  IMAGE is
SIZE GiB of random data with ZEROS of it zero 1 MiB regions, cold before
every run (bench_manifest.evict); every copy is compared with IMAGE.

Per run: wall seconds (until the copy is on the disk), nbd-pull's CPU
(user + sys, all threads: getrusage of the reaped child), nbd-server's
(its reaped per-connection children), and the bytes on the link.  One
run each; reported, never asserted.
"""

import os
import random
import resource
import time

import lab
from lab.bench_client import _version, server_cpu
from lab.bench_manifest import changed_blocks, evict, scattered
from lab.bench_pull import (CHANGED, REGION, WRITE, ZEROS,
                            make_manifest, on_disk, rewrite, sparse_image,
                            zero_regions)
from lab.netns import ShapedLink
from lab.tls import Pki

MiB, GiB = 1 << 20, 1 << 30
SIZE = 2            # GiB, the default
RATE = "1gbit"
SEED = 40
HEADING = "## What TLS costs a pull"
PLAIN = {"prerun": "", "postrun": ""}
TLS = dict(PLAIN, force_tls="true")


def one_pull(link, server, image, uri, copy, folder):
    """nbd-pull uri copy inside link, image cold: a row's numbers."""
    evict(image)
    tx0, srv0 = link.tx_bytes(), server_cpu(server)
    ru0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    proc = link.run([os.path.join(lab.VENV_BIN, "nbd-pull"), "--progress",
                     "never", "--syslog-socket",
                     os.path.join(folder, "no-log"), uri, copy],
                    capture_output=True, text=True, check=False,
                    timeout=1800)
    wall = time.monotonic() - t0 + on_disk(copy)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError("nbd-pull %s: exit %d: %s" % (
            uri, proc.returncode,
            (proc.stderr.strip().splitlines() or [""])[-1]))
    if lab.sha256(copy) != lab.sha256(image):
        raise RuntimeError("nbd-pull %s: the copy differs" % uri)
    return {"wall": wall,
            "cpu": ru1.ru_utime - ru0.ru_utime + ru1.ru_stime
            - ru0.ru_stime,
            "server_cpu": server_cpu(server) - srv0,
            "link": link.tx_bytes() - tx0}


def measure_link(folder, rate, size, zeros, seed):
    """[(step, kind, numbers)] on one link (rate None: unshaped)."""
    rng = random.Random(seed)
    name = rate or "unshaped"
    sub = os.path.join(folder, name)
    os.mkdir(sub)
    image = os.path.join(sub, "image.raw")
    manifest = os.path.join(sub, "image.manifest")
    sparse_image(image, size, zeros)
    make_manifest(image, manifest)
    pki = Pki(os.path.join(sub, "tls"), clients=("clone",))
    rows = []
    with ShapedLink(rate) as link:
        server = lab.NbdServer(sub, {
            "p": (image, PLAIN), "p.manifest": (manifest, PLAIN),
            "d": (image, TLS), "d.manifest": (manifest, TLS)},
            {}, wrap=link.argv([]), generic=pki.generic())
        server.start()
        uris = {"plain": server.uri("p"),
                "TLS": "nbds://127.0.0.1:%d/d?tls-certificates=%s" % (
                    server.port, pki.client("clone"))}
        try:
            for step in ("first pull", "refresh"):
                if step == "refresh":
                    offsets = scattered(size, CHANGED, rng)
                    rewrite(image, offsets, WRITE, rng)
                    make_manifest(image, manifest)
                    step += " (%d blocks changed)" % changed_blocks(offsets)
                for kind, uri in uris.items():
                    print("tls: %s, %s, %s" % (name, step, kind), flush=True)
                    copy = os.path.join(sub, kind + ".raw")
                    rows.append((step, kind, one_pull(
                        link, server, image, uri, copy, sub)))
        finally:
            server.stop()
    return rows


def measure(folder, size_gib=SIZE, rate=RATE, seed=SEED):
    size = size_gib * GiB
    zeros = zero_regions(size, ZEROS, random.Random(seed))
    r = {"size": size, "rate": rate, "server": _version(),
         "data": size - len(zeros) * REGION,
         "load": ["%.2f %.2f %.2f" % os.getloadavg()]}
    r["links"] = [(x, measure_link(folder, x, size, zeros, seed))
                  for x in (rate, None)]
    r["load"].append("%.2f %.2f %.2f" % os.getloadavg())
    return r


INTRO = """\
What TLS costs a pull (lab/bench_tls.py): one nbd-server %(server)s (no
hooks, read-only) inside a network namespace of its own serves %(gib)d GiB
(%(data)d MiB of random data, the rest zero 1 MiB holes) and its v2
manifest twice, in plain text and with force_tls (certificates by
`nbdsnap certs`, ECDSA P-256; Python's ssl and GnuTLS agree on TLS 1.3,
TLS_AES_256_GCM_SHA384); its loopback shaped with `tc ... tbf rate
%(rate)s`, then unshaped. nbd-pull (4 connections) makes a copy from each
(first pull); then 1 %% of the bytes change in scattered 4 KiB writes,
seeded, and each copy is refreshed. The image is cold before every run;
every copy is checked equal. *Wall*: until the copy is on the disk;
*client CPU*: nbd-pull's user + sys, all threads; *server CPU*:
nbd-server's reaped per-connection children; *on the link*: the
namespace's lo tx_bytes, both directions. One run each. Load average
%(load0)s at the start, %(load1)s at the end."""


def section(r):
    lines = [HEADING, "", INTRO % dict(
        server=r["server"], gib=r["size"] // GiB, data=r["data"] // MiB,
        rate=r["rate"], load0=r["load"][0], load1=r["load"][1]), ""]
    for rate, rows in r["links"]:
        lines += ["| %s | | wall | client CPU | server CPU | on the link |"
                  % ("link " + rate if rate else "unshaped loopback"),
                  "|" + " --- |" * 6]
        for step, kind, x in rows:
            link = x["link"] / MiB
            lines.append("| %s | %s | %.2f s | %.2f s | %.2f s | %s |" % (
                step, kind, x["wall"], x["cpu"], x["server_cpu"],
                "%.0f MiB" % link if link >= 10 else "%.2f MiB" % link))
        lines.append("")
    return "\n".join(lines)


def run(size_gib=SIZE, rate=RATE):
    with lab.scratch("nbdsnap-bench-tls-") as folder:
        return section(measure(folder, size_gib, rate))


if __name__ == "__main__":
    import sys
    print(run(int(sys.argv[1]) if len(sys.argv) > 1 else SIZE))
