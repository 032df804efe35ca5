"""Benchmarks: our hooks against the original recipe's virsh hooks.

    make bench       (or: .venv/bin/python -m lab.bench [--reps N] [--idle N])
    .venv/bin/python -m lab.bench hooks      (one part: its section only)
    .venv/bin/python -m lab.bench manifest [--size GIB]
    .venv/bin/python -m lab.bench client [--client-size GIB]
    .venv/bin/python -m lab.bench pull [--pull-size GIB]
    .venv/bin/python -m lab.bench tls [--tls-size GIB]

One domain, one nbd-server exporting its base as "ours" (our hooks), "virsh"
(docs/DESIGN.md's recipe) and "plain" (no hooks); the two recipes alternate in
one run.  Prints the tables and rewrites BENCHMARKS.md, whose text says what is
measured.  Times are reported, never asserted.
"""

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import lab
from lab import (bench_client, bench_hooks, bench_manifest, bench_pull,
                 bench_quiesce, bench_tls, bench_verify)

MiB = 1 << 20
SIZE = 512          # MiB, the exported raw base
WRITTEN = 256       # MiB the guest writes during one freeze
PIECE = 4           # MiB per guest write
TARGET = "vda"
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "BENCHMARKS.md")
KINDS = ("ours", "virsh")


def domain_name(folder):
    return "nbdsnap-bench-" + os.path.basename(folder)[-6:]


class Rig:
    """The domain, its base and the nbd-server with three exports of it."""

    def __init__(self, virt, folder):
        self.folder = folder
        self.base = lab.make_image(os.path.join(folder, "base.raw"), SIZE)
        self.name = domain_name(folder)
        self.dom = virt.define(self.name, [lab.disk_xml(self.base, TARGET)])
        self.sessions = os.path.join(folder, "state", "sessions")
        config = lab.write_config(
            os.path.join(folder, "nbdsnap.conf"), os.path.join(folder, "state"),
            os.path.join(folder, "overlays"), quiesce="off")
        self.env = {"NBDSNAP_CONFIG": config, "LIBVIRT_DEFAULT_URI": lab.URI}
        self.overlay = os.path.join(folder, self.name + "-nbd-snap")
        self.virsh = {   # the recipe, for this domain, disk and folder
            "prerun": '/usr/bin/virsh snapshot-create-as --domain "%s" '
                      '"%s-nbd-snap" --diskspec "%s",file="%s" --disk-only '
                      '--atomic --no-metadata'
                      % (self.name, self.name, TARGET, self.overlay),
            "postrun": "/bin/sh -c '/usr/bin/virsh blockcommit \"%s\" \"%s\" "
                       "--active --pivot && rm %s'"
                       % (self.name, TARGET, self.overlay)}
        self.server = virt.nbd_server(folder, {
            "ours": (self.base, None), "virsh": (self.base, self.virsh),
            "plain": (self.base, {"prerun": "", "postrun": ""})}, self.env)

    def wait_committed(self, kind):
        """Until the domain runs on its base and no session/overlay is left."""
        def done():
            gone = (not os.path.exists(self.overlay) if kind == "virsh" else
                    not (os.path.isdir(self.sessions)
                         and os.listdir(self.sessions)))
            return gone and lab.disk_source(self.dom, TARGET) == self.base
        lab.wait_until(done, 300, 0.005, "the %s commit" % kind)

    def hooks(self, kind, named=False):
        """The (prerun, postrun) command lines, to run by hand."""
        if kind == "virsh":
            return [["/bin/sh", "-c", self.virsh[h]] for h in self.virsh]
        bin_ = lab.VENV_BIN
        named = ["--domain", self.name, "--disk", TARGET] if named else []
        return ([os.path.join(bin_, "nbd-prerun")] + named + [self.base],
                [os.path.join(bin_, "nbd-postrun"), self.base])


def run_timed(cmd, env=None):
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=dict(os.environ, **(env or {})),
                          capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    if proc.returncode:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(cmd),
                                                proc.returncode, proc.stderr))
    return time.monotonic() - t0


def freeze(rig, kind, pattern=None):
    """One connection: (connect -> first 4 KiB read, disconnect -> commit
    done); with pattern, the guest writes WRITTEN MiB while it is held."""
    t0 = time.monotonic()
    held = lab.HeldConnection(rig.server.port, kind)
    held.read(0, 4096)
    first = time.monotonic() - t0
    for offset in range(0, WRITTEN * MiB if pattern else 0, PIECE * MiB):
        lab.guest_write(rig.dom, TARGET, pattern, offset, PIECE * MiB)
    t1 = time.monotonic()
    held.close()
    rig.wait_committed(kind)
    done = time.monotonic() - t1
    for offset in (0, (WRITTEN - 1) * MiB) if pattern else ():
        if lab.read_range(rig.base, offset, 4096) != bytes([pattern]) * 4096:
            raise RuntimeError("%s commit lost the guest's writes" % kind)
    return first, done


def copy(rig, export):
    """nbdcopy with 4 connections, from its start until the commit is done."""
    t0 = time.monotonic()
    lab.nbdcopy(rig.server.uri(export), "null:", connections=4)
    if export == "ours":
        rig.wait_committed("ours")
    return time.monotonic() - t0


def while_destroying(rig, virt, reps):
    """Each prerun, run by hand while another domain is being destroyed."""
    other = virt.define(rig.name + "-other", [], start=False)
    out = {"ours": [], "ours --domain --disk": [], "virsh": []}
    for _ in range(reps):
        for label in out:
            pre, post = rig.hooks(label.split()[0], named="--" in label)
            other.create()
            stopping = threading.Thread(target=other.destroy)
            stopping.start()
            time.sleep(0.05)
            out[label].append(run_timed(pre, rig.env))
            stopping.join()
            run_timed(post, rig.env)
    return out


def scaling(rig, virt, reps, idle):
    """{domains defined: {named?: [(prerun s, postrun s)]}}: our hooks by
    hand, 2 * reps times, before and after defining idle more domains."""
    rows = {}
    for step in range(2):
        for i in range(idle if step else 0):
            disk = os.path.join(rig.folder, "idle-%03d.raw" % i)
            with open(disk, "wb") as f:
                f.truncate(MiB)
            virt.define("%s-idle-%03d" % (rig.name, i),
                        [lab.disk_xml(disk, TARGET)], start=False)
        rows[len(virt.conn.listAllDomains(0))] = {
            named: [tuple(run_timed(cmd, rig.env)
                          for cmd in rig.hooks("ours", named))
                    for _ in range(2 * reps)] for named in (False, True)}
    return rows


def startup(reps):
    """Process start-up alone, which every hook run pays."""
    probes = [("`virsh --version`", ["virsh", "--version"]),
              ("`python -c pass`", [sys.executable, "-c", "pass"]),
              ("python, importing what a freeze imports (libvirt, lxml)",
               [sys.executable, "-c", "import nbdsnap.hooks.freeze, "
                "nbdsnap.hooks.commit, nbdsnap.hooks.quiesce"])]
    return [(k, [run_timed(v) for _ in range(reps)]) for k, v in probes]


# -- the report ----------------------------------------------------------------

med = statistics.median


def cell(xs):
    return "%.3f s (%.3f–%.3f)" % (med(xs), min(xs), max(xs))


def table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def machine(virt):
    def first_line(*cmd):
        p = subprocess.run(cmd, capture_output=True, text=True)
        return (p.stdout + p.stderr).strip().splitlines()[0]
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    lv = virt.conn.getLibVersion()
    return ", ".join([
        time.strftime("%Y-%m-%d %H:%M %Z"), "%d CPUs" % os.cpu_count(),
        "%d MiB" % mem, "kernel " + os.uname().release,
        "libvirt %d.%d.%d" % (lv // 10**6, lv // 1000 % 1000, lv % 1000),
        first_line("qemu-system-x86_64", "--version"),
        first_line("nbd-server", "-V"),
        "load average %.2f %.2f %.2f at the start" % os.getloadavg()])


REPORT = """\
<!-- Generated by `make bench` (lab/bench.py): do not edit by hand. -->

# Benchmarks

Our hooks against the original recipe's `virsh` hooks (docs/DESIGN.md, without
`--quiesce`) on one software-emulated domain (a %(size)d MiB raw base, no OS),
alternating in one run; median (min–max) of %(reps)d runs. *Connect → first
byte*: from the socket's connect until a first 4 KiB read returns, over one
connection. *Disconnect → commit done*: from close() until the domain's live
disk is the base again and no session (ours) or overlay (virsh) is left. The
guest writes through QEMU's active layer (qemu-io over HMP, %(piece)d MiB
pieces). Copies go to nbdcopy's `null:`. Hooks by hand run with quiesce off.

Machine: %(machine)s.

## Results

%(t_latency)s

%(t_copy)s

Our hooks by hand; all but the benchmark's domain are shut off, each with one
small raw disk:

%(t_scaling)s

%(t_startup)s

## Reading

- **Time.** %(wins)s
- **Freeze.** The snapshot is quick: the recipe's whole prerun, virsh's start
  included, reaches the first byte in %(first_virsh).3f s. Ours needs
  %(min_ours).3f s at best, mostly start-up, which every hook run pays:
  Python and a freeze's imports (libvirt, lxml) take %(python).3f s; a join
  or a leave imports neither ("Hook runs by kind" below).
- **Outliers.** To find the domain behind EXPORT, prerun lists all domains,
  and libvirt's list waits for each domain's lock: while another domain on
  the host is being destroyed (or started), our prerun waits (%(d).3f s).
  `--domain --disk` and the recipe look the domain up by name.
- **Commit.** `virsh blockcommit --pivot` looks at the job, then every 500 ms
  (virshBlockJobWait): an empty overlay is ready at the first look, a longer
  commit waits for the next tick. Ours pivots on libvirt's READY event but
  pays its start-up again.
- **A copy.** nbdcopy opens its 4 connections, and closes them, one after
  another, and nbd-server runs a connection's postrun before it closes the
  socket: all 8 hook runs are in the copy's path (seen with timestamping
  wrappers): (ours − floor) ÷ 8 = %(per_hook).3f s. The recipe refuses it.
- **Many domains.** The first prerun of a freeze reads every domain's XML
  (joins and postrun do not): %(more)d more domains add %(added).3f s to its
  fastest run (%(growth).1f ms a domain). `--domain --disk` does not search.
- **Noise.** %(cpus)d cores, shared with other work (load average %(load)s at
  the end): the minimum is the least disturbed run.
"""


def report(facts, r, reps):
    lat, big, cp, sc, des = (r["latency"], r["commit"], r["copy"],
                             r["scaling"], r["destroying"])
    first, done, big = ({k: [x[i] for x in d[k]] for k in KINDS}
                        for d, i in ((lat, 0), (lat, 1), (big, 1)))

    def row(label, d):
        return [label, cell(d["ours"]), cell(d["virsh"]),
                "%.2f" % (med(d["ours"]) / med(d["virsh"]))]
    few, many = sorted(sc)
    cols = [(False, 0, "`nbd-prerun EXPORT`"), (False, 1, "`nbd-postrun`"),
            (True, 0, "`nbd-prerun --domain --disk`")]
    col = {(n, c): [x[c[1]] for x in sc[n][c[0]]] for n in sc for c in cols}
    search = [min(col[n, cols[0]]) for n in (few, many)]
    wins = [k for k, d in (("connect → first byte", first),
                           ("disconnect → commit done", done),
                           ("the %d MiB commit" % WRITTEN, big))
            if med(d["ours"]) < med(d["virsh"])]
    return REPORT % dict(
        size=SIZE, reps=reps, piece=PIECE, machine=facts,
        t_latency=table(["one connection", "ours", "virsh recipe",
                         "ours ÷ virsh"], [
            row("connect → first byte", first),
            row("disconnect → commit done", done),
            row("disconnect → commit done, %d MiB written" % WRITTEN, big),
            row("prerun by hand, another domain being destroyed", des),
            ["… ours with `--domain --disk`",
             cell(des["ours --domain --disk"]), "", ""]]),
        t_copy=table(["%d MiB, nbdcopy, 4 connections" % SIZE, "time",
                      "÷ no hooks"], [
            ["no hooks (the floor)", cell(cp["plain"]), "1.00"],
            ["ours, until the commit is done", cell(cp["ours"]),
             "%.2f" % (med(cp["ours"]) / med(cp["plain"]))],
            ["virsh recipe", "refused: its second prerun fails", "–"]]),
        t_scaling=table(["domains defined"] + [c[2] for c in cols], [
            [str(n)] + [cell(col[n, c]) for c in cols] for n in (few, many)]
            + [["ratio of medians"] + ["%.2f" % (med(col[many, c])
                                                 / med(col[few, c]))
                                       for c in cols]]),
        t_startup=table(["process start-up only", "time"],
                        [[k, cell(v)] for k, v in r["startup"]]),
        first_virsh=med(first["virsh"]), min_ours=min(first["ours"]),
        python=med(r["startup"][-1][1]), d=med(des["ours"]),
        per_hook=(med(cp["ours"]) - med(cp["plain"])) / 8, few=few, many=many,
        more=many - few, added=search[1] - search[0],
        growth=1000 * (search[1] - search[0]) / (many - few),
        cpus=os.cpu_count(), load="%.2f %.2f %.2f" % os.getloadavg(),
        wins="Ours is faster in: %s." % ", ".join(wins) if wins else
        "The recipe is faster in every row it can run at all; ours wins on "
        "what it cannot do (a multi-connection copy, docs/DESIGN.md's list).")


def main(argv=None):
    p = argparse.ArgumentParser(prog="lab.bench", description=__doc__)
    p.add_argument("--reps", type=int, help="runs per measurement (5; the "
                   "hook runs by kind: %d)" % bench_hooks.REPS)
    p.add_argument("--idle", type=int, default=200,
                   help="shut-off domains to define for the scaling")
    p.add_argument("--output", default=OUT, help="the report (BENCHMARKS.md)")
    p.add_argument("--size", type=int, default=bench_manifest.SIZE,
                   help="GiB of the manifest part's disk (%(default)s)")
    p.add_argument("--client-size", type=int, default=bench_client.SIZE,
                   help="GiB of the client part's export (%(default)s)")
    p.add_argument("--pull-size", type=int, default=bench_pull.SIZE,
                   help="GiB of the pull part's image (%(default)s)")
    p.add_argument("--tls-size", type=int, default=bench_tls.SIZE,
                   help="GiB of the TLS part's image (%(default)s)")
    p.add_argument("part", nargs="?",
                   choices=("all", "hooks", "manifest", "client", "pull",
                            "tls"),
                   default="all", help="all (the default), or one part "
                   "only (the hook runs by kind, the freeze-time "
                   "manifests, the NBD clients on a shaped link, or "
                   "nbd-pull against nbdcopy and rsync, or a pull over "
                   "TLS against plain text), "
                   "rewriting only its section of the report")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))   # clean up too
    lab.ensure_host()
    if args.part == "hooks":
        return one_part(args.output, bench_hooks.run(args.reps
                                                     or bench_hooks.REPS))
    if args.part == "manifest":
        return one_part(args.output, bench_manifest.run(args.size),
                        bench_manifest.HEADING)
    if args.part == "client":
        return one_part(args.output, bench_client.run(args.client_size),
                        bench_client.HEADING)
    if args.part == "pull":
        return one_part(args.output, bench_pull.run(args.pull_size),
                        bench_pull.HEADING)
    if args.part == "tls":
        return one_part(args.output, bench_tls.run(args.tls_size),
                        bench_tls.HEADING)
    args.reps = args.reps or 5
    folder = lab.workdir("nbdsnap-bench-")
    virt = lab.Lab()
    r = {"latency": {k: [] for k in KINDS}, "commit": {k: [] for k in KINDS},
         "copy": {"plain": [], "ours": []}}
    with contextlib.ExitStack() as cleanup:      # last in, first run
        cleanup.callback(lab.cleanup_folder, folder)
        # Again by name: a libvirtd restart meanwhile leaves virt's dead.
        cleanup.callback(lab.remove_domains, domain_name(folder))
        cleanup.callback(virt.close)
        for sig in (signal.SIGINT, signal.SIGTERM):   # let cleanup finish
            cleanup.callback(signal.signal, sig, signal.SIG_IGN)
        facts = machine(virt)
        rig = Rig(virt, folder)
        for i in range(args.reps):
            print("run %d of %d" % (i + 1, args.reps), flush=True)
            order = 1 if i % 2 == 0 else -1
            for kind in KINDS[::order]:
                r["latency"][kind].append(freeze(rig, kind))
                r["commit"][kind].append(freeze(rig, kind, 0x10 + 2 * i
                                                + (kind == "virsh")))
            for export in ("plain", "ours")[::order]:
                r["copy"][export].append(copy(rig, export))
        print("prerun while another domain is destroyed", flush=True)
        r["destroying"] = while_destroying(rig, virt, args.reps)
        r["startup"] = startup(args.reps)
        print("scaling: %d more shut-off domains" % args.idle, flush=True)
        r["scaling"] = scaling(rig, virt, args.reps, args.idle)
        print("nbd-verify against sha256sum, openssl, b3sum, cmp, nbdcopy",
              flush=True)
        verify_section = bench_verify.run()
        print("quiesced freezes on the lab guest", flush=True)
        quiesce_section = bench_quiesce.run(args.reps)
        print("hook runs by kind", flush=True)
        hooks_section = bench_hooks.run(max(args.reps, bench_hooks.REPS))
        print("freeze-time manifests, incremental against full", flush=True)
        manifest_section = bench_manifest.run(args.size)
        print("NBD clients on a shaped link", flush=True)
        client_section = bench_client.run(args.client_size)
        print("nbd-pull against nbdcopy and rsync", flush=True)
        pull_section = bench_pull.run(args.pull_size)
        print("a pull over TLS against plain text", flush=True)
        tls_section = bench_tls.run(args.tls_size)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    text = (report(facts, r, args.reps) + "\n" + verify_section + "\n"
            + quiesce_section + "\n" + hooks_section + "\n"
            + manifest_section + "\n" + client_section + "\n"
            + pull_section + "\n" + tls_section)
    with open(args.output, "w") as f:
        f.write(text)
    print(text + "\nwritten to %s" % args.output)


def one_part(output, section, heading="## Hook runs by kind"):
    """Rewrite only section's part of the report, keep the rest."""
    try:
        with open(output) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    text = bench_hooks.splice(text, section, heading)
    with open(output, "w") as f:
        f.write(text)
    print(section + "\nwritten to %s" % output)


if __name__ == "__main__":
    main()
