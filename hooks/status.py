"""nbdsnap status: what every session looks like now."""

import json
import os
import time

from . import procs, sessions
from .errors import CorruptState


def collect(config, now=None, domain_states=None):
    """One dict per session file; a corrupt file is an entry too.

    domain_states() gives a function uuid -> the domain's state now (see
    libvirt_states), called only if there is a session to ask about; a
    shut-off domain started during its copy is flagged with a warning.
    """
    store = sessions.SessionStore(config)
    now = time.time() if now is None else now
    boot = procs.boot_id()
    result = []
    domain_state = None
    for key in store.keys():
        try:
            state = store.load(key)
        except CorruptState as e:
            result.append({"key": key, "phase": "corrupt", "error": str(e),
                           "verdict": "corrupt"})
            continue
        if state is None:      # ended while we listed
            continue
        alive = lambda h: procs.is_alive(h, boot)   # noqa: E731
        entry = dict(state)
        entry["holders"] = [dict(h.to_json(), alive=alive(h))
                            for h in sessions.holders(state)]
        entry["verdict"] = sessions.assess(state, alive)
        entry["age"] = round(now - state["created"], 1)
        entry["overlay_bytes"] = _allocated(state.get("overlay"))
        if domain_state is None and domain_states is not None:
            domain_state = domain_states() or (lambda uuid: None)
        entry["domain_state"] = domain_state(state["uuid"]) \
            if domain_state else None
        entry["warning"] = state.get("warning")
        if (state["mode"] == sessions.OFFLINE
                and entry["domain_state"] not in (None, "shut off")):
            entry["warning"] = ("the domain was started during the copy: "
                                "copies taken meanwhile may be inconsistent")
        result.append(entry)
    return result + _orphans(config, {e.get("overlay") for e in result})


def _orphans(config, named):
    """Overlays in snapshot_dir that no session names: a crash lost their
    session (or a corrupt one was set aside); recover finds their domain."""
    try:
        names = sorted(os.listdir(config.snapshot_dir))
    except OSError:
        return []
    found = []
    for name in names:
        path = os.path.join(config.snapshot_dir, name)
        if name.startswith("nbdsnap-") and path not in named:
            found.append({"key": None, "phase": "orphan", "verdict": "orphan",
                          "overlay": path, "overlay_bytes": _allocated(path),
                          "error": "no session names this overlay; run "
                                   "'nbdsnap recover --all'"})
    return found


def libvirt_states():
    """A domain_state function for collect(), or None if libvirt is down."""
    from . import virt
    from .errors import VirtError
    try:
        conn = virt.connect()
    except VirtError:
        return None

    def state(uuid):
        try:
            found = virt.lookup(conn, uuid=uuid)
            return virt.state(found[0]) if found else "undefined"
        except VirtError:
            return None
    return state


def _allocated(path):
    if not path:
        return None
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return None


def format_json(entries):
    return json.dumps({"sessions": entries}, sort_keys=True, indent=2)


def format_text(entries):
    if not entries:
        return "no sessions and no overlays: every exported disk is clean"
    lines = []
    for e in entries:
        if e["phase"] == "corrupt":
            lines.append("%s: CORRUPT: %s" % (e["key"], e["error"]))
            continue
        if e["phase"] == "orphan":
            lines.append("%s  ORPHAN (%s bytes allocated): %s" % (
                e["overlay"], e["overlay_bytes"], e["error"]))
            continue
        holders = ", ".join("%d (%s)" % (h["pid"], "alive" if h["alive"]
                                         else "dead")
                            for h in e["holders"]) or "none"
        lines.append("%s  %s" % (e["export"], e["verdict"].upper()))
        lines.append("    session      %s" % e["id"])
        lines.append("    domain/disk  %s %s (%s)" % (e["domain"], e["disk"],
                                                     e["mode"]))
        lines.append("    phase        %s, %s old" % (e["phase"],
                                                      _age(e["age"])))
        lines.append("    consistency  %s" % (e["consistency"] or "-"))
        if e.get("domain_state"):
            lines.append("    domain now   %s" % e["domain_state"])
        lines.append("    holders      %s" % holders)
        if e.get("overlay"):
            size = e["overlay_bytes"]
            lines.append("    overlay      %s (%s)" % (
                e["overlay"], "missing" if size is None
                else "%d bytes allocated" % size))
        if e.get("error"):
            lines.append("    error        %s" % e["error"])
        if e.get("warning"):
            lines.append("    WARNING      %s" % e["warning"])
    return "\n".join(lines)


def _age(seconds):
    seconds = int(seconds)
    if seconds < 120:
        return "%d s" % seconds
    if seconds < 7200:
        return "%d min" % (seconds // 60)
    return "%.1f h" % (seconds / 3600)
