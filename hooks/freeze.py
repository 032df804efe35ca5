"""What nbd-prerun does: freeze a base disk, or the disks of a group at
one instant, for a connection, or join the freeze already there.

Everything here runs under the base disk's lock (and the locks of the
disks of its group), held across the read-modify-write of the session
state and the libvirt calls, so that the 4 connections of one nbdcopy, in
any interleaving, make one freeze.  Its end is release.py's.

What it leans on, each one way: quiesce takes a running domain's snapshot,
settle ends a stale session first (stale = recover), tracking and digest
make the freeze's manifest, the Session (sessions) describes itself and
makes its transitions, the store saves it.
"""

import contextlib
import dataclasses
import logging
import os

from . import digest, lazy, procs, sessions, watchdog
from .errors import (ConfigError, CorruptState, Error, NotFound, Stale,
                     Unsupported, VirtError)
from .sessions import FROZEN, OFFLINE, ONLINE

# Loaded when first used: a join needs neither libvirt nor lxml (lazy.py).
domxml = lazy.module("domxml")
locate = lazy.module("locate")
quiesce_mod = lazy.module("quiesce")
served = lazy.module("served")
settle = lazy.module("settle")
tracking = lazy.module("tracking")
virt = lazy.module("virt")

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Member:
    """A disk to freeze: the connection's own, or one frozen with it."""
    match: object          # locate.Match
    export: str
    key: str

    @property
    def target(self):
        return self.match.disk.target


class Freezer:
    """The hooks' operations for one configuration."""

    def __init__(self, config):
        self.config = config
        self.store = sessions.SessionStore(config)

    # -- prerun ------------------------------------------------------------

    def prerun(self, export, quiesce=None, domain=None, disk=None,
               holder=None, group=()):
        """Freeze export's base for this connection; return the session.

        group: the disks (targets) of domain to freeze at one instant with
        disk, disk among them; a connection to any of them holds them all.
        """
        group = tuple(dict.fromkeys(group or ()))
        if group and not (domain and disk and disk in group):
            raise ConfigError("--group needs --domain and --disk, and "
                              "names --disk among its disks")
        if len(group) == 1:
            group = ()
        self.store.prepare()
        key = sessions.export_key(export)
        holder = holder or procs.connection_holder()
        conn = members = None
        try:
            if group and not self._joinable(key, group):
                # The first freeze of the group: its disks' locks are
                # known only from the domain.
                conn = virt.connect()
                members = self._members(conn, domain, disk, group, export,
                                        key)[1]
            try:
                with self.store.group_lock(
                        key, [m.key for m in members or ()]) as state:
                    return self._prerun_locked(
                        conn, state, export, key, holder, domain, disk,
                        group, quiesce or self.config.quiesce)
            except CorruptState as e:
                raise CorruptState("%s; refusing until 'nbdsnap recover %s' "
                                   "has run" % (e, e.export or export))
        finally:
            if conn is not None:
                conn.close()

    def _joinable(self, key, group):
        """Is key frozen with every disk of group already (no libvirt)?"""
        try:
            state = self.store.load(key)
        except Error:
            return False
        return state is not None and set(group) <= set(state.group_disks())

    def _prerun_locked(self, conn, state, export, key, holder, domain, disk,
                       group, quiesce):
        disks = max(len(group), len(state.group_keys()) if state else 1)
        if disks > 1:
            watchdog.extend("nbd-prerun",
                            watchdog.seconds(self.config, "nbd-prerun",
                                             disks))
        peers = self.store.peers(state) if state is not None else []
        if state is not None and (state.assess(procs.is_alive, peers)
                                  == sessions.LIVE):
            if not set(group) <= set(state.group_disks()):
                raise Unsupported(
                    "%s: the disks %s are to be copied at one instant, but "
                    "this one is frozen without %s; refused until that "
                    "freeze ends" % (state.describe(), ", ".join(group),
                                     ", ".join(sorted(
                                         set(group)
                                         - set(state.group_disks())))))
            return self._join(state, holder)
        with contextlib.ExitStack() as stack:
            if conn is None:
                conn = virt.connect()
                stack.callback(conn.close)
            dom, members = (self._members(conn, domain, disk, group, export,
                                          key)
                            if group else (None, None))
            stale = [s for s in [state] + peers if s is not None]
            for m in members or ():
                try:
                    other = self.store.load(m.key) if m.key != key else None
                except CorruptState as e:
                    # Its recovery sets it aside, not this export's.
                    e.export = m.export
                    raise
                if other is None or other["key"] in [s["key"] for s in stale]:
                    continue
                if self.store.assess(other, procs.is_alive) == sessions.LIVE:
                    raise Unsupported(
                        "disk %s of domain %s is frozen by %s, without %s; "
                        "the disks %s cannot be frozen at one instant until "
                        "it ends" % (m.target, domain, other.describe(),
                                     disk, ", ".join(group)))
                stale.append(other)
            if len(stale) > max(len(group), 1):
                # Each stale session is committed first.
                watchdog.extend("nbd-prerun", watchdog.seconds(
                    self.config, "nbd-prerun", len(stale)))
            for s in stale:
                self._stale(conn, s, s["export"])
            if group and stale:
                # Read again: the recovery put the disks back on their bases.
                dom, members = self._members(conn, domain, disk, group,
                                             export, key)
            elif dom is None:
                dom, members = self._locate(conn, export, key, domain, disk)
            return self._freeze(dom, members, holder, quiesce)

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
        """(dom, [the export's Member])."""
        if domain or disk:
            if not (domain and disk):
                raise NotFound("--domain and --disk go together")
            return self._members(conn, domain, disk, (disk,), export, key)
        doms = virt.all_domains(conn)
        found = locate.matches([p for _, p in doms], key, locate.key_of,
                               self.store.is_ours)
        match = locate.choose(found, export, len(doms))
        dom = next(d for d, p in doms if p is match.domain)
        return dom, [Member(match, export, key)]

    def _members(self, conn, domain, disk, targets, export, key):
        """(dom, [Member]) of domain's disks targets: disk, which must be
        export, first, then the others, each at its base."""
        found = virt.lookup(conn, name=domain)
        if found is None:
            raise NotFound("no libvirt domain is named %s" % domain)
        dom, parsed = found
        members = [Member(locate.check_named(parsed, disk, export, key,
                                             locate.key_of,
                                             self.store.is_ours),
                          export, key)]
        for target in targets:
            if target == disk:
                continue
            other = domxml.find_disk(parsed, target)
            if other is None or not other.top.path:
                path, mkey = export, None   # check_named says what is wrong
            else:
                path = served.base_path(other, self.store.is_ours)
                mkey = locate.key_of(path)
                if mkey is None:
                    raise NotFound("disk %s of domain %s: %s does not exist"
                                   % (target, domain, path))
            members.append(Member(locate.check_named(
                parsed, target, path, mkey, locate.key_of,
                self.store.is_ours), path, mkey))
        return dom, members

    def _freeze(self, dom, members, holder, quiesce):
        """Freeze members (the connection's first) at one instant."""
        for m in members:
            if m.match.how == locate.FROZEN:
                raise Stale("domain %s disk %s export %s runs on overlay %s "
                            "from an earlier freeze that has no session; "
                            "refusing until 'nbdsnap recover %s' has run"
                            % (m.match.domain.name, m.target, m.export,
                               m.match.disk.top.path, m.export))
        held = set(self.store.held_keys())
        if not {m.key for m in members} <= held:
            raise Unsupported("the disks of domain %s changed while this "
                              "prerun took their locks; try again"
                              % members[0].match.domain.name)
        group = None
        if len(members) > 1:
            group = sessions.new_group([(m.key, m.target, m.export)
                                        for m in members])
        domain = members[0].match.domain
        dstate = virt.state(dom)
        if dstate == virt.SHUTOFF:
            with self.store.domain_lock(domain.uuid, domain.name):
                states = self._freeze_offline(dom, members, holder, group)
                xml = self._definition(dom, states[0])
            tracked = [None] * len(states)
        elif dstate not in (virt.RUNNING, virt.PAUSED):
            raise Unsupported("domain %s disk %s export %s: domain is %s; "
                              "it can be frozen only when running, paused "
                              "or shut off" % (domain.name, members[0].target,
                                               members[0].export, dstate))
        else:
            # One snapshot of a domain at a time, and none during a commit
            # of another of its disks: each rewrites the whole persistent
            # definition (two at once can revert the other's disk), and
            # the agent's response timeout is the domain's, not the disk's.
            with self.store.domain_lock(domain.uuid, domain.name):
                states, tracked, xml = self._snapshot_locked(
                    dom, members, holder, group, quiesce)
        states = [self._start_digest(s, t, xml)
                  for s, t in zip(states, tracked)]
        return states[0]

    def _new(self, members, holder, mode, group):
        """The members' sessions, the connection's holding its disk."""
        domain = members[0].match.domain
        return [sessions.new_session(
            m.key, m.export, domain.name, domain.uuid, m.target,
            m.match.disk.top.path, mode, holder if i == 0 else None,
            base_type=m.match.disk.top.type,
            base_format=m.match.disk.top.format, group=group)
            for i, m in enumerate(members)]

    def _freeze_offline(self, dom, members, holder, group):
        states = self._new(members, holder, OFFLINE, group)
        for state in states:
            self.store.save(state)
        # The libvirt hook refuses a start once these sessions are saved; a
        # start that got past the hook before is seen here: libvirt marks
        # the domain "paused, starting up" before it runs the hook
        # (qemuProcessInit), and reading the state waits while a hook runs
        # (measured: the domain object stays locked meanwhile).
        now = virt.state(dom)
        if now != virt.SHUTOFF:
            for state in states:
                self.store.delete(state["key"])
            raise Unsupported("%s: the domain was started (it is %s) while "
                              "this prerun prepared a copy of it shut off; "
                              "refused, the next connection freezes it "
                              "running" % (states[0].describe(), now))
        for m, state in zip(members, states):
            log.info("%s: domain is shut off, nothing to snapshot; frozen "
                     "for pid %d; clients copy %s", state.describe(),
                     holder.pid, served.what_clients_copy(
                         m.match.disk, self.store.is_ours))
        return states

    def _overlay_path(self, member, session_id):
        domain = member.match.domain
        return os.path.join(self.config.snapshot_dir, "%s%s-%s-%s.qcow2" % (
            sessions.OVERLAY_PREFIX, domain.uuid, member.target, session_id))

    def _snapshot_locked(self, dom, members, holder, group, quiesce):
        domain = members[0].match.domain
        dstate = virt.state(dom)    # it may have changed while we waited
        if dstate not in (virt.RUNNING, virt.PAUSED):
            raise Unsupported("domain %s became %s while this prerun waited "
                              "for its lock; try again"
                              % (domain.name, dstate))
        states = self._new(members, holder, ONLINE, group)
        overlays = {}
        for m, state in zip(members, states):
            state["overlay"] = overlays[m.target] = self._overlay_path(
                m, state["id"])
            # Never over an existing path or a planted symlink.
            # snapshot_dir is root's and closed to others
            # (SessionStore.prepare), so nothing can appear there between
            # this check and libvirt's create.
            if os.path.lexists(state["overlay"]):
                raise Unsupported("overlay path %s already exists"
                                  % state["overlay"])
        for state in states:
            self.store.save(state)      # intent: before the snapshot call
        # The definition the bases belong to, before the snapshot points
        # it at the overlays.
        xml = self._definition(dom, states[0])
        for m, state in zip(members, states):
            log.info("%s: snapshot into %s (quiesce %s); clients copy %s",
                     state.describe(), state["overlay"], quiesce,
                     served.what_clients_copy(m.match.disk,
                                              self.store.is_ours))
        try:
            taken = quiesce_mod.take(dom, domain, overlays, quiesce,
                                     self.config.quiesce_timeout, states[0])
        except BaseException:
            self._undo_intent(dom, overlays, states)
            raise
        frozen = []
        for state in states:
            state = state.with_phase(FROZEN, consistency=taken.consistency,
                                     warning=taken.warning)
            if taken.watcher is not None:
                state["agent_watcher"] = taken.watcher.to_json()
            self.store.save(state)
            frozen.append(state)
        log.info("%s: frozen (%s) for pid %d", frozen[0].describe(),
                 taken.consistency, holder.pid)
        return frozen, [self._track(dom, s) for s in frozen], xml

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

    def _undo_intent(self, dom, overlays, states):
        try:
            for target, overlay in overlays.items():
                quiesce_mod.remove_unused(dom, target, overlay)
        except Exception as e:   # keep the intent: recovery will see it
            log.error("%s: snapshot failed and the intent is kept for "
                      "recovery: %s", states[0].describe(), e)
            return
        for state in states:
            self.store.delete(state["key"])
