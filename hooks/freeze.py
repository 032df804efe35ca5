"""What nbd-prerun and nbd-postrun do: freeze a base disk, release it.

Everything here runs under the base disk's lock, held across the
read-modify-write of the session state and the libvirt calls, so that the
4 connections of one nbdcopy, in any interleaving, make one freeze.

What it leans on, each one way: quiesce takes a running domain's snapshot,
settle ends a stale session first (stale = recover), plan and commit put
the disk back on its base, the Session (sessions) describes itself and
makes its transitions, the store saves it, history records its end.
"""

import logging
import os
import stat
import time

from . import digest, history, lazy, procs, sessions
from .errors import (CommitFailed, CorruptState, Error, NotFound, Stale,
                     Unsupported, VirtError)
from .sessions import FROZEN, OFFLINE, ONLINE

# Loaded when first used: a join and a postrun that is not the last need
# neither libvirt nor lxml (lazy.py).
commit = lazy.module("commit")
locate = lazy.module("locate")
quiesce_mod = lazy.module("quiesce")
settle = lazy.module("settle")
tracking = lazy.module("tracking")
virt = lazy.module("virt")

log = logging.getLogger(__name__)


def disk_key(export):
    try:
        return sessions.disk_key(os.stat(export))
    except OSError as e:
        raise NotFound("cannot open export %s: %s" % (export, e.strerror))


class Freezer:
    """The hooks' operations for one configuration."""

    def __init__(self, config):
        self.config = config
        self.store = sessions.SessionStore(config)

    # -- prerun ------------------------------------------------------------

    def prerun(self, export, quiesce=None, domain=None, disk=None,
               holder=None):
        """Freeze export's base for this connection; return the session."""
        self.store.prepare()
        key = disk_key(export)
        holder = holder or procs.connection_holder()
        with self.store.lock(key):
            try:
                state = self.store.load(key)
            except CorruptState as e:
                raise CorruptState("%s; refusing until 'nbdsnap recover %s' "
                                   "has run" % (e, export))
            conn = None
            try:
                if state is not None:
                    if state.assess(procs.is_alive) == sessions.LIVE:
                        return self._join(state, holder)
                    conn = virt.connect()
                    self._stale(conn, state, export)
                conn = conn or virt.connect()
                return self._freeze(conn, export, key, holder, domain, disk,
                                    quiesce or self.config.quiesce)
            finally:
                if conn is not None:
                    conn.close()

    def _join(self, state, holder):
        state = state.join(holder)
        self.store.save(state)
        log.info("%s: joined by pid %d, %d holders", state.describe(),
                 holder.pid, len(state["holders"]))
        return state

    def _stale(self, conn, state, export):
        """A session nobody holds: refuse, or recover it (stale = recover)."""
        verdict = state.assess(procs.is_alive)
        why = ("its commit failed: %s" % state.get("error")
               if verdict == sessions.BROKEN else
               "no holder of it is alive (phase %s)" % state["phase"])
        if self.config.stale != "recover":
            raise Stale("%s is stale, %s; refusing until "
                        "'nbdsnap recover %s' has run"
                        % (state.describe(), why, export))
        log.warning("%s is stale, %s; recovering it first (stale = recover)",
                    state.describe(), why)
        settler = settle.Settler(self.config, out=lambda line: None)
        settler.exclude = (procs.connection_holder().pid,)
        settler.clean_qemu = False
        case = settle.Case(state["key"], state["export"], None, state)
        if not settler.locked(conn, case, state):
            raise Stale("%s is stale and could not be recovered; see "
                        "'nbdsnap status'" % state.describe())

    def _locate(self, conn, export, key, domain, disk):
        if domain or disk:
            if not (domain and disk):
                raise NotFound("--domain and --disk go together")
            found = virt.lookup(conn, name=domain)
            if found is None:
                raise NotFound("no libvirt domain is named %s" % domain)
            dom, parsed = found
            return dom, locate.check_named(parsed, disk, export, key,
                                           locate.key_of, self.store.is_ours)
        doms = virt.all_domains(conn)
        found = locate.matches([p for _, p in doms], key, locate.key_of,
                               self.store.is_ours)
        match = locate.choose(found, export, len(doms))
        dom = next(d for d, p in doms if p is match.domain)
        return dom, match

    def _freeze(self, conn, export, key, holder, domain, disk, quiesce):
        dom, match = self._locate(conn, export, key, domain, disk)
        where = "domain %s disk %s export %s" % (match.domain.name,
                                                  match.disk.target, export)
        if match.how == locate.FROZEN:
            raise Stale("%s runs on overlay %s from an earlier freeze that "
                        "has no session; refusing until 'nbdsnap recover "
                        "%s' has run" % (where, match.disk.top.path, export))
        dstate = virt.state(dom)
        base = match.disk.top.path
        if dstate == virt.SHUTOFF:
            with self.store.domain_lock(match.domain.uuid,
                                        match.domain.name):
                state = self._freeze_offline(dom, match, export, key, holder,
                                             base)
                xml = self._definition(dom, state)
            return self._start_digest(state, None, xml)
        if dstate not in (virt.RUNNING, virt.PAUSED):
            raise Unsupported("%s: domain is %s; it can be frozen only when "
                              "running, paused or shut off" % (where, dstate))
        return self._snapshot(dom, match, export, key, holder, base, quiesce)

    def _freeze_offline(self, dom, match, export, key, holder, base):
        state = sessions.new_session(
            key, export, match.domain.name, match.domain.uuid,
            match.disk.target, base, OFFLINE, holder,
            base_type=match.disk.top.type, base_format=match.disk.top.format)
        self.store.save(state)
        # The libvirt hook refuses a start once this session is saved; a
        # start that got past the hook before is seen here: libvirt marks
        # the domain "paused, starting up" before it runs the hook
        # (qemuProcessInit), and reading the state waits while a hook runs
        # (measured: the domain object stays locked meanwhile).
        now = virt.state(dom)
        if now != virt.SHUTOFF:
            self.store.delete(key)
            raise Unsupported("%s: the domain was started (it is %s) while "
                              "this prerun prepared a copy of it shut off; "
                              "refused, the next connection freezes it "
                              "running" % (state.describe(), now))
        from .served import what_clients_copy
        log.info("%s: domain is shut off, nothing to snapshot; frozen "
                 "for pid %d; clients copy %s", state.describe(),
                 holder.pid, what_clients_copy(match.disk,
                                               self.store.is_ours))
        return state

    def _overlay_path(self, match, session_id):
        return os.path.join(self.config.snapshot_dir, "%s%s-%s-%s.qcow2" % (
            sessions.OVERLAY_PREFIX, match.domain.uuid, match.disk.target,
            session_id))

    def _snapshot(self, dom, match, export, key, holder, base, quiesce):
        # One snapshot of a domain at a time, and none during a commit of
        # another of its disks: each rewrites the whole persistent
        # definition (two at once can revert the other's disk), and the
        # agent's response timeout is the domain's, not the disk's.
        with self.store.domain_lock(match.domain.uuid,
                                    match.domain.name):
            state, tracked, xml = self._snapshot_locked(
                dom, match, export, key, holder, base, quiesce)
        return self._start_digest(state, tracked, xml)

    def _snapshot_locked(self, dom, match, export, key, holder, base,
                         quiesce):
        dstate = virt.state(dom)    # it may have changed while we waited
        if dstate not in (virt.RUNNING, virt.PAUSED):
            raise Unsupported("domain %s became %s while this prerun waited "
                              "for its lock; try again"
                              % (match.domain.name, dstate))
        state = sessions.new_session(key, export, match.domain.name,
                                     match.domain.uuid, match.disk.target,
                                     base, ONLINE, holder,
                                     base_type=match.disk.top.type,
                                     base_format=match.disk.top.format)
        overlay = self._overlay_path(match, state["id"])
        state["overlay"] = overlay
        # Never over an existing path or a planted symlink.  snapshot_dir is
        # root's and closed to others (SessionStore.prepare), so nothing can
        # appear there between this check and libvirt's create.
        if os.path.lexists(overlay):
            raise Unsupported("overlay path %s already exists" % overlay)
        from .served import what_clients_copy
        copied = what_clients_copy(match.disk, self.store.is_ours)
        self.store.save(state)          # intent: before the snapshot call
        # The definition the base belongs to, before the snapshot points
        # it at the overlay.
        xml = self._definition(dom, state)
        log.info("%s: snapshot into %s (quiesce %s); clients copy %s",
                 state.describe(), overlay, quiesce, copied)
        try:
            taken = quiesce_mod.take(dom, match.domain, match.disk.target,
                                     overlay, quiesce,
                                     self.config.quiesce_timeout, state)
        except BaseException:
            self._undo_intent(dom, match.disk.target, overlay, state)
            raise
        state = state.with_phase(FROZEN, consistency=taken.consistency,
                                 warning=taken.warning)
        if taken.watcher is not None:
            state["agent_watcher"] = taken.watcher.to_json()
        self.store.save(state)
        log.info("%s: frozen (%s) for pid %d", state.describe(),
                 taken.consistency, holder.pid)
        return state, self._track(dom, state), xml

    def _definition(self, dom, state):
        """digest = on: the domain's definition, for the manifest."""
        if not self.config.digest:
            return ""
        try:
            return virt.definition(dom)
        except VirtError as e:
            log.warning("%s: the manifest holds no domain definition: %s",
                        state.describe(), e)
            return ""

    def _track(self, dom, state):
        """digest = on: swap the frozen base's bitmaps (tracking.py), while
        the domain lock keeps QEMU's NBD server ours."""
        if not self.config.digest:
            return None
        from nbdsnap.verify import sources
        from nbdsnap.verify.errors import Error as VerifyError
        path = digest.manifest_path(self.config, state)
        previous = digest.previous(path)
        try:
            with sources.open_source(state["export"]) as source:
                size = source.size
            return tracking.online(self.config, dom, state["base"], previous,
                                   size, state.describe())
        except (OSError, Error, VerifyError) as e:
            why = "cannot track changes: %s" % e
            log.warning("%s: %s; a full digest", state.describe(), why)
            return tracking.offline(self.config, previous, why=why)

    def _start_digest(self, state, tracked, xml):
        """digest = on: the session's manifest, before the client reads."""
        if not self.config.digest:
            return state
        from nbdsnap.verify.errors import Error as VerifyError
        try:
            info, release = digest.start(self.config, state,
                                         state["export"], tracked, xml,
                                         hold=True)
        except (OSError, Error, VerifyError) as e:
            # The copy can go ahead; only its manifest is missing.
            log.error("%s: cannot start the digest, no manifest for this "
                      "session: %s", state.describe(), e)
            return state
        state = sessions.Session(state, digest=info)
        self.store.save(state)
        # Only now: a prerun killed before the save never lets a digest
        # read the base that recover, knowing nothing of it, may commit.
        release()
        return state

    def _undo_intent(self, dom, target, overlay, state):
        try:
            quiesce_mod.remove_unused(dom, target, overlay)
        except Exception as e:   # keep the intent: recovery will see it
            log.error("%s: snapshot failed and the intent is kept for "
                      "recovery: %s", state.describe(), e)
            return
        self.store.delete(state["key"])

    # -- postrun -----------------------------------------------------------

    def postrun(self, export, holder=None):
        """Release this connection; the last live holder commits.

        Returns the session as it was when released, or None if this
        connection held nothing.
        """
        self.store.prepare()
        key = disk_key(export)
        holder = holder or procs.connection_holder()
        with self.store.lock(key):
            state = self.store.load(key)
            if state is None:
                log.warning("no session for export %s; nothing to release "
                            "(pid %d)", export, holder.pid)
                return None
            new, was, left = state.leave(holder, procs.is_alive)
            if not was:
                log.warning("%s: pid %d holds no part of it; nothing to "
                            "release", state.describe(), holder.pid)
                return None
            if left or state["phase"] != FROZEN:
                self.store.save(new)
                log.info("%s: released by pid %d, %d live holders left",
                         new.describe(), holder.pid, len(left))
                return new
            # The commit writes into the base: the digest must be done.
            digest.finish(self.config, new)
            if new["mode"] != OFFLINE:
                return self._commit(new)
            self.store.delete(new["key"])
        return self._end_offline(new)

    def _end_offline(self, state):
        """The offline session is deleted: say whether the domain ran.

        Only after the disk lock is released: libvirt's lookup waits for a
        start's hooks, and the libvirt hook of that start waits for this
        lock, then refuses the start as if a copy were under way.
        """
        conn = None
        try:
            conn = virt.connect()
            found = virt.lookup(conn, uuid=state["uuid"])
            if found and virt.state(found[0]) != virt.SHUTOFF:
                log.warning("%s: the domain was started during the freeze "
                            "(or as it ended); copies taken meanwhile may "
                            "be inconsistent", state.describe())
        except VirtError as e:
            log.warning("%s: cannot check the domain: %s", state.describe(), e)
        finally:
            if conn is not None:
                conn.close()
        history.remember(self.config, state,
                         "ended: shut off, nothing to commit",
                         **digest.outcome(state))
        log.info("%s: ended; the domain was shut off, nothing to commit",
                 state.describe())
        return state

    def _commit(self, state):
        """The last live holder is gone: put the disk back on its base."""
        # The plan sees the session as frozen: were the domain found on its
        # base already, the overlay is compared, not assumed merged.
        freeze = commit.Freeze.from_session(state)
        state = state.with_phase(sessions.COMMITTING)
        self.store.save(state)
        started = time.monotonic()
        size = _size(state["overlay"])
        # Once merging or merged, every later state says so (the failed one
        # too).
        marks = {}

        def record(mark):
            marks[mark] = True
            self.store.save(dict(state, **marks))
        try:
            conn = virt.connect()
            try:
                step = commit.plan(conn, freeze)
                log.info("%s: last holder gone; %s", state.describe(), step)
                commit.run(conn, freeze, step, self.config.commit_timeout,
                           merged=lambda: record("merged"),
                           merging=lambda: record("merging"),
                           domain_lock=lambda: self.store.domain_lock(
                               freeze.uuid, freeze.domain))
            finally:
                conn.close()
        except Error as e:
            failed = state.with_phase(sessions.FAILED, error=str(e),
                                      **marks)
            self.store.save(failed)
            raise CommitFailed("%s: %s; overlay %s kept, run 'nbdsnap "
                               "recover %s'" % (state.describe(), e,
                                                state["overlay"],
                                                state["export"]))
        took = time.monotonic() - started
        self.store.delete(state["key"])
        history.remember(self.config, state, step.action,
                         overlay_bytes=size, commit_seconds=took,
                         **digest.outcome(state))
        log.info("%s: %s of %s done in %.2f s; domain back on its base, "
                 "overlay removed", state.describe(), step.action,
                 _human(size), took)
        return state


def _size(path):
    try:
        st = os.stat(path)
    except OSError:
        return 0
    return st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else 0


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return "%.0f %s" % (n, unit) if unit == "B" else "%.1f %s" % (n, unit)
        n /= 1024
