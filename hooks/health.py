"""What on the host would refuse or endanger the next freeze while every
session looks clean: planted lock files, folders the hooks refuse, a
snapshot_dir running out of space.  nbdsnap status prints one line each,
saying what to do."""

import os
import stat

from . import sessions
from .errors import ConfigError

# snapshot_dir's free space is low below either (nbdsnap(8), status): the
# overlays grow with every guest write during a copy, and a guest whose
# write finds no room pauses (QEMU's default error policy for ENOSPC).
LOW_SPACE_BYTES = 1 << 30
LOW_SPACE_SHARE = 0.05


def problems(config, entries=()):
    """One dict (kind, path, message) per problem; entries are status's,
    to name the export a lock file belongs to."""
    return (_folder_problems(config) + _lock_problems(config, entries)
            + _space_problems(config))


def _folder_problems(config):
    """The folders the hooks would refuse (sessions.SessionStore.prepare,
    and digest.prepare_dir with digest = on); a missing one is fine, the
    first prerun creates it."""
    refused = "every hook refuses to run"
    folders = [(config.state_dir, 0o711, refused),
               (config.sessions_dir, 0o700, refused),
               (config.locks_dir, 0o700, refused),
               (config.snapshot_dir, 0o711, refused)]
    if config.digest:
        # The copy goes ahead without its manifest: nothing else says so.
        folders.append((config.manifest_dir, 0o700, "every session gets no "
                        "manifest (digest = on)"))
    found = []
    for path, mode, effect in folders:
        if not os.path.lexists(path):
            continue
        try:
            sessions._secure_dir(path, mode)
        except ConfigError as e:
            found.append(_problem(
                "folder", path, "%s: %s until it is a folder of root's that "
                "only root can write (chown root: %s; chmod go-w %s)"
                % (e, effect, path, path)))
    return found


def _lock_problems(config, entries):
    """Lock files that are not regular files: a symlink (planted, since
    only root writes there) or a folder makes every open of the lock fail,
    and with it every prerun, postrun and recover of that disk."""
    try:
        names = sorted(os.listdir(config.locks_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        return [_problem("lock", config.locks_dir, "cannot read %s: %s "
                         "(nbdsnap runs as root)" % (config.locks_dir,
                                                     e.strerror))]
    exports = {e["key"]: e.get("export") for e in entries if e.get("key")}
    found = []
    for name in names:
        path = os.path.join(config.locks_dir, name)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if not name.endswith(".lock") or stat.S_ISREG(mode):
            continue
        key = name[:-len(".lock")]
        what = ("a symlink" if stat.S_ISLNK(mode) else
                "a folder" if stat.S_ISDIR(mode) else "no regular file")
        found.append(_problem(
            "lock", path, "%s is %s, not a lock file: every prerun, postrun "
            "and recover of %s is refused until it is removed (check who "
            "planted it, then rm -r %s)" % (path, what, _locked(key, exports),
                                            path)))
    return found


def _locked(key, exports):
    if exports.get(key):
        return "export %s" % exports[key]
    if key.startswith("domain-"):
        return "domain %s (its snapshots and commits)" % key[len("domain-"):]
    if key == "history":
        return "the history (every commit)"
    return "the disk with key %s" % key


def _space_problems(config):
    path = config.snapshot_dir
    while not os.path.lexists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)      # where the folder will be made
    try:
        st = os.statvfs(path)
    except OSError:
        return []
    # f_bavail, not f_bfree: QEMU writes the overlays as an unprivileged
    # user (libvirt-qemu), for whom root's reserved blocks do not count.
    free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    if not low_space(free, size):
        return []
    return [_problem(
        "space", config.snapshot_dir, "snapshot_dir %s: %s free of %s (less "
        "than %s or %d %%): overlays grow with every guest write during a "
        "copy, and a guest that finds no room pauses; free space there or "
        "move snapshot_dir (nbdsnap.conf(5))" % (
            config.snapshot_dir, _size(free), _size(size),
            _size(LOW_SPACE_BYTES), LOW_SPACE_SHARE * 100))]


def low_space(free, size):
    return free < LOW_SPACE_BYTES or free < size * LOW_SPACE_SHARE


def _problem(kind, path, message):
    return {"kind": kind, "path": path, "message": message}


def _size(n):
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return ("%d %s" if unit == "bytes" else "%.1f %s") % (n, unit)
        n /= 1024
