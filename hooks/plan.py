"""What brings a frozen disk back on its base, whatever happened meanwhile.

nbd-postrun and nbdsnap recover both call plan(), then commit.run() the
step it chose, under the disk's lock.  plan() is observe() (libvirt, the
XML, the files, jobs: all the I/O) then decide() (pure), so that --dry-run
prints what the run does, and every row below has a unit test::

    overlay a symlink, or not the one file    -> keep: nothing is handed to
      we created (a hard link)                   libvirt or qemu-img
    domain undefined (a transient one          -> offline commit into the
      destroyed while frozen), file base         base, overlay removed
      unused and not written since
    ... base open by a process (its domain     -> keep, say who
      created again on it, a copy)
    ... base written after the overlay         -> keep: a diverged branch
    ... a block device base (no write time)    -> keep, say how to merge
    a libvirt job on the domain, in the intent -> wait for its end, JOB_WAIT
      or failed phase or with no session (the     at most; then keep
      snapshot of a killed prerun goes on)
    domain running or paused on the overlay    -> online:  active commit, pivot
    domain shut off, defined on the overlay    -> offline: qemu-img commit,
                                                  definition pointed back
    ... with a managed save image              -> keep: start it first
    an image above the overlay (an operator's  -> keep: commit that image
      own snapshot on top of ours)                down first, say how
    domain in a passing state                  -> keep: run recover again
    domain on its base, overlay still there    -> discard it if the commit had
                                                  pivoted or it adds nothing
                                                  to the base; else keep it
                                                  (never merged into a base
                                                  the guest kept writing)
    domain on its base, no overlay             -> end: nothing to merge
"""

from __future__ import annotations

import dataclasses
import os
import stat

from . import domxml, locate, procs, qemu_img, sessions, virt

ONLINE = "online commit"
OFFLINE = "offline commit"
DISCARD = "discard overlay"
END = "end session"
KEEP = "keep overlay"

# How long a libvirt job on the domain (the snapshot call of a killed
# prerun, which libvirtd carries on) may still run before plan() gives up
# for now.  libvirt's own wait for the domain's job lock (30 s) comes on
# top.
JOB_WAIT = 60.0

# What lstat() shows at the overlay's path.
MISSING = "missing"
REGULAR = "regular file"      # one link, as libvirt created it


@dataclasses.dataclass(frozen=True)
class Freeze:
    """What is known of one freeze, from its session or found orphaned."""
    key: str                  # identity of the base (sessions.disk_key)
    uuid: str | None
    domain: str
    disk: str
    overlay: str | None
    base: domxml.Layer
    merged: bool = False      # a commit had pivoted: the base has it all
    # An offline commit into the base had begun: the base may hold part of
    # the overlay, so only finishing that commit makes it whole again (and
    # the base is newer than the overlay because of it, not of a guest).
    merging: bool = False
    # A snapshot call of ours may still run in libvirtd: the session is an
    # intent (or failed after one), or there is no session to say.
    snapshot_may_run: bool = True

    @classmethod
    def from_session(cls, state):
        return cls(key=state["key"], uuid=state["uuid"],
                   domain=state["domain"], disk=state["disk"],
                   overlay=state.get("overlay"),
                   base=domxml.Layer(state.get("base_type") or "file",
                                     state["base"],
                                     state.get("base_format") or "raw"),
                   merged=bool(state.get("merged")),
                   merging=bool(state.get("merging")),
                   snapshot_may_run=(state.get("phase")
                                     in (sessions.INTENT, sessions.FAILED)))

    def __str__(self):
        return "domain %s disk %s" % (self.domain, self.disk)


@dataclasses.dataclass(frozen=True)
class Observation:
    """What observe() saw: all that decide() needs, and no handle."""
    overlay: str = MISSING        # MISSING, REGULAR, or what else it is
    defined: bool = True
    state: str | None = None      # virt.RUNNING, virt.SHUTOFF...
    disk: domxml.Disk | None = None   # the disk in the XML, None if absent
    job: float = 0.0              # s waited in vain for a libvirt job's end
    managed_save: bool = False
    base_users: tuple = ()        # (pid, name) of processes with it open
    base_newer: bool | None = False   # the base was written after the
                                      # overlay; None: cannot tell
    adds: bool | None = None      # the overlay holds data the base lacks


@dataclasses.dataclass
class Step:
    action: str
    why: str
    dom: object = None        # the virDomain, when the domain exists

    def __str__(self):
        return "%s: %s" % (self.action, self.why)


# -- observe: every look at libvirt and the disks ---------------------------

def overlay_kind(path):
    """What is at the overlay's path, by lstat: never followed."""
    if not path:
        return MISSING
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return MISSING
    if stat.S_ISLNK(st.st_mode):
        return "symlink to %s" % os.readlink(path)
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (mode %o)" % st.st_mode
    if st.st_nlink != 1:
        return "a file with %d hard links" % st.st_nlink
    return REGULAR


def _base_newer(freeze):
    """True if a file base was written after the overlay last was: the
    guest went on on the base, and the overlay is an older branch.

    None when that cannot be known: a block device's node keeps no such
    time (an LV's domain may have been created again on it, have written
    and been destroyed again), and a base that cannot be read says
    nothing.  /proc shows no QEMU of another host on shared storage
    either: only the file's time would."""
    try:
        base = os.stat(freeze.base.path)
        overlay = os.lstat(freeze.overlay)
    except OSError:
        return None
    if not stat.S_ISREG(base.st_mode):
        return None
    return base.st_mtime_ns > overlay.st_mtime_ns


def observe(conn, freeze, job_wait=JOB_WAIT, exclude=()):
    """(Observation, virDomain or None): everything plan() decides from.

    exclude: processes not to count as users of the base (a dry run's
    still running digest, which the real run waits for first)."""
    found = virt.lookup(conn, uuid=freeze.uuid, name=freeze.domain)
    if found is None:
        kind = overlay_kind(freeze.overlay)
        if kind != REGULAR:
            return Observation(overlay=kind, defined=False), None
        users = tuple(procs.users_of(
            freeze.key, locate.key_of,
            exclude=tuple(procs.lineage()) + tuple(exclude)))
        return Observation(overlay=kind, defined=False, base_users=users,
                           base_newer=_base_newer(freeze)), None
    dom, parsed = found
    # The snapshot call of a killed prerun goes on in libvirtd, and what
    # the XML shows may be about to change.  Waited for only where such a
    # call may run: an intent, a session that failed (it may have failed
    # while it waited: it was an intent), an overlay with no session.  A
    # frozen or committing session's snapshot has ended; a job then is
    # someone else's (a pull-mode backup, a migration, hours long): the
    # commit goes ahead and libvirt refuses it if the two conflict, where
    # waiting would only fail the postrun after JOB_WAIT, every time.
    if freeze.snapshot_may_run and not virt.wait_no_job(dom, job_wait):
        return Observation(overlay=overlay_kind(freeze.overlay),
                           job=job_wait), dom
    parsed = virt.reread(dom)
    kind = overlay_kind(freeze.overlay)
    state = virt.state(dom)
    disk = domxml.find_disk(parsed, freeze.disk)
    layers = [l.path for l in disk.layers] if disk else []
    managed = (state == virt.SHUTOFF and bool(layers)
               and layers[0] == freeze.overlay and virt.has_managed_save(dom))
    adds = None
    if (kind == REGULAR and not freeze.merged
            and freeze.overlay not in layers):
        adds = not qemu_img.same_content(freeze.overlay, freeze.base.path,
                                         freeze.base.format or "raw")
    return Observation(overlay=kind, state=state, disk=disk,
                       managed_save=managed, adds=adds), dom


# -- decide: pure -------------------------------------------------------------

def decide(seen, freeze):
    """(action, why): what brings freeze back, given what was seen."""
    where = str(freeze)
    if seen.overlay not in (MISSING, REGULAR):
        return KEEP, ("overlay %s is %s, not the file nbdsnap created: "
                      "refusing to hand it to libvirt or qemu-img, which "
                      "would follow it; nothing changed.  Put the overlay "
                      "back or remove the link, then run recover again"
                      % (freeze.overlay, seen.overlay))
    if not seen.defined:
        return _undefined(seen, freeze)
    if seen.job:
        return KEEP, ("domain %s still has a libvirt job after %g s (the "
                      "snapshot of a killed nbd-prerun?); run recover again "
                      "once it has ended" % (freeze.domain, seen.job))
    layers = [l.path for l in seen.disk.layers] if seen.disk else []
    active = seen.state in (virt.RUNNING, virt.PAUSED)
    if layers and freeze.overlay and layers[0] == freeze.overlay:
        if active:
            return ONLINE, "%s is %s on overlay %s" % (where, seen.state,
                                                       freeze.overlay)
        if seen.state == virt.SHUTOFF and seen.managed_save:
            # Its saved memory and its save image's XML name the overlay:
            # an offline commit would make it unable to resume.
            return KEEP, ("%s is shut off with a managed save image that "
                          "runs on overlay %s; start the domain (virsh "
                          "start) and run recover again"
                          % (where, freeze.overlay))
        if seen.state == virt.SHUTOFF:
            return OFFLINE, ("%s is shut off and defined on overlay %s"
                             % (where, freeze.overlay))
    if freeze.overlay in layers[1:]:
        return KEEP, ("%s runs on %s, an image above overlay %s (a snapshot "
                      "taken on top of nbdsnap's); commit it down first "
                      "(virsh blockcommit %s %s --active --shallow --pivot "
                      "while it runs), then run recover again"
                      % (where, layers[0], freeze.overlay, freeze.domain,
                         freeze.disk))
    if not active and seen.state != virt.SHUTOFF:
        return KEEP, ("domain %s is %s; run recover again once it is "
                      "running or shut off" % (freeze.domain, seen.state))
    if seen.overlay == MISSING:
        return END, "%s is on its base and no overlay is left" % where
    if freeze.merged:
        return DISCARD, ("%s is back on its base and the commit had "
                         "pivoted: overlay %s holds nothing more"
                         % (where, freeze.overlay))
    if seen.adds is False:
        return DISCARD, ("%s is back on its base, overlay %s adds nothing "
                         "to it" % (where, freeze.overlay))
    return KEEP, ("%s is %s on its base without the writes in overlay %s "
                  "(was it defined or created again on the base?): merging "
                  "them now would write older data under what the guest "
                  "wrote since.  Kept for inspection (qemu-img compare %s "
                  "%s); once its writes are not wanted, remove it (rm %s) "
                  "and run recover again"
                  % (where, seen.state, freeze.overlay, freeze.overlay,
                     freeze.base.path, freeze.overlay))


def _undefined(seen, freeze):
    if seen.overlay == MISSING:
        return END, ("domain %s is undefined and no overlay is left"
                     % freeze.domain)
    if seen.base_users:
        users = ", ".join("pid %d (%s)" % u for u in seen.base_users)
        return KEEP, ("domain %s is undefined and its base %s is open by "
                      "%s: nothing is merged into a disk in use.  Overlay "
                      "%s kept; run recover again once they have closed it"
                      % (freeze.domain, freeze.base.path, users,
                         freeze.overlay))
    if seen.base_newer is not False and not freeze.merging:
        why = ("nothing tells whether its base %s was written after overlay "
               "%s (a block device keeps no time of its last write, and a "
               "QEMU of another host is not seen here)"
               if seen.base_newer is None else
               "its base %s was written after overlay %s")
        return KEEP, ("domain %s is undefined and %s: the overlay may be an "
                      "older branch that merging would write over newer "
                      "data.  Kept for inspection (qemu-img compare %s %s); "
                      "once nothing uses the base and its writes are "
                      "wanted: qemu-img commit %s, then rm %s"
                      % (freeze.domain,
                         why % (freeze.base.path, freeze.overlay),
                         freeze.overlay, freeze.base.path, freeze.overlay,
                         freeze.overlay))
    return OFFLINE, ("domain %s is undefined (a transient domain destroyed "
                     "while frozen?) and nothing has its base open: overlay "
                     "%s goes into %s" % (freeze.domain, freeze.overlay,
                                          freeze.base.path))


def plan(conn, freeze, job_wait=JOB_WAIT, exclude=()):
    """Decide, from libvirt and the disks now, what brings freeze back."""
    seen, dom = observe(conn, freeze, job_wait, exclude)
    action, why = decide(seen, freeze)
    return Step(action, why, dom)
