"""Sessions: one freeze of one base disk, shared by every connection to it.

A session's life, one JSON file per base disk, under that disk's lock::

      (no file)  --prerun, domain running-->  intent --snapshot--> frozen
          ^      --prerun, domain shut off------------------------> frozen
          |                                                          |
          |           last live holder's postrun                     |
          +---- (file removed) <-- committing <----------------------+
                                        |
                                        +--commit fails--> failed

"intent" is written before the snapshot call and "committing" before the
commit, so a hook that dies half way leaves a trace that recovery reads.
Holders are the nbd-server children serving the session's connections; a
session none of whose holders is alive is stale.

A group is the disks of one domain frozen at one instant (one atomic
snapshot): each has its session, which names the group and its members,
and the group is one freeze.  Its members are locked together (in key
order), a connection to any of them holds all of them, and the last one
to end commits them all; a member is stale only when the whole group is.

A Session is the state, with its description and its transitions (pure);
SessionStore does the I/O.
"""

import contextlib
import errno
import fcntl
import json
import math
import os
import secrets
import stat
import time

from nbdsnap.verify.files import fsync_dir, write_atomic

from . import procs
from .errors import (ConfigError, CorruptState, Error, LockError,
                     LockTimeout, NotFound)

VERSION = 1

INTENT = "intent"
FROZEN = "frozen"
COMMITTING = "committing"
FAILED = "failed"
PHASES = (INTENT, FROZEN, COMMITTING, FAILED)

ONLINE = "online"     # the domain ran: an overlay takes its writes
OFFLINE = "offline"   # the domain was shut off: nothing to snapshot

# Every overlay nbdsnap creates is snapshot_dir/OVERLAY_PREFIX...
OVERLAY_PREFIX = "nbdsnap-"

# What every session file holds; the rest (overlay, digest...) may be absent.
REQUIRED = frozenset(("id", "key", "export", "domain", "uuid", "disk", "base",
                      "mode", "phase", "holders", "created"))

# What assess() says of a session seen under its lock.
LIVE = "live"         # frozen, with at least one live holder: join it
STALE = "stale"       # no live holder, or a hook died half way
BROKEN = "failed"     # a commit failed: left for recovery


# -- pure state ------------------------------------------------------------

def disk_key(st):
    """A file name that is the same for every path to the same disk.

    Block devices by device number (so /dev/vg/lv, /dev/mapper/vg-lv and
    /dev/dm-3 share it), files by device and inode.
    """
    if stat.S_ISBLK(st.st_mode):
        return "b-%d-%d" % (os.major(st.st_rdev), os.minor(st.st_rdev))
    return "f-%x-%d" % (st.st_dev, st.st_ino)


def export_key(export):
    """disk_key of the path a hook was given; NotFound if it is gone."""
    try:
        return disk_key(os.stat(export))
    except OSError as e:
        raise NotFound("cannot open export %s: %s" % (export, e.strerror))


class Session(dict):
    """One session: its JSON object, with its description and transitions.

    A dict, so that the store writes it as it always has (byte for byte)
    and a reader says state["phase"]; a transition returns a new Session
    and leaves this one as it was.
    """

    def describe(self):
        """The words every log line about a session carries."""
        others = [d for d in self.group_disks() if d != self["disk"]]
        return "session %s (domain %s disk %s export %s%s)" % (
            self["id"], self["domain"], self["disk"], self["export"],
            ", frozen with %s" % ", ".join(others) if others else "")

    def group_keys(self):
        """The keys of the disks frozen with this one, this one's too."""
        if not self.get("group"):
            return [self["key"]]
        return [m["key"] for m in self["group"]["members"]]

    def group_disks(self):
        if not self.get("group"):
            return [self["disk"]]
        return [m["disk"] for m in self["group"]["members"]]

    def is_peer(self, other):
        """Is other a session of the same group (not this one)?"""
        return (other is not None and other["key"] != self["key"]
                and bool(self.get("group")) and bool(other.get("group"))
                and other["group"]["id"] == self["group"]["id"])

    def holders(self):
        return [procs.Holder.from_json(h) for h in self["holders"]]

    def live_holders(self, alive):
        return [h for h in self.holders() if alive(h)]

    def assess(self, alive, peers=()):
        """What a hook holding the lock may do with an existing session.

        intent and committing are only ever seen under the lock when the
        hook that wrote them died before it finished: they are stale.
        peers: the other sessions of its group; a live holder of any of
        them holds this one too.
        """
        if self["phase"] == FAILED:
            return BROKEN
        if self["phase"] == FROZEN and (self.live_holders(alive)
                                        or self.group_held(peers, alive)):
            return LIVE
        return STALE

    def group_held(self, peers, alive):
        """Does a live connection to another disk of the group hold it?"""
        return any(self.is_peer(p) and p["phase"] == FROZEN
                   and Session(p).live_holders(alive) for p in peers)

    def with_phase(self, phase, now=None, **changes):
        new = Session(self, phase=phase, **changes)
        new["updated"] = time.time() if now is None else now
        return new

    def join(self, holder, now=None):
        """Add a holder (a second hook run for one connection is a no-op)."""
        hs = self["holders"]
        count = self.get("connections", len(hs))
        if holder.to_json() not in hs:
            hs = hs + [holder.to_json()]
            count += 1
        return self.with_phase(self["phase"], now=now, holders=hs,
                               connections=count)

    def leave(self, holder, alive, now=None):
        """Remove holder: (new session, was it a holder, live holders left)."""
        me = holder.to_json()
        was = me in self["holders"]
        rest = [h for h in self["holders"] if h != me]
        new = self.with_phase(self["phase"], now=now, holders=rest)
        return new, was, new.live_holders(alive)


def new_group(members, now=None):
    """The group field of sessions frozen together: [(key, disk, export)]."""
    now = time.time() if now is None else now
    return {"id": "%s-%s" % (time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)),
                             secrets.token_hex(3)),
            "members": [{"key": k, "disk": d, "export": e}
                        for k, d, e in members]}


def new_session(key, export, domain, uuid, disk, base, mode, holder,
                overlay=None, consistency=None, now=None, base_type="file",
                base_format="raw", group=None):
    """holder None: a disk frozen with the connection's, in group."""
    now = time.time() if now is None else now
    holders = [holder.to_json()] if holder is not None else []
    state = Session({
        "version": VERSION,
        "id": "%s-%s" % (time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)),
                         secrets.token_hex(3)),
        "key": key,
        "export": export,
        "domain": domain,
        "uuid": uuid,
        "disk": disk,
        "base": base,              # the path as the domain XML spells it,
        "base_type": base_type,    # file or block, and its format: enough
        "base_format": base_format,  # to point the domain back at it
        "mode": mode,
        "phase": INTENT if mode == ONLINE else FROZEN,
        "overlay": overlay,
        "consistency": consistency or ("offline" if mode == OFFLINE else None),
        "holders": holders,
        "connections": len(holders),   # every connection that held it
        "created": now,
        "updated": now,
        "error": None,
    })
    if group is not None:
        state["group"] = group
    return state


# The same for a session as a plain dict (status, lint, the libvirt hook).

def describe(state):
    return Session(state).describe()


def holders(state):
    return Session(state).holders()


def live_holders(state, alive):
    return Session(state).live_holders(alive)


def assess(state, alive, peers=()):
    return Session(state).assess(alive, peers)


def with_phase(state, phase, now=None, **changes):
    return Session(state).with_phase(phase, now, **changes)


def join(state, holder, now=None):
    return Session(state).join(holder, now)


def leave(state, holder, alive, now=None):
    return Session(state).leave(holder, alive, now)


# -- the store -------------------------------------------------------------

def _secure_dir(path, mode):
    """Create path (and parents) or check that it is ours and safe.

    Hooks run as root: a directory that others can write, or a symlink
    planted in its place, could redirect an overlay or a state file.
    """
    try:
        if not os.path.lexists(path):
            os.makedirs(path, mode=mode, exist_ok=True)
            os.chmod(path, mode)   # makedirs' mode is masked by the umask
        st = os.lstat(path)
    except OSError as e:
        raise ConfigError("cannot create %s: %s" % (path, e.strerror))
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError("%s is not a directory (a symlink?)" % path)
    if st.st_uid != os.geteuid():
        raise ConfigError("%s belongs to uid %d, not to us (uid %d)"
                          % (path, st.st_uid, os.geteuid()))
    if st.st_mode & 0o022:
        raise ConfigError("%s is writable by group or others (mode %o)"
                          % (path, stat.S_IMODE(st.st_mode)))


class DiskLock:
    """An exclusive flock on one base disk's lock file.

    flock, not a lock file that exists or not: the kernel releases it when
    the holder dies, even by SIGKILL, so a crashed hook never wedges a disk.

    Not the filelock package, though the design card named it: Debian 12
    ships python3-filelock 3.9, which opens the file without O_NOFOLLOW and
    truncates it at every waiter's open (erasing the holder's pid that the
    timeout message names); the release that has neither (4.0) is on PyPI
    only, needs Python 3.10, and costs every hook run 25 ms of imports
    (21 modules) for the 50 lines it would replace.
    """

    def __init__(self, path, timeout, poll=0.05):
        self.path = path
        self.timeout = timeout
        self.poll = poll
        self.fd = None

    def __enter__(self):
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError as e:
            # ELOOP: a symlink planted in place of the lock file.
            raise LockError("cannot open lock file %s: %s"
                              % (self.path, e.strerror))
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            if time.monotonic() >= deadline:
                holder = _holder(fd)
                os.close(fd)
                raise LockTimeout(
                    "%s has held the lock %s for more than %g s "
                    "(lock_timeout); giving up" % (holder, self.path,
                                                   self.timeout))
            time.sleep(self.poll)
        # Say who holds it, for the message of whoever waits in vain.
        os.ftruncate(fd, 0)
        os.pwrite(fd, ("%d\n" % os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        os.close(self.fd)   # closing the last descriptor releases the flock
        self.fd = None


def _holder(fd):
    """'pid N (command)' from a lock file's content, for messages."""
    try:
        pid = int(os.pread(fd, 32, 0).decode().strip())
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        # One line, whatever the command line holds (it is the holder's).
        cmd = "".join(c if c.isprintable() else "?" for c in cmd.strip())
        return "pid %d (%s)" % (pid, cmd[:120])
    except (ValueError, OSError):
        return "another process"


def malformed(state, key):
    """What makes state no session of disk key, or None if it is one.

    Every later step reads these fields without checking them again: a
    holder that is not {pid, start, boot} would end status, recover and
    the hooks in a traceback instead of a corrupt state to set aside.
    """
    if not isinstance(state, dict):
        return "not a JSON object"
    if state.get("version") != VERSION:
        return "version %r" % (state.get("version"),)
    missing = REQUIRED - set(state)
    if missing:
        return "no %s" % ", ".join(sorted(missing))
    if state["key"] != key:
        return "key %r" % (state["key"],)
    if state["phase"] not in PHASES:
        return "phase %r" % (state["phase"],)
    if state["mode"] not in (ONLINE, OFFLINE):
        return "mode %r" % (state["mode"],)
    for name in ("id", "export", "domain", "uuid", "disk", "base"):
        if not isinstance(state[name], str):
            return "%s %r is no string" % (name, state[name])
    # Texts that history, status, qemu-img and lxml are handed as they are.
    for name in ("overlay", "base_type", "base_format", "consistency",
                 "warning", "error"):
        if not isinstance(state.get(name), (str, type(None))):
            return "%s %r is no string" % (name, state[name])
    # json.load accepts NaN and Infinity, and a time far beyond time_t is
    # no date either: no time a status or the history can print.
    if not _is_time(state["created"]):
        return "created %r is no time" % (state["created"],)
    if "updated" in state and not _is_time(state["updated"]):
        return "updated %r is no time" % (state["updated"],)
    if "connections" in state and not (_is_int(state["connections"])
                                       and state["connections"] >= 0):
        return "connections %r is no count" % (state["connections"],)
    if not isinstance(state["holders"], list):
        return "holders %r is no list" % (state["holders"],)
    for h in state["holders"]:
        if not _is_holder(h):
            return "malformed holder %.80r" % (h,)
    return (_malformed_group(state.get("group"), key)
            or _malformed_digest(state.get("digest")))


def _malformed_group(group, key):
    """None, or {id, members: [{key, disk, export}]} with key among them."""
    if group is None:
        return None
    if not (isinstance(group, dict) and isinstance(group.get("id"), str)
            and isinstance(group.get("members"), list)
            and all(isinstance(m, dict)
                    and all(isinstance(m.get(f), str)
                            for f in ("key", "disk", "export"))
                    for m in group["members"])
            and key in [m["key"] for m in group["members"]]):
        return "malformed group %.80r" % (group,)
    return None


def _malformed_digest(info):
    """What digest.start stored: None, or {manifest} and, when the digest
    process was found, its holder fields {pid, start, boot}, which the last
    postrun and recover read to wait for it."""
    if info is None:
        return None
    if not (isinstance(info, dict)
            and isinstance(info.get("manifest"), str)):
        return "malformed digest %.80r" % (info,)
    if {"pid", "start", "boot"} & set(info) and not _is_holder(info):
        return "malformed digest %.80r" % (info,)
    return None


def _is_holder(h):
    return (isinstance(h, dict) and {"pid", "start", "boot"} <= set(h)
            and _is_int(h["pid"]) and h["pid"] > 0
            and _is_int(h["start"]) and isinstance(h["boot"], str))


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_time(value):
    """Seconds since the epoch that time.gmtime() takes: finite, and
    between 1970 and the year 2242 (2**33 s)."""
    return ((_is_int(value) or (isinstance(value, float)
                                and math.isfinite(value)))
            and 0 <= value < 2 ** 33)


class SessionStore:
    def __init__(self, config):
        self.config = config
        self._held = []     # the keys locks() holds now

    def held_keys(self):
        return list(self._held)

    def prepare(self):
        """Create or check state_dir, its sub-folders and snapshot_dir."""
        # state_dir must be traversable when snapshot_dir lies inside it,
        # so that QEMU (libvirt-qemu) can reach the overlays; the session
        # and lock folders below it stay root-only.
        _secure_dir(self.config.state_dir, 0o711)
        _secure_dir(self.config.sessions_dir, 0o700)
        _secure_dir(self.config.locks_dir, 0o700)
        _secure_dir(self.config.snapshot_dir, 0o711)

    def lock(self, key):
        return DiskLock(os.path.join(self.config.locks_dir, key + ".lock"),
                        self.config.lock_timeout)

    @contextlib.contextmanager
    def locks(self, keys):
        """The locks of several disks, always taken in the same order."""
        keys = sorted(set(keys))
        with contextlib.ExitStack() as stack:
            for key in keys:
                stack.enter_context(self.lock(key))
            self._held += keys
            try:
                yield
            finally:
                del self._held[-len(keys):]

    @contextlib.contextmanager
    def group_lock(self, key, extra=()):
        """Lock disk key with every disk of its group (and extra); yield
        its session as it is under those locks (None: no session).

        The group is read before the locks, to know which to take, and
        again under them: a group that grew meanwhile means another turn.
        """
        keys = {key, *extra}
        for _ in range(20):
            keys |= set(self._peek_group(key))
            with self.locks(keys):
                state = self.load(key)
                need = set(state.group_keys()) if state else set()
                if need <= keys:
                    yield state
                    return
            keys |= need
        raise LockError("the group of disk %s kept changing while its "
                        "locks were taken" % key)

    def _peek_group(self, key):
        try:
            state = self.load(key)
        except Error:
            return []       # told again under the lock
        return state.group_keys() if state else []

    def peers(self, state):
        """The other sessions of state's group (read under their locks by
        the hooks, as they are by status); a corrupt one is left out."""
        found = []
        for key in Session(state).group_keys():
            if key == state["key"]:
                continue
            try:
                other = self.load(key)
            except Error:
                continue
            if Session(state).is_peer(other):
                found.append(other)
        return found

    def assess(self, state, alive):
        """state.assess() with its group's other sessions."""
        return Session(state).assess(alive, self.peers(state))

    def domain_lock(self, uuid, name):
        """The lock of a domain's definition (taken after a disk's)."""
        return self.lock("domain-%s" % (uuid or name))

    def is_ours(self, path):
        """Is path an overlay that nbdsnap created?"""
        return (path is not None
                and os.path.dirname(os.path.normpath(path))
                == self.config.snapshot_dir
                and os.path.basename(path).startswith(OVERLAY_PREFIX))

    def _path(self, key):
        return os.path.join(self.config.sessions_dir, key + ".json")

    def load(self, key):
        """The session of disk key, or None.  CorruptState if unreadable."""
        path = self._path(key)
        try:
            # O_NONBLOCK: a FIFO planted here must not hang the hook.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CorruptState("session state %s is a symlink, not ours"
                                   % path)
            # Unreadable is not corrupt: nothing may set it aside for this.
            raise Error("cannot open session state %s: %s"
                        % (path, e.strerror))
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CorruptState("session state %s is not a regular file "
                               "(a folder?)" % path)
        with os.fdopen(fd, encoding="utf-8") as f:
            try:
                state = json.load(f)
            except (ValueError, UnicodeDecodeError) as e:
                raise CorruptState("session state %s is corrupt: %s"
                                   % (path, e))
        problem = malformed(state, key)
        if problem:
            raise CorruptState("session state %s is not a version %d "
                               "session of this disk: %s"
                               % (path, VERSION, problem))
        return Session(state)

    def save(self, state):
        """Write atomically: temp file 0600, fsync, rename, fsync folder."""
        write_atomic(self._path(state["key"]),
                     json.dumps(state, sort_keys=True, indent=2) + "\n")

    def delete(self, key):
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            return
        fsync_dir(self.config.sessions_dir)

    def keys(self):
        try:
            names = os.listdir(self.config.sessions_dir)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise Error("cannot read %s: %s (nbdsnap runs as root)"
                        % (self.config.sessions_dir, e.strerror))
        return sorted(n[:-5] for n in names
                      if n.endswith(".json") and not n.startswith("."))
