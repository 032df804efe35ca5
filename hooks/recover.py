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
so recover is safe while hooks run and when two operators run it at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
import time

from . import (commit, digest, domxml, locate, plan, procs, qemu_img,
               sessions, virt)
from .errors import CorruptState, Error, NotFound

log = logging.getLogger(__name__)

_OVERLAY_NAME = re.compile(
    r"^nbdsnap-(?P<uuid>[0-9a-f-]{36})-(?P<disk>[^-/]+)-(?P<id>.+)\.qcow2$")


@dataclasses.dataclass
class Case:
    key: str
    label: str                      # export path, or what we found
    freeze: plan.Freeze | None      # None: a session with nothing to merge
    state: dict | None = None       # the session, when there is one


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


class Recovery:
    def __init__(self, freezer, out=print, dry_run=False):
        self.freezer = freezer
        self.config = freezer.config
        self.store = freezer.store
        self.out = out
        self.dry_run = dry_run
        self.stuck = 0
        # Processes not to count as readers of a frozen base: the
        # nbd-server child of a prerun that recovers before it serves.
        self.exclude = ()

    # -- survey ------------------------------------------------------------

    def _sessions(self, wanted):
        cases, overlays = [], set()
        for key in self.store.keys():
            try:
                state = self.store.load(key)
            except CorruptState:
                if wanted is None or key in wanted:
                    self._set_aside(key)
                continue
            if state is None:
                continue
            if state.get("overlay"):
                overlays.add(state["overlay"])
            freeze = (plan.Freeze.from_session(state)
                      if state["mode"] == sessions.ONLINE else None)
            cases.append(Case(key, state["export"], freeze, state))
        return cases, overlays

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
                if not self.freezer.is_ours(top) or top in known:
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
            cases, known = self._sessions(wanted)
            cases += self._orphans(conn, known)
            if wanted is not None:
                cases = [c for c in cases if c.key in wanted]
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

    def _one(self, conn, case):
        with self.store.lock(case.key):
            # Always the session as it is now: an "orphan" found before the
            # lock may have become a live session's overlay meanwhile.
            state = self.store.load(case.key)
            if case.state and state is None:
                self.out("%s: already recovered" % case.label)
                return
            if state is not None and case.state is None:
                case.label = state["export"]
            if state is not None and sessions.assess(
                    state, procs.is_alive) == sessions.LIVE:
                self.out("%s: live session %s (a client is connected), "
                         "left alone" % (case.label, state["id"]))
                return
            self.locked(conn, case, state)

    def locked(self, conn, case, state):
        """Recover case, whose disk lock the caller holds.

        Returns True when nothing is left stuck.
        """
        if state is not None:
            case.freeze = (plan.Freeze.from_session(state)
                           if state["mode"] == sessions.ONLINE else None)
            if not self.dry_run:
                # A digest outlives a killed nbd-server: it must end before
                # anything looks at or writes into the base it reads (an
                # offline session's too), and before plan() lists who has
                # the base open, or the digest counts as one of them.
                digest.finish(self.config, state)
        if case.freeze is None:
            self._end(case, state, "nothing was snapshotted")
            return True
        readers = procs.servers_with_open(case.key, locate.key_of,
                                          exclude=self.exclude)
        if readers:
            # The session file says nobody holds it (or it was lost), but a
            # client is still reading the frozen base: committing now would
            # change the disk under its copy.
            self.stuck += 1
            self.out("%s: nbd-server pid %s still serves the frozen base; "
                     "left alone until that connection ends"
                     % (case.label, ", ".join(map(str, readers))))
            return False
        step = plan.plan(conn, case.freeze)
        if self.dry_run:
            self.out("%s: would %s" % (case.label, step))
            if step.action == plan.KEEP:
                self.stuck += 1
            return step.action != plan.KEEP
        self.out("%s: %s" % (case.label, step))
        log.info("recover %s: %s", case.label, step)
        if state is not None:
            self.store.save(sessions.with_phase(state, sessions.COMMITTING))
        # Once merged, every later state says so (the failed one too).
        merged = {"merged": True} if case.freeze.merged else {}

        def record_merged():
            merged["merged"] = True
            if state is not None:
                self.store.save(sessions.with_phase(
                    state, sessions.COMMITTING, **merged))
        try:
            commit.run(conn, case.freeze, step, self.config.commit_timeout,
                       merged=record_merged,
                       domain_lock=lambda: self.freezer.domain_lock(
                           case.freeze))
        except Error as e:
            self.stuck += 1
            self.out("%s: STUCK: %s" % (case.label, e))
            log.error("recover %s: still stuck: %s", case.label, e)
            if state is not None:
                self.store.save(sessions.with_phase(
                    state, sessions.FAILED, error=str(e), **merged))
            return False
        self._end(case, state, "%s done" % step.action)
        return True

    def _end(self, case, state, what):
        if self.dry_run:
            self.out("%s: would end the session (%s)" % (case.label, what))
            return
        if state is not None:
            self.store.delete(case.key)
            self.freezer.remember(state, "recovered: %s" % what)
        self.out("%s: recovered (%s)" % (case.label, what))
        log.info("recover %s: recovered (%s)", case.label, what)
