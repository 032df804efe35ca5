"""Settling one case whose holders are gone: plan it, carry it out, end it.

A case is a session nobody holds any more (stale, failed, interrupted) or
an overlay of ours that no session names.  nbdsnap recover settles every
case it finds (recover.py); a prerun that meets a stale session settles
that one first, where the configuration says so (stale = recover).  Both
hold the base disk's lock, and call Settler.locked().
"""

from __future__ import annotations

import dataclasses
import logging

from . import commit, digest, history, locate, plan, procs, sessions
from .errors import Error

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Case:
    key: str
    label: str                      # export path, or what we found
    freeze: plan.Freeze | None      # None: a session with nothing to merge
    state: dict | None = None       # the session, when there is one


class Settler:
    def __init__(self, config, out=print, dry_run=False):
        self.config = config
        self.store = sessions.SessionStore(config)
        self.out = out
        self.dry_run = dry_run
        self.stuck = 0
        # Processes not to count as readers of a frozen base: the
        # nbd-server child of a prerun that recovers before it serves.
        self.exclude = ()
        # Whether to clean QEMU of an interrupted map read after a commit:
        # not in a prerun, whose freeze does that under the domain lock
        # moments later, within its watchdog's budget.
        self.clean_qemu = True

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
        # A dry run does not wait for a digest still running: it says it
        # would, and decides as the real run will once the digest is gone.
        waits = digest.running(state) if self.dry_run and state else None
        step = plan.plan(conn, case.freeze,
                         exclude=(waits.pid,) if waits else ())
        if self.dry_run:
            if waits:
                self.out("%s: would wait for the digest, pid %d, to end"
                         % (case.label, waits.pid))
            self.out("%s: would %s" % (case.label, step))
            if step.action == plan.KEEP:
                self.stuck += 1
            return step.action != plan.KEEP
        self.out("%s: %s" % (case.label, step))
        log.info("recover %s: %s", case.label, step)
        if state is not None:
            self.store.save(state.with_phase(sessions.COMMITTING))
        # Once merging or merged, every later state says so (the failed one
        # too).
        marks = {mark: True for mark in ("merging", "merged")
                 if getattr(case.freeze, mark)}

        def record(mark):
            marks[mark] = True
            if state is not None:
                self.store.save(state.with_phase(sessions.COMMITTING,
                                                 **marks))
        try:
            commit.run(conn, case.freeze, step, self.config.commit_timeout,
                       merged=lambda: record("merged"),
                       merging=lambda: record("merging"),
                       domain_lock=lambda: self.store.domain_lock(
                           case.freeze.uuid, case.freeze.domain))
        except Error as e:
            self.stuck += 1
            self.out("%s: STUCK: %s" % (case.label, e))
            log.error("recover %s: still stuck: %s", case.label, e)
            if state is not None:
                self.store.save(state.with_phase(
                    sessions.FAILED, error=str(e), **marks))
            return False
        self._end(case, state, "%s done" % step.action)
        self._clean_qemu(conn, case)
        return True

    def _clean_qemu(self, conn, case):
        """digest = on: remove what a prerun killed while it read a dirty
        bitmap left in QEMU (our NBD server, a read-only node of the base
        and its export), which would keep a libvirt backup job from
        starting QEMU's one NBD server.  Under the domain lock: no map is
        being read then.  Never fails the recovery."""
        if not (self.config.digest and self.clean_qemu):
            return
        from . import bitmaps, virt
        try:
            found = virt.lookup(conn, uuid=case.freeze.uuid)
            if found is None or virt.state(found[0]) not in (virt.RUNNING,
                                                              virt.PAUSED):
                return
            with self.store.domain_lock(case.freeze.uuid,
                                        case.freeze.domain):
                left = bitmaps.remove_leftovers(found[0])
        except Error as e:
            log.warning("recover %s: cannot look for what an interrupted "
                        "map read left in QEMU: %s", case.label, e)
            return
        if left:
            self.out("%s: removed from QEMU what an interrupted map read "
                     "left: %s" % (case.label, ", ".join(left)))
            log.info("recover %s: removed from QEMU: %s", case.label,
                     ", ".join(left))

    def _end(self, case, state, what):
        if self.dry_run:
            self.out("%s: would end the session (%s)" % (case.label, what))
            return
        if state is not None:
            self.store.delete(case.key)
            history.remember(self.config, state, "recovered: %s" % what,
                             **digest.outcome(state))
        self.out("%s: recovered (%s)" % (case.label, what))
        log.info("recover %s: recovered (%s)", case.label, what)
