"""Benchmark: which NBD client nbd-pull should use, on a link of a real speed.

Part of `make bench` (lab/bench.py writes its section into BENCHMARKS.md);
alone: .venv/bin/python -m lab.bench client [--client-size GIB].

nbd-pull reads changed blocks from a VM host's nbd-server over the network.
Its client is either ours (verify/nbd.py: pure Python, read_into()
pipelines 16 × 2 MiB requests on one connection) or libnbd's Python binding
(python3-libnbd, nbdcopy's library: aio_pread with many requests in flight,
TLS).  A plain nbd-server (no hooks, read-only) serves SIZE GiB of random
data inside a network namespace of its own (lab/netns.py), its loopback
shaped to 1 Gbit/s, then again unshaped; each case runs inside it as a
process of its own (lab/nbd_readers.py), the file dropped from the page
cache before it (bench_manifest.evict):

- the whole export: ours and libnbd, 1 and 4 connections (4 threads, each
  its own connection and quarter); nbdcopy to null: with 4 connections;
- scattered: FRACTION of the 64 KiB blocks at seeded random offsets, in
  offset order, one block per request: ours one request at a time (a
  simple changed-block loop), libnbd with many in flight;
- TLS: the whole export through libnbd over nbds:// (a CA, server and
  client certificate made with openssl in a temporary folder, removed
  afterwards), force_tls on the export.

Per case: wall seconds, MiB/s, the client's CPU seconds (user + sys, all
threads) per GiB read, the server's (nbd-server's per-connection children,
reaped) per GiB, and the bytes the namespace's loopback carried.  One run
each; times are reported, never asserted.
"""

import json
import os
import random
import resource
import subprocess
import sys
import time

import lab
from lab.bench_manifest import evict, random_image
from lab.netns import ShapedLink

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZE = 2            # GiB, the default
RATE = "1gbit"
BLOCK = 64 * KiB
FRACTION = 0.01
SEED = 20
HEADING = "## NBD clients on a link of a real speed"
READERS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "nbd_readers.py")
PLAIN = {"prerun": "", "postrun": ""}


def libnbd_python():
    """A Python that can import libnbd's binding (Debian's python3-libnbd),
    or None: the venv's own, else the system's (`make venv` makes a venv
    without system site packages)."""
    for python in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(python) and subprocess.run(
                [python, "-c", "import nbd"], capture_output=True).returncode \
                == 0:
            return python
    return None


def scattered_offsets(size, fraction, rng, block=BLOCK):
    """Sorted block-aligned offsets of fraction of size's blocks."""
    blocks = size // block
    return sorted(b * block for b in rng.sample(range(blocks),
                                                round(blocks * fraction)))


def make_certs(folder):
    """A CA, a server certificate for 127.0.0.1 and a client certificate,
    in folder under the names libnbd's tls-certificates=DIR looks for."""
    def openssl(*args):
        subprocess.run(["openssl"] + list(args), cwd=folder, check=True,
                       capture_output=True, timeout=60)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=nbdsnap bench CA", "-keyout", "ca-key.pem",
            "-out", "ca-cert.pem")
    for who, subject in (("server", "/CN=127.0.0.1"),
                         ("client", "/CN=nbdsnap-bench-client")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
                "-addext", "subjectAltName=IP:127.0.0.1",
                "-keyout", who + "-key.pem", "-out", who + ".csr")
        openssl("x509", "-req", "-in", who + ".csr", "-CA", "ca-cert.pem",
                "-CAkey", "ca-key.pem", "-CAcreateserial", "-days", "2",
                "-copy_extensions", "copy", "-out", who + "-cert.pem")
    return folder


def server_cpu(server):
    """CPU seconds of nbd-server and its reaped children (each connection
    is a child process), after the last connection's child is gone."""
    lab.wait_until(lambda: not server.children(), 30, 0.02,
                   "nbd-server's connections to end")
    with open("/proc/%d/stat" % server.pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def one_case(link, server, image, cmd):
    """Run cmd inside link, image cold: its numbers and the link's bytes."""
    evict(image)
    tx0, srv0 = link.tx_bytes(), server_cpu(server)
    ru0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    proc = link.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True, check=False, timeout=1800)
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError("%s: exit %d: %s" % (
            " ".join(cmd[:4]), proc.returncode,
            (proc.stderr.strip().splitlines() or [""])[-1]))
    r = {"wall": wall, "cpu": (ru1.ru_utime - ru0.ru_utime)
         + (ru1.ru_stime - ru0.ru_stime)}
    if proc.stdout.strip():     # a reader's own numbers: its start-up left out
        r.update(json.loads(proc.stdout))
    r["server_cpu"] = server_cpu(server) - srv0
    r["link"] = link.tx_bytes() - tx0
    return r


def measure_link(folder, image, rate, offsets, py_nbd, certs):
    """{label: numbers} for every case on one link (rate None: unshaped)."""
    rows = []
    with ShapedLink(rate) as link:
        servers = []
        try:
            keys = {"certfile": os.path.join(certs, "server-cert.pem"),
                    "keyfile": os.path.join(certs, "server-key.pem"),
                    "cacertfile": os.path.join(certs, "ca-cert.pem")}
            for name, generic, extra in (
                    ("plain", None, PLAIN),
                    ("tls", keys, dict(PLAIN, force_tls="true"))):
                sub = os.path.join(folder, "%s-%s" % (name, link.name))
                os.mkdir(sub)
                servers.append(lab.NbdServer(sub, {"disk": (image, extra)},
                                             {}, wrap=link.argv([]),
                                             generic=generic))
                servers[-1].start()
            plain, tls = servers
            uri = plain.uri("disk")
            ours = [sys.executable, READERS, "ours"]
            libnbd = [py_nbd, READERS, "libnbd"] if py_nbd else None
            cases = [("ours", 1, plain, ours + ["whole", uri, "1"]),
                     ("ours", 4, plain, ours + ["whole", uri, "4"]),
                     ("libnbd", 1, plain, libnbd and libnbd
                      + ["whole", uri, "1"]),
                     ("libnbd", 4, plain, libnbd and libnbd
                      + ["whole", uri, "4"]),
                     ("nbdcopy to null:", 4, plain,
                      ["nbdcopy", "--connections=4", "--threads=4", uri,
                       "null:"])]
            tls_uri = "nbds://127.0.0.1:%d/disk?tls-certificates=%s" % (
                tls.port, certs)
            cases += [("libnbd, TLS", n, tls, libnbd and libnbd
                       + ["whole", tls_uri, str(n)]) for n in (1, 4)]
            scatter = ["scattered", uri, str(BLOCK)] + [str(o)
                                                        for o in offsets]
            cases += [("ours, scattered, one at a time", 1, plain,
                       ours + scatter),
                      ("ours, scattered, read_many (nbd-pull's)", 1, plain,
                       ours + ["scattered-many"] + scatter[1:]),
                      ("libnbd, scattered, many in flight", 1, plain,
                       libnbd and libnbd + scatter)]
            for label, conns, server, cmd in cases:
                print("client: %s, %s, %d connection(s)" % (
                    rate or "unshaped", label, conns), flush=True)
                r = one_case(link, server, image, cmd) if cmd else None
                rows.append((label, conns, r))
        finally:
            for server in servers:
                server.stop()
    return rows


def measure(folder, size_gib=SIZE, rate=RATE):
    size = size_gib * GiB
    print("client: %d GiB of random data" % size_gib, flush=True)
    image = random_image(os.path.join(folder, "disk.raw"), size)
    offsets = scattered_offsets(size, FRACTION, random.Random(SEED))
    py_nbd = libnbd_python()
    certs = os.path.join(folder, "certs")     # removed with folder
    os.mkdir(certs, 0o700)
    make_certs(certs)
    r = {"size": size, "rate": rate, "blocks": len(offsets),
         "python": py_nbd, "server": _version(),
         "load": ["%.2f %.2f %.2f" % os.getloadavg()]}
    r["links"] = [(x, measure_link(folder, image, x, offsets, py_nbd, certs))
                  for x in (rate, None)]
    r["load"].append("%.2f %.2f %.2f" % os.getloadavg())
    return r


# -- the report ----------------------------------------------------------------

INTRO = """\
Which NBD client nbd-pull should use (lab/bench_client.py): a plain
nbd-server %(server)s (no hooks, read-only) serves %(gib)d GiB of random data
inside a network namespace of its own whose loopback is shaped with `tc
qdisc ... tbf rate %(rate)s burst 512kb latency 100ms`, then unshaped; each
client runs inside it as a process of its own. Before each case the file
leaves the page cache (POSIX_FADV_DONTNEED): nbd-server reads it from the
disk. *Ours*: verify/nbd.py's Client, read_into() of 8 MiB pieces (16 × 2
MiB requests in flight); 4 connections are 4 threads, each its own Client
and quarter. *libnbd*: python3-libnbd (run by %(python)s), aio_pread of 2
MiB with 32 in flight per connection, buffers reused. *nbdcopy*:
`--connections=4 --threads=4 URI null:`. *Scattered*: %(blocks)d of the 64
KiB blocks (1 %%), seeded, in offset order, one block per request: ours
one at a time (read_into) and all in one read_many() (16 in flight, as
nbd-pull reads), libnbd with many in flight. *TLS*:
nbds:// with certificates made by openssl for the run, force_tls on the
export. Wall and client CPU (user + sys, all threads) are measured in the
reader around the read (nbdcopy's: its whole process); *server CPU*:
nbd-server's reaped per-connection children (it grows with a read's
duration, not only with its bytes: compare 1 and 4 connections unshaped);
*on the link*: the namespace's lo tx_bytes, both directions, headers
included. One run each. Load average %(load0)s at the start, %(load1)s at
the end."""


def _row(label, conns, r, size):
    if r is None:
        return [label, str(conns)] + ["python3-libnbd is not importable "
                                      "(tools/setup-host installs it)"] \
            + [""] * 5
    read = r.get("bytes", size)
    gib = read / GiB
    return [label, str(conns), "%.2f s" % r["wall"],
            "%.0f" % (read / MiB / r["wall"]),
            "%.2f" % (r["cpu"] / gib), "%.2f" % (r["server_cpu"] / gib),
            "%.0f MiB" % (r["link"] / MiB) if r["link"] >= 10 * MiB
            else "%.2f MiB" % (r["link"] / MiB),
            "%.3f" % (r["link"] / read)]


def section(r):
    lines = [HEADING, "", INTRO % dict(
        server=r["server"], gib=r["size"] // GiB, rate=r["rate"],
        python=r["python"] or "not importable", blocks=r["blocks"],
        load0=r["load"][0], load1=r["load"][1]), ""]
    for rate, rows in r["links"]:
        lines += ["| %s | connections | wall | MiB/s | client CPU s/GiB | "
                  "server CPU s/GiB | on the link | link ÷ read |"
                  % ("link " + rate if rate else "unshaped loopback"),
                  "|" + " --- |" * 8]
        lines += ["| " + " | ".join(_row(label, conns, x, r["size"])) + " |"
                  for label, conns, x in rows]
        scattered = [(label.split(", ", 2)[0] + ", "
                      + label.split(", ", 2)[2], x)
                     for label, _, x in rows if "scattered" in label]
        if all(x for _, x in scattered):
            each = ["%s %.2f ms a block" % (name,
                                            1000 * x["wall"] / r["blocks"])
                    for name, x in scattered]
            lines += ["", "Scattered, %s: %s." % (rate or "unshaped",
                                                  "; ".join(each))]
        lines.append("")
    return "\n".join(lines)


def _version():
    p = subprocess.run(["nbd-server", "-V"], capture_output=True, text=True)
    out = (p.stdout + p.stderr).split()
    return out[-1] if out else ""


def run(size_gib=SIZE, rate=RATE):
    with lab.scratch("nbdsnap-bench-client-") as folder:
        return section(measure(folder, size_gib, rate))


if __name__ == "__main__":
    print(run(int(sys.argv[1]) if len(sys.argv) > 1 else SIZE))
