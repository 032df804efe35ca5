"""nbd-pull: refresh copies of frozen exports, moving only what changed.

Argument parsing, what the user sees, exit statuses; the work is in run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import traceback

from nbdsnap.verify import argtypes, nbd, sources
from nbdsnap.verify.errors import Error as VerifyError
from nbdsnap.verify.errors import ManifestError, UnknownExport

from . import (apply, disk, fetch, report, run, source, standby, standby_xml,
               state)

PROG = "nbd-pull"
DONE, NOT_DONE, ERROR = 0, 1, 2

EPILOG = """\
SOURCE is nbd://HOST[:PORT]/EXPORT, or over TLS, in libnbd's form,
nbds://HOST[:PORT]/EXPORT?tls-certificates=DIR (DIR holding ca-cert.pem,
client-cert.pem and client-key.pem): an export that nbd-server serves with
nbdsnap's hooks and digest = on.  Its freeze-time manifest is read from
EXPORT.manifest beside it, with the same query.  COPY is a file (created
if missing) or a block device.  Several SOURCE COPY pairs: every export is
connected before any is read.

exit status:
  0  every COPY equals the frozen base served now
  1  not completed: COPY is still its previous complete version, or the
     next run finishes it (the line says which); run again
  2  usage, configuration or local error (or a bug: NBD_PULL_DEBUG=1
     shows its traceback)

@FILE stands for the arguments in FILE, one a line (an option may have
its value on its line), blank lines and lines starting with # skipped:
nbd-pull@NAME.service runs nbd-pull @/etc/nbdsnap/pull/NAME.args (see
nbd-pull(1)).
"""

log = logging.getLogger(PROG)


class _Parser(argtypes.parser_class(PROG)):
    def convert_arg_line_to_args(self, line):
        return args_of_line(line)


def args_of_line(line: str) -> list:
    """@FILE's line: one argument, so that a path may hold spaces, or an
    option and its value (``--define web1-standby``); # starts a comment
    line."""
    line = line.strip()
    if not line or line.startswith("#"):
        return []
    return line.split(None, 1) if line.startswith("-") else [line]


def _rate(text: str) -> float:
    """100M, 1.5G, 800K, 5000000: bytes per second."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)", text.strip().upper())
    if not m:
        raise ValueError(text)
    value = float(m.group(1)) * 1024 ** " KMG".index(m.group(2) or " ")
    if value <= 0:
        raise ValueError(text)
    return value


_rate.__name__ = "rate"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Refresh copies of frozen exports, "
                "moving only what changed, checked, never half-done.",
                epilog=EPILOG, fromfile_prefix_chars="@",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", nargs="+", metavar="SOURCE COPY",
                   help="an export and the copy it refreshes")
    p.add_argument("-c", "--connections", type=argtypes.positive, default=4,
                   metavar="N", help="connections per export, when the "
                   "server allows several (default %(default)s)")
    p.add_argument("--bwlimit", type=_rate, metavar="RATE",
                   help="at most RATE bytes of blocks per second, all "
                   "connections together; K, M, G suffixes (powers of 1024)")
    p.add_argument("--wait", type=argtypes.seconds, default=1800.0,
                   metavar="SECONDS",
                   help="wait up to SECONDS for the VM host's manifest to be "
                   "complete (default %(default)g)")
    p.add_argument("--rescan", action="store_true",
                   help="read COPY again instead of trusting its record")
    p.add_argument("--state-dir", metavar="DIR",
                   help="keep each COPY's state in DIR (default: beside a "
                   f"file COPY, {state.DEFAULT_DIR} for a block device)")
    p.add_argument("--threads", type=argtypes.positive, default=2, metavar="N",
                   help="threads that hash COPY when it is read again "
                   "(default %(default)s)")
    p.add_argument("--define", metavar="NAME",
                   help="after every pull completed, create or update the "
                   "shut-off standby domain NAME from the frozen domain's "
                   "definition, its disks on the COPYs")
    p.add_argument("--connect", default="qemu:///system", metavar="URI",
                   help="the libvirt of --define (default %(default)s)")
    p.add_argument("--metrics", metavar="FILE",
                   help="after the run, write its COPYs' metrics to FILE "
                   "(atomically, mode 0644) for node_exporter's textfile "
                   "collector; a failure to write it is a warning")
    p.add_argument("--json", action="store_true",
                   help="print the outcome as JSON on stdout")
    p.add_argument("--progress", choices=("auto", "always", "never"),
                   default="auto", help="progress on stderr: auto shows it "
                   "on a terminal (default %(default)s)")
    p.add_argument("--syslog-socket", default="/dev/log", metavar="PATH",
                   help="syslog's socket, used when stderr is no terminal "
                   "(default %(default)s)")
    return p


class Interrupted(Exception):
    """SIGTERM or SIGINT: stop, close every connection cleanly."""

    def __init__(self, signum):
        super().__init__(f"stopped by signal {signum}")


def _interrupt(signum, frame):
    raise Interrupted(signum)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.pairs) % 2:
        build_parser().error("SOURCE and COPY come in pairs")
    report.setup_logging(log, args.syslog_socket)
    opts = run.Options(connections=args.connections, wait=args.wait,
                       bwlimit=args.bwlimit, state_dir=args.state_dir,
                       rescan=args.rescan, threads=args.threads)
    pairs = list(zip(args.pairs[::2], args.pairs[1::2]))
    show = args.progress == "always" or (args.progress == "auto"
                                         and sys.stderr.isatty())
    outcomes = []
    standby = (args.define, args.connect) if args.define else None
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        # A pull stopped by cron's or an operator's signal still ends its
        # connections with NBD_CMD_DISC (the VM host's freeze ends
        # cleanly); from here on, where it is caught.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _interrupt)
        status = _pull_all(pairs, opts, show, outcomes, standby)
    except Interrupted as e:
        if not any(o.get("error") == str(e) for o in outcomes):
            log.error("%s, between two steps: every copy is as the line "
                      "of its own says, or unchanged", e)
        status = max([NOT_DONE] + [o["status"] for o in outcomes])
    except Exception as e:      # noqa: BLE001 -- a bug, said in one line
        log.error("internal error, please report it: %s: %s "
                  "(NBD_PULL_DEBUG=1 shows where)", type(e).__name__, e)
        if os.environ.get("NBD_PULL_DEBUG"):
            traceback.print_exc()
        status = ERROR
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    if args.metrics:
        _write_metrics(args.metrics, outcomes, opts.state_dir)
    if args.json:
        outcome = {"status": status,
                   "pulls": [o for o in outcomes if "copy" in o]}
        if standby:
            outcome["standby"] = next(
                (o for o in outcomes if "standby" in o), None)
        print(json.dumps(outcome, indent=2))
    return status


def _write_metrics(path, outcomes, state_dir) -> None:
    """The run's metrics to path; never a reason to change the exit
    status: the copies are what they are whether or not it is written."""
    from nbdsnap.verify import textfile

    from . import metrics
    try:
        textfile.write(path, metrics.text(outcomes, state_dir))
    except OSError as e:
        log.warning("cannot write the metrics to %s: %s", path,
                    e.strerror or e)


def _pull_all(pairs, opts, show, outcomes, standby=None) -> int:
    jobs, exports = {}, {}

    def step(pair, fn, *args, **kwargs):
        """fn(*args); a known failure said, recorded, and the pair
        dropped (its job closed)."""
        value = _step(outcomes, pair, fn, *args, job=jobs.get(pair),
                      **kwargs)
        if value is _FAILED and pair in jobs:
            jobs.pop(pair).close()
        return value

    try:
        for pair in pairs:
            job = step(pair, run.Job, *pair, opts)
            if job is not _FAILED:
                jobs[pair] = job
                said = step(pair, job.recover)
                if said and said is not _FAILED:
                    log.warning("%s: %s", pair[1], said)
        # No freeze for a pull that cannot be made.
        for pair in list(jobs):
            step(pair, source.check_served, pair[0])
        # Every export before any read: one freeze holds them all.
        for pair in list(jobs):
            export = step(pair, sources.NbdSource, pair[0], opts.connections)
            if export is not _FAILED:
                exports[pair] = export
        for pair in list(jobs):
            bar = report.Progress(pair[1]) if show else None
            result = step(pair, run.pull, jobs[pair], exports[pair],
                          say=lambda line: log.info("%s", line),
                          progress=bar)
            if bar:
                bar.end()
            if result is not _FAILED:
                log.info("%s", report.summary(result))
                outcomes.append(dict(result._asdict(), status=DONE))
        if standby:
            outcomes.append(_define(*standby, jobs, outcomes))
    finally:
        # A second signal must not cut the goodbyes short.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        for export in exports.values():
            export.close()
        for job in jobs.values():
            job.close()
    return max([DONE] + [o["status"] for o in outcomes])


_FAILED = object()


def _define(name, uri, jobs, outcomes) -> dict:
    """The standby, once every pull completed, from their records."""
    out = {"standby": name, "status": DONE, "notes": []}
    if not jobs or any(o["status"] != DONE for o in outcomes):
        out.update(status=NOT_DONE, error="not every pull completed")
        log.error("standby %s not updated: not every pull completed", name)
        return out
    try:
        copies, xml, origins = [], None, set()
        for job in jobs.values():
            xml, base = standby.frozen_definition(job.folder.record)
            origins.add(standby_xml.origin(xml))
            copies.append(standby_xml.Copy(
                base, os.path.abspath(job.copy),
                "block" if disk.kind(job.copy) == "block" else "file"))
        if len(origins) != 1:
            raise standby_xml.StandbyError(
                "the disks come from different domains: %s" % ", ".join(
                    sorted(n for n, _ in origins)))
        out["notes"] = standby.define(uri, name, xml, copies)
    except (standby.Running, standby_xml.StandbyError, VerifyError,
            disk.DiskError, OSError) as e:
        out.update(status=NOT_DONE if isinstance(e, standby.Running)
                   else ERROR, error=str(e))
        log.error("standby %s: %s", name, e)
        return out
    for note in out["notes"]:
        log.warning("standby %s: %s", name, note)
    log.info("standby %s defined from %s (shut off, autostart off): "
             "failover is 'virsh -c %s start %s'", name,
             origins.pop()[0], uri, name)
    return out


def _step(outcomes, pair, fn, *args, job=None, **kwargs):
    """fn(*args); on a known failure, its line said and recorded, and
    _FAILED returned."""
    uri, copy = pair
    try:
        return fn(*args, **kwargs)
    except _KNOWN as e:
        said = str(e)
        line = f"{said if said.startswith(copy) else copy + ': ' + said} " \
               f"({_copy_state(job, e)})"
        log.error("%s", line)
        outcomes.append({"source": uri, "copy": copy, "status": _status(e),
                         "error": said})
        if isinstance(e, Interrupted):
            raise
        return _FAILED


_KNOWN = (Interrupted, VerifyError, state.StateError, disk.DiskError,
          source.NoManifest, source.Incomplete, fetch.Corrupt,
          apply.JournalError, OSError)


def _status(e) -> int:
    if isinstance(e, (UnknownExport, source.NoManifest)):
        return ERROR                # configuration
    if isinstance(e, (nbd.NbdError, ManifestError, source.Incomplete,
                      fetch.Corrupt, state.Busy, Interrupted, disk.InUse)):
        return NOT_DONE             # the VM host, the network: run again
    return ERROR                    # here: COPY, its folder, a bug


_STATES = {
    "unchanged": "the copy is unchanged",
    "applying": "the copy is being updated: the next run finishes it",
    "part": "the copy is not made yet: the next run resumes",
    "direct": "the copy is incomplete: the next run resumes",
}


def _copy_state(job, e) -> str:
    if isinstance(e, state.Busy):
        return "this run did not touch the copy"
    if job is None:
        return _STATES["unchanged"]
    if job.phase == "unchanged" and job.kind == "missing":
        return "no copy was made"
    return _STATES[job.phase]


if __name__ == "__main__":
    sys.exit(main())
