"""nbd-pull --metrics FILE: the clone host's metrics, per COPY of a run.

build() is pure: from each COPY's outcome in this run and its
record.json (state.py: "pulled", when its last complete pull ended), the
metric families that verify/textfile.py renders:

    nbdsnap_pull_last_complete_timestamp_seconds{copy,source}
        when COPY last became equal to a frozen base (from record.json,
        so a failed run still says when the last complete one was)
    nbdsnap_pull_last_complete_age_seconds{copy,source}
        the same as an age when written
    nbdsnap_pull_last_bytes_read{copy,source}
        bytes read from the VM host by this run, when it completed
    nbdsnap_pull_last_seconds{copy,source}   this run's length, completed
    nbdsnap_pull_last_result{copy,source}    this run's exit status for
                                             COPY: 0 done, 1 not done, 2 error
    nbdsnap_pull_last_run_timestamp_seconds{copy,source}
"""

from __future__ import annotations

import calendar
import json
import os
import time
from typing import Optional

from nbdsnap.verify.textfile import Family, render

from . import disk, state


def pulled_time(meta: Optional[dict]) -> Optional[float]:
    """record.json's "pulled" (2026-01-02T03:04:05Z) as a Unix time, or
    None (never pulled whole, only scanned, unreadable)."""
    text = (meta or {}).get("pulled")
    if not isinstance(text, str):
        return None
    try:
        return float(calendar.timegm(time.strptime(text,
                                                   "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def read_meta(copy: str, state_dir: Optional[str]) -> Optional[dict]:
    """COPY's record.json, read without its lock (the run has ended; a
    record.json is replaced whole), or None."""
    try:
        folder = state.folder_for(copy, disk.kind(copy), state_dir)
        with open(os.path.join(folder, "record.json"), "rb") as f:
            meta = json.loads(f.read(1 << 20))
    except (OSError, ValueError, disk.DiskError):
        return None
    return meta if isinstance(meta, dict) else None


def build(outcomes, metas, now: float):
    """Families from this run's outcomes (dicts with copy, source, status,
    and bytes_read and seconds when done) and {copy: record.json}."""
    rows = [o for o in outcomes if "copy" in o]

    def family(name, help_, value):
        return Family("pull_" + name, "gauge", help_, [
            ({"copy": o["copy"], "source": o["source"]}, value(o))
            for o in rows])

    def done(key):
        return lambda o: o.get(key) if o["status"] == 0 else None

    complete = {o["copy"]: pulled_time(metas.get(o["copy"])) for o in rows}
    return [
        family("last_complete_timestamp_seconds",
               "When the copy last became equal to a frozen base.",
               lambda o: complete[o["copy"]]),
        family("last_complete_age_seconds",
               "Seconds since the copy's last complete pull, when written.",
               lambda o: None if complete[o["copy"]] is None
               else round(now - complete[o["copy"]], 1)),
        family("last_bytes_read", "Bytes read from the VM host by the "
               "last run, when it completed.", done("bytes_read")),
        family("last_seconds", "Seconds the last run took, when it "
               "completed.", done("seconds")),
        family("last_result", "The last run's exit status for the copy: "
               "0 done, 1 not done (run again), 2 error.",
               lambda o: o["status"]),
        family("last_run_timestamp_seconds", "When the last run ended.",
               lambda o: round(now, 3)),
    ]


def text(outcomes, state_dir: Optional[str], now: Optional[float] = None):
    now = time.time() if now is None else now
    metas = {o["copy"]: read_meta(o["copy"], state_dir)
             for o in outcomes if "copy" in o}
    return render(build(outcomes, metas, now))
