"""The history of sessions: one JSON line per session that ended.

Appended by postrun and recover when a session ends, in
``state_dir/history.jsonl``.  Kept bounded: past MAX_BYTES the oldest half
is dropped (the file is rewritten atomically, under the history's lock).
"""

import json
import logging
import os
import time

from nbdsnap.verify.files import write_atomic

from .errors import Error
from .sessions import DiskLock, describe

log = logging.getLogger(__name__)

MAX_BYTES = 1 << 20     # about 3000 sessions


def _path(config):
    return os.path.join(config.state_dir, "history.jsonl")


def entry(state, result, overlay_bytes=None, commit_seconds=None,
          now=None, manifest_kind=None, manifest_seconds=None,
          manifest_bytes_read=None, manifest_why=None):
    """The history line of a session that ends with result.

    manifest_*: its freeze-time manifest (digest = on), None without one:
    full or incremental, seconds from the freeze to the complete manifest,
    and the bytes of the base the VM host read to make it, and why a
    full one was (the first freeze, QEMU restarted, ...).
    """
    return {
        "id": state["id"],
        "export": state["export"],
        "domain": state["domain"],
        "disk": state["disk"],
        "mode": state["mode"],
        "consistency": state.get("consistency"),
        "start": state["created"],
        "end": time.time() if now is None else now,
        "connections": state.get("connections", len(state["holders"])),
        "overlay_bytes": overlay_bytes,
        "commit_seconds": (None if commit_seconds is None
                           else round(commit_seconds, 3)),
        "result": result,
        "manifest_kind": manifest_kind,
        "manifest_seconds": manifest_seconds,
        "manifest_bytes_read": manifest_bytes_read,
        "manifest_why": manifest_why,
        # The disks frozen at the same instant (one group), or None.
        "group": (None if not state.get("group") else
                  {"id": state["group"]["id"],
                   "disks": [m["disk"] for m in state["group"]["members"]]}),
    }


def record(config, line, max_bytes=MAX_BYTES):
    """Append line; drop the oldest half when the file grows past max."""
    path = _path(config)
    with DiskLock(os.path.join(config.locks_dir, "history.lock"),
                  config.lock_timeout):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                     | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
            size = f.tell()
        if size > max_bytes:
            _trim(path)


def remember(config, state, result, **details):
    """Add the ended session to the history; never fail a hook for it."""
    try:
        record(config, entry(state, result, **details))
    except (OSError, Error) as e:
        log.warning("%s: cannot write the history: %s", describe(state), e)


def _trim(path):
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    write_atomic(path, "".join(lines[len(lines) // 2:]))


def read(config):
    """Every recorded session, oldest first; a damaged line is skipped."""
    try:
        with open(_path(config), encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return []
    result = []
    for line in lines:
        try:
            result.append(json.loads(line))
        except ValueError:
            continue
    return result


def _manifest(e):
    """The manifest column: kind, seconds, what it read (or -)."""
    if not e.get("manifest_kind"):
        return "-"
    text = e["manifest_kind"]
    if e.get("manifest_seconds") is not None:
        text += " %.1f s" % e["manifest_seconds"]
    if e.get("manifest_bytes_read") is not None:
        text += " %d MiB read" % (e["manifest_bytes_read"] >> 20)
    return text


def disk_of(e):
    """DOMAIN:DISK, and the disks frozen at the same instant: dom:vda
    (+vdb)."""
    group = e.get("group") or {}
    others = [d for d in group.get("disks", ()) if d != e["disk"]]
    return "%s:%s%s" % (e["domain"], e["disk"],
                        " (+%s)" % ",".join(others) if others else "")


def format_text(entries):
    if not entries:
        return "no sessions recorded yet"
    rows = [("START (UTC)", "SECONDS", "EXPORT", "DOMAIN:DISK", "CONN",
             "CONSISTENCY", "OVERLAY", "COMMIT", "MANIFEST", "RESULT")]
    for e in entries:
        rows.append((
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["start"])),
            "%.1f" % (e["end"] - e["start"]),
            e["export"], disk_of(e), str(e["connections"]),
            e.get("consistency") or "-",
            "-" if e.get("overlay_bytes") is None
            else "%d MiB" % (e["overlay_bytes"] >> 20),
            "-" if e.get("commit_seconds") is None
            else "%.2f s" % e["commit_seconds"],
            _manifest(e), e["result"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths))
                     + "  " + r[-1] for r in rows)
