"""nbdsnap recover: bring back every stale or failed freeze, and orphans.

What it looks at, all of it, then what it was asked about:

- every session file: live ones (a holder still connected) are left alone;
  stale, failed and interrupted ones are recovered; a corrupt one is moved
  aside (``KEY.json.corrupt-TIME``) and what it described is found again
  from the domains and the overlays below;
- every domain disk whose top is an nbdsnap overlay with no session;
- every overlay file in snapshot_dir that no session and no domain names.

Each is planned by plan.plan() from what libvirt and the disks show now,
and carried out under the base disk's lock, the same lock the hooks take,
so recover is safe while hooks run and when two operators run it at once
(settle.py: what is done with each).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time

from . import domxml, locate, plan, procs, qemu_img, sessions, virt
from .errors import CorruptState, Error, NotFound
from .settle import Case, Settler

log = logging.getLogger(__name__)

_OVERLAY_NAME = re.compile(
    r"^nbdsnap-(?P<uuid>[0-9a-f-]{36})-(?P<disk>[^-/]+)-(?P<id>.+)\.qcow2$")


def _base_layer(path, fmt):
    try:
        kind = "block" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
    except OSError:
        kind = "file"
    return domxml.Layer(kind, path, fmt or "raw")


def _from_overlay(path, uuid, domain, disk, key=None):
    """A Freeze for an overlay with no session, from its qcow2 header."""
    backing, fmt = qemu_img.backing(path)
    if not backing:
        return None
    key = key or locate.key_of(backing)
    if key is None:
        return None
    return plan.Freeze(key=key, uuid=uuid, domain=domain, disk=disk,
                       overlay=path, base=_base_layer(backing, fmt))


class Recovery(Settler):
    """Every case there is (or those of some exports), each settled."""

    # -- survey ------------------------------------------------------------

    def _sessions(self):
        """(cases, the overlays they name, the keys of corrupt sessions)."""
        cases, overlays, corrupt = [], set(), []
        for key in self.store.keys():
            try:
                state = self.store.load(key)
            except CorruptState:
                corrupt.append(key)
                continue
            if state is None:
                continue
            if state.get("overlay"):
                overlays.add(state["overlay"])
            freeze = (plan.Freeze.from_session(state)
                      if state["mode"] == sessions.ONLINE else None)
            cases.append(Case(key, state["export"], freeze, state))
        return cases, overlays, corrupt

    def _set_aside(self, key):
        """Move a corrupt session file aside, under its disk's lock, if it
        is still corrupt then (a hook may have rewritten it meanwhile)."""
        path = os.path.join(self.config.sessions_dir, key + ".json")
        aside = "%s.corrupt-%d" % (path, time.time())
        with self.store.lock(key):
            try:
                self.store.load(key)
                return
            except CorruptState as e:
                error = e
            if self.dry_run:
                self.out("%s: would move it aside to %s" % (error, aside))
                return
            os.replace(path, aside)
        log.error("%s; moved aside to %s, recovering from the domains and "
                  "overlays instead", error, aside)
        self.out("%s: moved aside to %s" % (error, aside))

    def _orphans(self, conn, known):
        cases = []
        for dom, parsed in virt.all_domains(conn):
            for disk in parsed.disks:
                top = disk.top.path
                if not self.store.is_ours(top) or top in known:
                    continue
                known.add(top)
                freeze = None
                if disk.chain and disk.chain[0].path:
                    key = locate.key_of(disk.chain[0].path)
                    if key:
                        freeze = plan.Freeze(
                            key=key, uuid=parsed.uuid, domain=parsed.name,
                            disk=disk.target, overlay=top,
                            base=disk.chain[0])
                if freeze is None and os.path.exists(top):
                    freeze = _from_overlay(top, parsed.uuid, parsed.name,
                                           disk.target)
                if freeze is None:
                    self.out("%s %s runs on overlay %s whose base cannot be "
                             "found" % (parsed.name, disk.target, top))
                    self.stuck += 1
                    continue
                cases.append(Case(freeze.key, "orphan overlay %s" % top,
                                  freeze))
        try:
            names = sorted(os.listdir(self.config.snapshot_dir))
        except FileNotFoundError:
            names = []
        for name in names:
            path = os.path.join(self.config.snapshot_dir, name)
            m = _OVERLAY_NAME.match(name)
            if not m or path in known:
                continue
            found = virt.lookup(conn, uuid=m["uuid"])
            dname = found[1].name if found else m["uuid"]
            freeze = _from_overlay(path, m["uuid"], dname, m["disk"])
            if freeze is None:
                self.out("overlay %s has no base; kept" % path)
                self.stuck += 1
                continue
            cases.append(Case(freeze.key, "orphan overlay %s" % path, freeze))
        return cases

    # -- run ---------------------------------------------------------------

    def run(self, exports=(), dry_run=False):
        """Recover what was asked; return the number of things still stuck."""
        self.dry_run = dry_run
        self.stuck = 0
        self.store.prepare()
        wanted = None
        if exports:
            wanted = {}
            for export in exports:
                key = locate.key_of(export)
                if key is None:
                    raise NotFound("no such export: %s" % export)
                wanted[key] = export
        conn = virt.connect()
        try:
            cases, known, corrupt = self._sessions()
            cases += self._orphans(conn, known)
            if wanted is not None:
                self._with_groups(cases, wanted)
                cases = [c for c in cases if c.key in wanted]
            # Once the groups are known: a corrupt disk frozen with one that
            # was asked for is recovered with it too.
            for key in corrupt:
                if wanted is None or key in wanted:
                    self._set_aside(key)
            if not cases:
                self.out("nothing to recover")
            for case in cases:
                try:
                    self._one(conn, case)
                except Error as e:
                    # One disk that cannot be done now must not keep every
                    # other one frozen (at boot, say): report it, go on.
                    self.stuck += 1
                    self.out("%s: STUCK: %s" % (case.label, e))
                    log.error("recover %s: still stuck: %s", case.label, e)
        finally:
            conn.close()
        return self.stuck

    def _with_groups(self, cases, wanted):
        """A disk's group is one freeze: recovering one of its disks
        recovers the disks frozen with it too, even when the disk asked for
        has no session left (a postrun killed between the commits of the
        group's disks ended its session, not the others')."""
        for case in cases:
            group = case.state.get("group") if case.state else None
            asked = [m["key"] for m in group["members"]
                     if m["key"] in wanted] if group else []
            if not asked:
                continue
            for m in group["members"]:
                if m["key"] not in wanted:
                    wanted[m["key"]] = m["export"]
                    self.out("%s: frozen at one instant with %s, recovered "
                             "with it" % (m["export"], wanted[asked[0]]))

    def _one(self, conn, case):
        # The disks frozen with it are locked too: a connection to any of
        # them holds it.
        with self.store.group_lock(case.key) as state:
            # Always the session as it is now: an "orphan" found before the
            # lock may have become a live session's overlay meanwhile.
            if case.state and state is None:
                self.out("%s: already recovered" % case.label)
                return
            if state is not None and case.state is None:
                case.label = state["export"]
            if (state is not None and self.store.assess(
                    state, procs.is_alive) == sessions.LIVE):
                self.out("%s: live session %s (a client is connected%s), "
                         "left alone" % (case.label, state["id"],
                                         "" if state.live_holders(
                                             procs.is_alive)
                                         else " to a disk frozen with it"))
                return
            self.locked(conn, case, state)
