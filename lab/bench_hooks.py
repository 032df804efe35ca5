"""Benchmark of the hook runs by kind: what each of a copy's 8 runs costs.

Part of `make bench` (lab/bench.py writes its section into BENCHMARKS.md);
alone: .venv/bin/python -m lab.bench hooks, which rewrites only its section.
Issue 9: a 4-connection copy pays 8 hook runs in a row (nbd-server runs a
connection's postrun before it closes the socket, and nbdcopy opens and
closes its connections one after another).

Two holders take turns on one domain, as two connections of one copy do:
A's prerun freezes, B's prerun joins, B's postrun leaves, A's postrun
commits.  A holder is a long-lived process that runs each hook as its child,
as nbd-server's per-connection child does, and times it from start to exit.
Against: a bare `python -I -c pass` (the floor of any Python hook) and the
original recipe's virsh prerun and postrun on the same domain, run by the
same holder through /bin/sh -c, as nbd-server runs a hook.  Times are
reported, never asserted.
"""

import json
import os
import statistics
import subprocess
import sys

import lab

REPS = 7
TARGET = "vda"
KINDS = ("freeze", "join", "leave", "commit")
LABELS = {
    "freeze": "freeze: the first prerun (snapshot)",
    "join": "join: a later prerun of a live freeze",
    "leave": "leave: a postrun that is not the last",
    "commit": "commit: the last postrun (commit, pivot)",
    "python": "`python3 -I -c pass` (Python's start-up alone)",
    "virsh-prerun": "the recipe's prerun (`virsh snapshot-create-as`)",
    "virsh-postrun": "the recipe's postrun (`virsh blockcommit --pivot`, rm)",
}
# summary() of a run before the lazy imports of issue 9, when every hook run
# imported libvirt and lxml: what `section` compares with.
BEFORE_WHEN = ("2026-12-01, 9 rounds, hooks of main at 3b593ef, load "
               "average about 9 on the 2 cores")
BEFORE = {
    "commit": {"wall": [1.0077, 0.4973, 2.036],
              "cpu": [0.2423, 0.1864, 0.2934]},
    "freeze": {"wall": [1.4203, 0.8913, 2.6801],
              "cpu": [0.253, 0.188, 0.2896]},
    "join": {"wall": [0.9523, 0.4516, 1.7438],
            "cpu": [0.2369, 0.1797, 0.283]},
    "leave": {"wall": [0.9778, 0.538, 2.1807],
             "cpu": [0.2239, 0.1696, 0.3188]},
    "python": {"wall": [0.3257, 0.091, 0.4608],
              "cpu": [0.0761, 0.0526, 0.1334]},
    "virsh-postrun": {"wall": [0.3148, 0.1749, 0.8802],
                     "cpu": [0.028, 0.0223, 0.0303]},
    "virsh-prerun": {"wall": [0.2866, 0.2045, 0.5867],
                    "cpu": [0.0247, 0.0208, 0.0282]},
}

# The holder: runs [argv, env] lines as children, answers [status, wall
# seconds, CPU seconds (user + system, its children's included), stderr].
HOLDER = r"""
import json, resource, subprocess, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime
for line in sys.stdin:
    argv, env = json.loads(line)
    c0, t0 = cpu(), time.monotonic()
    p = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=300)
    print(json.dumps([p.returncode, time.monotonic() - t0, cpu() - c0,
                      p.stderr]), flush=True)
"""


class Holder:
    """A process that holds a connection's place and runs its hooks."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", HOLDER],
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, argv, env):
        self.proc.stdin.write(json.dumps([argv, env]) + "\n")
        self.proc.stdin.flush()
        status, wall, cpu, err = json.loads(self.proc.stdout.readline())
        if status:
            raise RuntimeError("%s: exit %d: %s" % (" ".join(argv), status,
                                                    err))
        return wall, cpu

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


def measure(folder, reps=REPS):
    """{kind: [(wall s, CPU s)]}: KINDS, "python", "virsh-pre/postrun"."""
    name = "nbdsnap-bench-hooks-" + os.path.basename(folder)[-6:]
    base = lab.make_image(os.path.join(folder, "base.raw"), 64)
    config = lab.write_config(os.path.join(folder, "nbdsnap.conf"),
                              os.path.join(folder, "state"),
                              os.path.join(folder, "overlays"), quiesce="off")
    env = dict(os.environ, NBDSNAP_CONFIG=config, LIBVIRT_DEFAULT_URI=lab.URI)
    overlay = os.path.join(folder, name + "-nbd-snap")
    virsh_pre = ('/usr/bin/virsh snapshot-create-as --domain "%s" '
                 '"%s-nbd-snap" --diskspec "%s",file="%s" --disk-only '
                 '--atomic --no-metadata' % (name, name, TARGET, overlay))
    virsh_post = ("/bin/sh -c '/usr/bin/virsh blockcommit \"%s\" \"%s\" "
                  "--active --pivot && rm %s'" % (name, TARGET, overlay))
    pre = os.path.join(lab.VENV_BIN, "nbd-prerun")
    post = os.path.join(lab.VENV_BIN, "nbd-postrun")
    r = {k: [] for k in KINDS + ("python", "virsh-prerun", "virsh-postrun")}
    virt = lab.Lab()
    a, b = Holder(), Holder()
    try:
        virt.define(name, [lab.disk_xml(base, TARGET)])
        for i in range(reps):
            print("hooks: run %d of %d" % (i + 1, reps), flush=True)
            r["freeze"].append(a.run([pre, base], env))
            r["join"].append(b.run([pre, base], env))
            r["leave"].append(b.run([post, base], env))
            r["commit"].append(a.run([post, base], env))
            r["python"].append(a.run([sys.executable, "-I", "-c", "pass"],
                                     env))
            r["virsh-prerun"].append(a.run(["/bin/sh", "-c", virsh_pre], env))
            r["virsh-postrun"].append(a.run(["/bin/sh", "-c", virsh_post],
                                            env))
    finally:
        a.close()
        b.close()
        lab.remove_domains(name)
        virt.close()
    return r


def stats(xs):
    """[median, min, max] in seconds."""
    return [round(f(xs), 4) for f in (statistics.median, min, max)]


def ms(m, lo, hi):
    return "%.0f ms (%.0f–%.0f)" % (1000 * m, 1000 * lo, 1000 * hi)


def copy_cost(medians):
    """What a 4-connection copy pays: a freeze, 3 joins, 3 leaves, a commit."""
    return (medians["freeze"] + 3 * medians["join"] + 3 * medians["leave"]
            + medians["commit"])


def summary(r):
    """{kind: {"wall": [median, min, max], "cpu": [...]}}, as BEFORE."""
    return {k: {"wall": stats([w for w, _ in v]),
                "cpu": stats([c for _, c in v])} for k, v in r.items()}


def section(r, reps=REPS, before=None):
    now = summary(r)
    before = BEFORE if before is None else before
    print("summary: %s" % json.dumps(now, sort_keys=True), flush=True)

    def cells(d, k):
        if k not in d:
            return ["", ""]
        return [ms(*d[k]["wall"]), ms(*d[k]["cpu"])]
    rows = ["| %s |" % " | ".join([LABELS[k]] + cells(now, k)
                                  + cells(before, k))
            for k in KINDS + ("python", "virsh-prerun", "virsh-postrun")]
    cost = [copy_cost({k: d[k][m][0] for k in KINDS})
            for d in (now, before) if all(k in d for k in KINDS)
            for m in ("wall", "cpu")]
    lines = [
        "## Hook runs by kind",
        "",
        "Two holders take turns on one software-emulated domain (a 64 MiB "
        "raw base, quiesce off), as two connections of one copy do: A's "
        "prerun freezes, B's prerun joins, B's postrun leaves, A's postrun "
        "commits. Each run is timed by the process that holds the "
        "connection, from its start to its exit, as nbd-server waits for "
        "it: wall time, and CPU time (user + system of the run and its "
        "children; libvirtd's and QEMU's work is not in it), which a busy "
        "machine disturbs far less. %d rounds, median (min–max). *Before*: "
        "the same measurement when every hook run imported libvirt and lxml "
        "(%s)." % (reps, BEFORE_WHEN),
        "",
        "| hook run | wall | CPU | wall, before | CPU, before |",
        "| --- | --- | --- | --- | --- |",
    ] + rows + [""]
    lines.append(
        "A 4-connection copy pays one freeze, 3 joins, 3 leaves and one "
        "commit in a row: %.2f s wall, %.2f s CPU of hook runs" % tuple(
            cost[:2]) + (" (before: %.2f s wall, %.2f s CPU)." % tuple(
                cost[2:]) if len(cost) == 4 else "."))
    return "\n".join(lines) + "\n"


def run(reps=REPS):
    with lab.scratch("nbdsnap-bench-hooks-") as folder:
        return section(measure(folder, reps), reps)


def splice(text, part, heading="## Hook runs by kind"):
    """text with its section under heading replaced by part (or added)."""
    start = text.find(heading)
    if start < 0:
        return text.rstrip("\n") + "\n\n" + part
    end = text.find("\n## ", start + len(heading))
    return text[:start] + part + ("\n" + text[end + 1:] if end >= 0 else "")


if __name__ == "__main__":
    print(run())
