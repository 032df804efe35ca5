"""What nbd-postrun does: release a connection; the last one commits.

Under the base disk's lock, with the locks of the disks frozen with it (a
group, see sessions): a postrun that is not the last one to hold the
freeze only saves the session without its holder; the last connection to
any disk of a group commits every disk of it (online, or offline when the
domain was shut off meanwhile), each with plan and commit, and records
each in the history.
"""

import logging
import os
import stat
import time

from . import digest, history, lazy, procs, sessions, watchdog
from .errors import CommitFailed, Error, VirtError
from .sessions import FROZEN, OFFLINE

# Loaded when first used: a postrun that is not the last needs neither
# libvirt nor lxml (lazy.py).
commit = lazy.module("commit")
virt = lazy.module("virt")

log = logging.getLogger(__name__)


class Releaser:
    """nbd-postrun for one configuration."""

    def __init__(self, config):
        self.config = config
        self.store = sessions.SessionStore(config)

    def postrun(self, export, holder=None):
        """Release this connection; the last live holder commits, and the
        last of a group commits every disk of the group.

        Returns the session as it was when released, or None if this
        connection held nothing.
        """
        self.store.prepare()
        key = sessions.export_key(export)
        holder = holder or procs.connection_holder()
        failed, ended = [], []
        with self.store.group_lock(key) as state:
            if state is None:
                log.warning("no session for export %s; nothing to release "
                            "(pid %d)", export, holder.pid)
                return None
            new, was, left = state.leave(holder, procs.is_alive)
            if not was:
                log.warning("%s: pid %d holds no part of it; nothing to "
                            "release", state.describe(), holder.pid)
                return None
            peers = self.store.peers(state)
            if (left or state["phase"] != FROZEN
                    or new.group_held(peers, procs.is_alive)):
                self.store.save(new)
                log.info("%s: released by pid %d, %d live holders left%s",
                         new.describe(), holder.pid, len(left),
                         " (and the other disks' of its group)"
                         if not left and state["phase"] == FROZEN else "")
                return new
            # The last connection to any disk of the group: all end now.
            ending = [new] + [p for p in peers if p["phase"] == FROZEN]
            if len(ending) > 1:
                watchdog.extend("nbd-postrun", watchdog.seconds(
                    self.config, "nbd-postrun", len(ending)))
            # The commit writes into the base: the digest must be done.
            for s in ending:
                digest.finish(self.config, s)
            for s in ending:
                if s["mode"] == OFFLINE:
                    self.store.delete(s["key"])
                    ended.append(s)
                    continue
                try:
                    self._commit(s)
                except CommitFailed as e:
                    # The other disks are committed all the same: one
                    # that cannot be must not keep the rest frozen.
                    failed.append(e)
        for s in ended:
            self._end_offline(s)
        if failed:
            raise CommitFailed("; ".join(map(str, failed)))
        return new

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
