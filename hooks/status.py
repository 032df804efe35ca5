"""nbdsnap status: what every session looks like now, and what on the host
would make the next freeze fail (see health)."""

import json
import os
import time

from . import health, procs, sessions
from .errors import CorruptState


def collect(config, now=None, domain_states=None):
    """One dict per session file; a corrupt file is an entry too.

    domain_states() gives a function uuid -> (the domain's state now, why
    it paused on an I/O error or None) (see libvirt_states), called only if
    there is a session to ask about; a shut-off domain started during its
    copy is flagged with a warning.
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
        entry["verdict"] = store.assess(state, alive)
        if state.get("agent_watcher"):
            try:
                watcher = procs.Holder.from_json(state["agent_watcher"])
                entry["agent_watcher"] = dict(watcher.to_json(),
                                              alive=alive(watcher))
            except (KeyError, TypeError, ValueError):
                entry["agent_watcher"] = None    # unreadable: not shown
        entry["age"] = round(now - state["created"], 1)
        entry["overlay_bytes"] = _allocated(state.get("overlay"))
        if domain_state is None and domain_states is not None:
            domain_state = domain_states() or (lambda uuid: (None, None))
        entry["domain_state"], entry["io_error"] = (
            domain_state(state["uuid"]) if domain_state else (None, None))
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
            if not found:
                return "undefined", None
            return virt.state(found[0]), _io_error(found[0])
        except VirtError:
            return None, None
    return state


def _io_error(dom):
    """Why dom is paused on an I/O error ("vda: no space left"), or None."""
    import libvirt
    why = {libvirt.VIR_DOMAIN_DISK_ERROR_NO_SPACE: NO_SPACE,
           libvirt.VIR_DOMAIN_DISK_ERROR_UNSPEC: "I/O error"}
    try:
        if list(dom.state()) != [libvirt.VIR_DOMAIN_PAUSED,
                                 libvirt.VIR_DOMAIN_PAUSED_IOERROR]:
            return None
        errors = dom.diskErrors()
    except libvirt.libvirtError:
        return None
    return ", ".join("%s: %s" % (disk, why.get(code, "error %d" % code))
                     for disk, code in sorted(errors.items())) or "I/O error"


NO_SPACE = "no space left"


def _allocated(path):
    if not path:
        return None
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return None


def manifests(config, now=None):
    """One dict per manifest in manifest_dir: its chain, and the age of
    the chain's full digest (digest_full_days bounds it)."""
    from . import chain, digest
    now = time.time() if now is None else now
    try:
        names = sorted(n for n in os.listdir(config.manifest_dir)
                       if n.endswith(".manifest") and not n.startswith("."))
    except OSError:
        return []
    found = []
    for name in names:
        path = os.path.join(config.manifest_dir, name)
        header = digest.previous(path)
        if header is None:          # removed while we listed
            continue
        if isinstance(header, str):
            found.append({"manifest": path, "error": header})
            continue
        started = chain.parse_time(header.chain_started)
        found.append({
            "manifest": path, "complete": header.complete,
            "generation": header.generation, "kind": header.kind,
            "chain_id": header.chain_id, "created": header.created,
            "chain_started": header.chain_started,
            "full_age": None if started is None else round(now - started),
        })
    return found


def report(config, as_json=False, domain_states=None):
    """The text nbdsnap status prints."""
    entries = collect(config, domain_states=domain_states)
    found = health.problems(config, entries)
    chains = manifests(config)
    return (format_json(entries, found, chains) if as_json
            else format_text(entries, found, chains))


def format_json(entries, found=(), chains=()):
    return json.dumps({"sessions": entries, "problems": list(found),
                       "manifests": list(chains)},
                      sort_keys=True, indent=2)


def format_chains(chains):
    lines = []
    for m in chains:
        name = os.path.basename(m["manifest"])
        if "error" in m:
            lines.append("    %s  UNREADABLE: %s" % (name, m["error"]))
            continue
        full = ("last full digest %s ago" % _age(m["full_age"])
                if m["full_age"] is not None else "no full digest time")
        lines.append("    %s  generation %d, %s%s, chain %s, %s" % (
            name, m["generation"], m["kind"],
            "" if m["complete"] else " (incomplete)", m["chain_id"], full))
    return ["manifests"] + lines if lines else []


def format_text(entries, found=(), chains=()):
    lines = ["PROBLEM  %s" % p["message"] for p in found]
    if not entries:
        lines.append("no sessions and no overlays: every exported disk is "
                     "clean" if not found else "no sessions and no overlays")
    for e in entries:
        if e["phase"] == "corrupt":
            lines.append("%s: CORRUPT: %s ('nbdsnap recover --all' sets it "
                         "aside)" % (e["key"], e["error"]))
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
        if e.get("group"):
            lines.append("    group        %s: %s frozen at one instant; "
                         "a connection to any holds all" % (
                             e["group"]["id"], ", ".join(
                                 m["disk"] for m in e["group"]["members"])))
        lines.append("    consistency  %s" % (e["consistency"] or "-"))
        if e.get("domain_state"):
            lines.append("    domain now   %s" % e["domain_state"])
        lines.append("    holders      %s" % holders)
        if e.get("overlay"):
            size = e["overlay_bytes"]
            lines.append("    overlay      %s (%s)" % (
                e["overlay"], "missing" if size is None
                else "%d bytes allocated" % size))
        if e.get("io_error"):
            lines.append("    PAUSED       %s" % paused_advice(e))
        if e.get("agent_watcher"):
            w = e["agent_watcher"]
            lines.append("    agent watch  pid %d (%s)" % (
                w["pid"], "waiting for the agent, to thaw the guest"
                if w["alive"] else "ended"))
        if e.get("error"):
            lines.append("    error        %s" % e["error"])
        if e.get("warning"):
            lines.append("    WARNING      %s" % e["warning"])
    return "\n".join(lines + format_chains(chains))


def paused_advice(e):
    """What to say of a frozen domain that paused on an I/O error."""
    where = os.path.dirname(e["overlay"]) if e.get("overlay") else None
    if NO_SPACE in e["io_error"] and where:
        todo = ("free space in %s, where its overlay grows, then 'virsh "
                "resume %s' (the commit at the copy's end also resumes it)"
                % (where, e["domain"]))
    else:
        todo = ("see the host's log for the failed disk, then 'virsh resume "
                "%s'" % e["domain"])
    return "on an I/O error (%s): %s" % (e["io_error"], todo)


def _age(seconds):
    seconds = int(seconds)
    if seconds >= 2 * 86400:
        return "%.1f d" % (seconds / 86400)
    if seconds < 120:
        return "%d s" % seconds
    if seconds < 7200:
        return "%d min" % (seconds // 60)
    return "%.1f h" % (seconds / 3600)
