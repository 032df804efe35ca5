"""nbdsnap metrics: the VM host's state as node_exporter textfile metrics.

build() is pure: from what status.collect() and history.read() give, the
metric families (verify/textfile.py renders them).  Ages are written
twice: as an age at the time of writing, and as the time it started
(a Unix timestamp), because a textfile is read long after it was written
and ``time() - nbdsnap_freeze_oldest_start_timestamp_seconds`` stays
true between two writes.
"""

import logging
import os
import time

from nbdsnap.verify import textfile
from nbdsnap.verify.textfile import Family, render

from . import sessions

log = logging.getLogger(__name__)

VERDICTS = (sessions.LIVE, sessions.STALE, sessions.BROKEN, "corrupt",
            "orphan")


def build(entries, past, now):
    """Families from status entries, history lines (oldest first), now."""
    by_verdict = dict.fromkeys(VERDICTS, 0)
    for e in entries:
        by_verdict[e["verdict"]] = by_verdict.get(e["verdict"], 0) + 1
    frozen = [e for e in entries if e.get("created") is not None
              and e["phase"] not in ("corrupt", "orphan")]
    oldest = min((e["created"] for e in frozen), default=None)
    last = {}
    for line in past:
        last[line["export"]] = line         # the newest wins
    broken = {e["export"] for e in entries
              if e["verdict"] == sessions.BROKEN and e.get("export")}
    exports = sorted(set(last) | broken)
    return [
        Family("sessions", "gauge", "Sessions and orphaned overlays by "
               "verdict (live, stale, failed, corrupt, orphan).",
               [({"verdict": v}, n) for v, n in sorted(by_verdict.items())]),
        Family("freeze_oldest_age_seconds", "gauge",
               "Age of the oldest session when written, 0 when none.",
               [({}, 0 if oldest is None else round(now - oldest, 1))]),
        Family("freeze_oldest_start_timestamp_seconds", "gauge",
               "When the oldest session began (absent when none).",
               [({}, oldest)]),
        Family("overlay_bytes", "gauge",
               "Bytes allocated by each overlay (orphans' export is empty).",
               [({"export": e.get("export") or "", "overlay": e["overlay"]},
                 e.get("overlay_bytes"))
                for e in entries if e.get("overlay")]),
        Family("last_commit_seconds", "gauge",
               "Seconds the export's last commit took.",
               [({"export": x}, last[x].get("commit_seconds"))
                for x in exports if x in last]),
        Family("last_session_end_timestamp_seconds", "gauge",
               "When the export's last session ended.",
               [({"export": x}, last[x].get("end"))
                for x in exports if x in last]),
        Family("last_session_result", "gauge",
               "1, labelled with how the export's last session ended.",
               [({"export": x, "result": last[x].get("result") or ""}, 1)
                for x in exports if x in last]),
        Family("last_commit_ok", "gauge",
               "0 while a commit of the export failed and awaits "
               "'nbdsnap recover', else 1.",
               [({"export": x}, 0 if x in broken else 1) for x in exports]),
        Family("metrics_timestamp_seconds", "gauge",
               "When these metrics were written.", [({}, round(now, 3))]),
    ]


def write_configured(config):
    """After a hook run: rewrite the configured metrics_file, if any.
    Never fails the hook: a copy must not be refused, nor a commit left
    for recovery, for a metrics file; what went wrong is a warning."""
    path = config.metrics_file
    if not path:
        return
    try:
        if not os.path.isabs(path):
            raise ValueError("metrics_file must be an absolute path")
        textfile.write(path, text(config))
    except Exception as e:      # noqa: BLE001 -- see the docstring
        log.warning("cannot write the metrics to %s: %s", path,
                    getattr(e, "strerror", None) or e)


def text(config, now=None):
    """The metrics of this host now (no libvirt: nothing here needs it)."""
    from . import history, status
    now = time.time() if now is None else now
    return render(build(status.collect(config, now=now),
                        history.read(config), now))
