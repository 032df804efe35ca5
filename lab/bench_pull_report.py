"""lab/bench_pull.py's aims and its section of BENCHMARKS.md (pure).

The aims for nbd-pull, on the link (rows from bench_pull.Bench.timed):

    (a) link bytes   <= AIM_LINK × (changed blocks × 64 KiB + manifest read)
    (b) incremental  <  AIM_SHARE × nbdcopy full's seconds (the faster one)
    (c) first full   <= AIM_FULL × the first nbdcopy full's seconds

"Changed blocks" are counted from the bench's own writes (the image's
non-zero blocks for a first pull), not taken from nbd-pull, whose
blocks_fetched is checked against them; the manifest's bytes are its
bytes_read less the blocks it fetched.
"""

import math
import re

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BLOCK = 64 * KiB
AIM_LINK = 1.25
AIM_SHARE = 0.10
AIM_FULL = 1.05
HEADING = "## nbd-pull against nbdcopy and rsync"


def pull_aims(row, nbdcopy_first, nbdcopy_best, block=BLOCK):
    """The aims for one nbd-pull row, computed."""
    j = row["json"]
    manifest = j["bytes_read"] - j["blocks_fetched"] * block
    need = row["changed"] * block + manifest
    a = {"manifest": manifest, "need": need, "ratio": row["link"] / need,
         "link_met": row["link"] <= AIM_LINK * need,
         "fetched_right": j["blocks_fetched"] == row["changed"]}
    if j["kind"] == "full":
        a.update(limit=AIM_FULL * nbdcopy_first,
                 time_met=row["seconds"] <= AIM_FULL * nbdcopy_first)
    else:
        a.update(limit=AIM_SHARE * nbdcopy_best,
                 time_met=row["seconds"] < AIM_SHARE * nbdcopy_best)
    return a


def rate_bytes(rate):
    """tc's "1gbit", "100mbit", "500kbit" in bytes per second."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate)
    if not m:
        raise ValueError("not a tc rate: %r" % rate)
    return float(m.group(1)) * 1000 ** " kmg".index(m.group(2) or " ") / 8


def _mib(n):
    return "%.0f MiB" % (n / MiB) if n >= 10 * MiB else "%.2f MiB" % (n / MiB)


def _met(ok):
    return "met" if ok else "**MISSED**"


INTRO = """\
nbd-pull (pull/) against what one would otherwise run to keep a copy of a
%(gib)d GiB disk image, in one run (lab/bench_pull.py), inside a network
namespace whose loopback is shaped to %(rate)s (`tc ... tbf`, lab/netns.py).
The VM host's side: a plain read-only nbd-server %(server)s (no hooks)
serving IMAGE as "d" and its v2 manifest (`nbd-verify digest
--manifest-version 2`, the format the hooks write; made again after each
change, untimed) as "d.manifest"; an rsync daemon (%(rsync)s, a read-only
module on IMAGE's folder). IMAGE: random data, %(zeros)d %% of it zero 1
MiB regions (holes). *nbdcopy*: `--connections=4 --threads=4 nbd://...
COPY` into a new file each time (nbd-server 3.24 has no block status: it
reads the zeros too). *nbd-pull*: `--json`, 4 connections, the copy's
record trusted after the first pull. *rsync*: `rsync --inplace
--no-whole-file rsync://.../IMAGE COPY`, its own copy. Change A: %(writes)d
seeded 4 KiB writes of random data at random offsets (1 %% of the bytes);
change B: 1 %% of the 64 KiB blocks rewritten whole. Before each run IMAGE
leaves the page cache (POSIX_FADV_DONTNEED; the copies stay as they were).
*Seconds*: the command's wall time plus an fsync of its copy afterwards
(nbd-pull fsyncs by itself; nbdcopy and rsync leave the page cache
dirty). *On the link*: the namespace's lo tx_bytes, both directions,
headers included. *Changed*: the 64 KiB blocks the step's writes changed
(the image's non-zero blocks for a first copy), × 64 KiB. Each copy is
compared with IMAGE (sha256) after its run. One run each. Load average
%(load0)s at the start, %(load1)s at the end."""


def _table(rows):
    lines = ["| step | tool | seconds | of which fsync after | on the link | "
             "link ÷ changed | copy = IMAGE | copy allocated |",
             "|" + " --- |" * 8]
    for x in rows:
        lines.append("| %s | %s | %.2f s | %.2f s | %s | %.3f | %s | %s |" % (
            x["step"], x["tool"], x["seconds"], x["flush"], _mib(x["link"]),
            x["link"] / (x["changed"] * BLOCK), "yes" if x["equal"]
            else "**NO**", _mib(x["allocated"])))
    return lines


def _verdicts(r, rows):
    copies = [x for x in rows if x["tool"].startswith("nbdcopy")]
    first, best = copies[0]["seconds"], min(x["seconds"] for x in copies)
    rate = rate_bytes(r["rate"])
    out = []
    for x in rows:
        if not x["tool"].startswith("nbd-pull"):
            continue
        a, j = pull_aims(x, first, best), x["json"]
        line = ("- **%s, %s**: (a) %s on the link, %.3f × the %d changed "
                "blocks (%s) and %s of manifest read (aim ≤ %.2f: %s); "
                "blocks_fetched %d%s. " % (
                    x["step"], j["kind"], _mib(x["link"]), a["ratio"],
                    x["changed"], _mib(x["changed"] * BLOCK),
                    _mib(a["manifest"]), AIM_LINK, _met(a["link_met"]),
                    j["blocks_fetched"], "" if a["fetched_right"]
                    else " (**not** the %d blocks that changed)"
                    % x["changed"]))
        if j.get("why_scan"):
            line += "It read its copy again: %s. " % j["why_scan"]
        if j["kind"] == "full":
            line += ("(c) %.2f s against the first nbdcopy's %.2f s (aim ≤ "
                     "%.2f s: %s); its own clock %.2f s." % (
                         x["seconds"], first, a["limit"],
                         _met(a["time_met"]), j["seconds"]))
        else:
            floor = x["changed"] * BLOCK / rate
            line += ("(b) %.2f s against %.2f s allowed (%d %% of nbdcopy's "
                     "faster full, %.2f s): %s; its own clock %.2f s. The "
                     "changed blocks (%.1f %% of the image's) alone take "
                     "%.2f s at %s%s." % (
                         x["seconds"], a["limit"], 100 * AIM_SHARE, best,
                         _met(a["time_met"]), j["seconds"],
                         100 * x["changed"] * BLOCK / r["size"], floor,
                         r["rate"], ": no tool that moves 64 KiB blocks can "
                         "meet (b) here" if floor >= a["limit"] else ""))
        out.append(line)
    return out


def _against_rsync(rows):
    by = {(x["step"], x["tool"].split(",")[0]): x for x in rows}
    out = []
    for step in dict.fromkeys(x["step"] for x in rows):
        p, s = by.get((step, "nbd-pull")), by.get((step, "rsync"))
        if p and s:
            out.append("%s: rsync %.2f s, %s; nbd-pull %.2f s, %s (%.1f × "
                       "faster)" % (step, s["seconds"], _mib(s["link"]),
                                    p["seconds"], _mib(p["link"]),
                                    s["seconds"] / p["seconds"]))
    return out


def section(r):
    rows = r["rows"]
    touched = 1 - math.exp(-BLOCK // (4 * KiB) * 0.01)
    wrong = [x["step"] + ", " + x["tool"] for x in rows if not x["equal"]]
    lines = [HEADING, "", INTRO % dict(
        gib=r["size"] // GiB, rate=r["rate"], server=r["server"],
        rsync=r["rsync"], zeros=round(100 * r["zeros"]), writes=r["writes"],
        load0=r["load"][0], load1=r["load"][1]), ""]
    lines += _table(rows)
    lines += ["", "Aims for nbd-pull:", ""] + _verdicts(r, rows)
    lines += ["- Every copy equals IMAGE after its run." if not wrong else
              "- Copies that do **not** equal IMAGE: %s: the rows are "
              "worthless." % "; ".join(wrong)]
    lines += ["", "Against rsync: " + "; ".join(_against_rsync(rows)) + ".",
              "", "Reading. 1 %% of the bytes in scattered 4 KiB writes "
              "touch about 1 − e^(−16 × 1 %%) ≈ %.0f %% of the 64 KiB "
              "blocks, and each touched block crosses the link whole: "
              "(b) is out of reach for any 64 KiB-block tool there; it is "
              "met or not where 1 %% of the blocks changed (step 3). "
              "rsync reads the whole image on both sides for every "
              "incremental, nbd-pull reads neither (the manifest says "
              "which blocks changed; the copy's record is trusted)."
              % (100 * touched)]
    return "\n".join(lines) + "\n"
