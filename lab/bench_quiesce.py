"""Benchmark of quiesced freezes: how long the guest's writes are held.

Part of `make bench` (lab/bench.py writes its section into BENCHMARKS.md);
alone: .venv/bin/python -m lab.bench_quiesce.  Issue 6: a quiesced freeze
pauses the guest's writes while libvirt takes the snapshot.

On the lab guest (lab/guest.py: a real qemu-guest-agent, a writer without
pause on its ext4 data disk), REPS freezes with quiesce = require and REPS
with quiesce = off, alternating, each the hooks run by hand: nbd-prerun
EXPORT, then nbd-postrun EXPORT.  The guest's fsfreeze hook logs its uptime
at "freeze" (before the agent freezes /data) and "thaw" (after it thaws),
read through the agent after each freeze.  Times are reported, never
asserted.
"""

import os
import re
import statistics
import subprocess
import time

import lab
from lab import guest as lab_guest

REPS = 5
POLICIES = ("require", "off")
HOOK_LOG = "/run/fsfreeze.log"
LINE = re.compile(r"fsfreeze-hook (freeze|thaw) at ([0-9.]+)")


def hook(name, export, env):
    """Wall time of one hook run by hand, as nbd-server would run it."""
    started = time.monotonic()
    proc = subprocess.run([os.path.join(lab.VENV_BIN, name), export],
                          env=dict(os.environ, **env), capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    if proc.returncode:
        raise RuntimeError("%s %s: exit %d: %s" % (name, export,
                                                   proc.returncode,
                                                   proc.stderr))
    return time.monotonic() - started


def pauses(log):
    """[thaw − freeze uptime] of each freeze/thaw pair in the hook's log."""
    events = LINE.findall(log)
    if [e for e, _ in events] != ["freeze", "thaw"] * (len(events) // 2):
        raise RuntimeError("the guest's fsfreeze log is not freeze/thaw "
                           "pairs:\n%s" % log)
    return [float(events[i + 1][1]) - float(events[i][1])
            for i in range(0, len(events), 2)]


def measure(folder, reps=REPS):
    """{"pause": [s], "prerun": {policy: [s]}, "postrun": {policy: [s]}}"""
    name = "nbdsnap-bench-qga-" + os.path.basename(folder)[-6:]
    data = lab_guest.make_data_disk(os.path.join(folder, "data.raw"))
    config = os.path.join(folder, "nbdsnap.conf")
    env = {"NBDSNAP_CONFIG": config, "LIBVIRT_DEFAULT_URI": lab.URI}
    r = {"pause": [], "prerun": {p: [] for p in POLICIES},
         "postrun": {p: [] for p in POLICIES}}
    virt = lab.Lab()
    try:
        guest = lab_guest.define_guest(virt, folder, name, data)
        dom = guest.dom
        lab.wait_until(lambda: int(lab_guest.guest_control(dom, "written"))
                       >= 20, 60, what="the guest's writer to finish 20 files")
        for i in range(reps):
            print("quiesce: run %d of %d" % (i + 1, reps), flush=True)
            for policy in POLICIES[::1 if i % 2 == 0 else -1]:
                lab.write_config(config, os.path.join(folder, "state"),
                                 os.path.join(folder, "overlays"),
                                 quiesce=policy)
                r["prerun"][policy].append(hook("nbd-prerun", data, env))
                r["postrun"][policy].append(hook("nbd-postrun", data, env))
                if policy == "require":
                    r["pause"].append(pauses(lab_guest.agent_read_file(
                        dom, HOOK_LOG))[-1])
        # quiesce = off never froze: one pair per quiesced freeze.
        if len(pauses(lab_guest.agent_read_file(dom, HOOK_LOG))) != reps:
            raise RuntimeError("the guest was frozen other than by the "
                               "%d quiesced freezes" % reps)
    finally:
        lab.remove_domains(name)      # a new connection: survives libvirtd
        virt.close()
    return r


def cell(xs):
    return "%.0f ms (%.0f–%.0f)" % (1000 * statistics.median(xs),
                                    1000 * min(xs), 1000 * max(xs))


def section(r, reps=REPS):
    med = statistics.median
    extra = med(r["prerun"]["require"]) - med(r["prerun"]["off"])
    lines = [
        "## Quiesced freezes",
        "",
        "The lab guest (Debian's kernel under software emulation, a real "
        "qemu-guest-agent) writes files without pause to its ext4 data "
        "disk while the hooks are run by hand on it: nbd-prerun EXPORT, "
        "then nbd-postrun EXPORT, %d times with `quiesce = require` and %d "
        "with `quiesce = off`, alternating; median (min–max). The guest's "
        "write pause is its uptime at the agent's fsfreeze hook `thaw` "
        "(run after the thaw) minus that at `freeze` (run before the "
        "freeze): an upper bound, the hook's own runs included, to the "
        "10 ms of /proc/uptime." % (reps, reps),
        "",
        "| one freeze | quiesce = require | quiesce = off |",
        "| --- | --- | --- |",
        "| guest writes held (thaw − freeze, guest uptime) | %s | none: "
        "no freeze |" % cell(r["pause"]),
        "| nbd-prerun wall time | %s | %s |" % (cell(r["prerun"]["require"]),
                                               cell(r["prerun"]["off"])),
        "| nbd-postrun wall time | %s | %s |" % (
            cell(r["postrun"]["require"]), cell(r["postrun"]["off"])),
        "",
        "For an operator: a quiesced freeze holds the guest's writes for "
        "about %.0f ms (at most %.0f ms here), and its nbd-prerun takes "
        "%.0f ms longer than a crash-consistent one, which holds none. The "
        "commit (nbd-postrun) involves no agent: %.0f ms against %.0f ms."
        % (1000 * med(r["pause"]), 1000 * max(r["pause"]), 1000 * extra,
           1000 * med(r["postrun"]["require"]),
           1000 * med(r["postrun"]["off"])),
    ]
    return "\n".join(lines) + "\n"


def run(reps=REPS):
    with lab.scratch("nbdsnap-bench-quiesce-") as folder:
        return section(measure(folder, reps), reps)


if __name__ == "__main__":
    print(run())
