"""Who holds a frozen disk: the nbd-server child that serves the connection.

nbd-server forks a child per connection and runs each hook through
system(), so a hook's ancestry is ``nbd-server (child) -> sh -c -> hook``
(dash does not exec the command).  The same child runs the connection's
prerun and its postrun, so it identifies the connection.  A pid alone can
be reused; pid + start time (clock ticks since boot) + boot id cannot.
"""

import dataclasses
import os

from .errors import Error

SHELLS = frozenset(("sh", "dash", "bash"))
SERVER = "nbd-server"


@dataclasses.dataclass(frozen=True)
class Holder:
    pid: int
    start: int   # /proc/PID/stat field 22, clock ticks after boot
    boot: str    # /proc/sys/kernel/random/boot_id

    def to_json(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d):
        return cls(pid=int(d["pid"]), start=int(d["start"]), boot=str(d["boot"]))


def boot_id():
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
        return f.read().strip()


def _stat(pid):
    """Return (comm, ppid, start) of pid, or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid, encoding="utf-8",
                  errors="replace") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm is in parentheses and may itself hold spaces or parentheses.
    lpar, rpar = data.index("("), data.rindex(")")
    comm = data[lpar + 1:rpar]
    fields = data[rpar + 2:].split()
    # fields[0] is field 3 (state): ppid is field 4, starttime field 22.
    if fields[0] in ("Z", "X"):
        return None   # exited; its parent has not reaped it yet
    return comm, int(fields[1]), int(fields[19])


def holder_of(pid):
    """The Holder for a live pid, or None if it is gone."""
    st = _stat(pid)
    return None if st is None else Holder(pid, st[2], boot_id())


def connection_holder(pid=None):
    """The process that stands for this hook's connection.

    The nearest nbd-server ancestor; when there is none (a hook run by hand
    from a shell or a script), the nearest ancestor that is not a shell
    wrapper, so that the caller's process holds the freeze.
    """
    pid = os.getpid() if pid is None else pid
    st = _stat(pid)
    chain = []
    while st is not None and st[1] > 1:
        pid = st[1]
        st = _stat(pid)
        if st is None:
            break
        chain.append((pid, st))
        if st[0] == SERVER:
            return Holder(pid, st[2], boot_id())
    for pid, st in chain:
        if st[0] not in SHELLS:
            return Holder(pid, st[2], boot_id())
    if chain:
        pid, st = chain[0]
        return Holder(pid, st[2], boot_id())
    raise RuntimeError("cannot find the process holding this connection")


def is_alive(holder, current_boot=None):
    """True if the holder's process still runs (not a reused pid)."""
    if holder.boot != (current_boot or boot_id()):
        return False
    st = _stat(holder.pid)
    return st is not None and st[2] == holder.start


def servers_with_open(key, key_of, exclude=()):
    """Pids of nbd-server processes that have the disk with key open.

    nbd-server's per-connection child opens the export after prerun; while
    it has it open, a client may still be reading the frozen base, whatever
    the session files say.
    """
    return [pid for pid, _ in users_of(key, key_of, exclude, SERVER)]


def lineage(pid=None):
    """pid (default ours) and its ancestors: a hook's own connection, whose
    nbd-server child and shell hold the export open while postrun runs."""
    pid = os.getpid() if pid is None else pid
    found = []
    while pid > 1 and pid not in found:
        found.append(pid)
        st = _stat(pid)
        if st is None:
            break
        pid = st[1]
    return found


def users_of(key, key_of, exclude=(), comm=None):
    """(pid, command name) of every process (named comm) with key open."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        st = _stat(int(name))
        if st is None or comm is not None and st[0] != comm:
            continue
        folder = "/proc/%s/fd" % name
        try:
            fds = os.listdir(folder)
        except OSError:
            continue
        for fd in fds:
            try:
                if key_of(os.path.join(folder, fd)) == key:
                    found.append((int(name), st[0]))
                    break
            except (OSError, Error):   # a vanished fd is no match
                continue
    return found
