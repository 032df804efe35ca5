"""The freeze-time manifest: the frozen base's digest, taken while it is.

With ``digest = on``, the first prerun of a session writes a first,
incomplete manifest of the base (so a client that holds a connection always
finds its own session's manifest) and starts a background process that
reads the base locally, at low CPU and I/O priority, and replaces the
manifest with the complete one.  The last postrun waits for it, bounded by
digest_timeout, before the commit writes into the base; a digest still
running then is stopped (SIGTERM, then SIGKILL) and waited for, and its
manifest stays incomplete, which ``nbd-verify check`` refuses.

    prerun ──► manifest (complete: false) ──► background digest ──► manifest
                                                     │           (complete)
    last postrun ── waits (digest_timeout) ──────────┘──► commit

Run as ``python -I -m nbdsnap.hooks.digest MANIFEST BASE ALGORITHM SESSION``.
"""

import logging
import os
import select
import signal
import stat
import subprocess
import sys
import time

from . import procs
from .errors import Error
from .sessions import _secure_dir

log = logging.getLogger(__name__)

POLL = 0.2
# Seconds a stopped digest gets to end, after SIGTERM and after SIGKILL.
STOP_GRACE = 5


def manifest_path(config, state):
    """A stable path per domain disk, for nbd-server's manifest export."""
    name = "%s-%s.manifest" % (state["domain"].replace("/", "_"),
                               state["disk"])
    return os.path.join(config.manifest_dir, name)


def prepare_dir(config):
    """Create or check manifest_dir as the other state folders: root's, not
    writable by others, no symlink (the digest writes there as root).

    0700: nbd-server opens the manifest exports as root (it must run as
    root for the hooks), and clone hosts read manifests over NBD; block
    digests let whoever reads them confirm a guess of a block's content,
    so local users get nothing.

    A folder of ours that others may read or enter (0755 is what versions
    before 0700 made) is tightened to 0700 rather than the manifests made
    0600: that also hides the manifests already in it, for disks that may
    never be frozen again, and leaves the mode of the manifests that
    nbd-verify writes on clone hosts alone.  Logged once: the next run
    finds 0700.
    """
    _secure_dir(config.manifest_dir, 0o700)
    _tighten(config.manifest_dir)


def _tighten(path):
    """chmod 0700 the folder path (checked ours) if others may read it."""
    # Through a descriptor of the folder itself: never chmod what a
    # symlink put in its place since the check points at.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                 | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or not st.st_mode & 0o077:
            return
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    log.warning("manifest_dir %s was mode %o: local users could read the "
                "block digests, which confirm guesses of a disk's content; "
                "it is now 0700", path, stat.S_IMODE(st.st_mode))


def start(config, state, base):
    """Write the incomplete manifest and start the digest; return its info."""
    from nbdsnap.verify import blkhash, manifest, sources
    path = manifest_path(config, state)
    prepare_dir(config)
    with sources.open_source(base) as source:
        size = source.size
    width = len(blkhash.Hasher(config.digest_algorithm).hexdigest())
    manifest.write(path, manifest.Manifest(
        size=size, algorithm=config.digest_algorithm,
        block_size=blkhash.BLOCK_SIZE, chunk_size=manifest.DEFAULT_CHUNK_SIZE,
        digest="0" * width, chunks=[], complete=False,
        source="%s (session %s, digest running)" % (base, state["id"]),
        created=manifest.now()))
    cmd = ["ionice", "-c", "2", "-n", "7", "nice", "-n", "19",
           sys.executable, "-I", "-m", "nbdsnap.hooks.digest", path, base,
           config.digest_algorithm, state["id"]]
    # -I and cwd /: as root, never import a module planted in the caller's
    # directory (first on sys.path) or named by PYTHONPATH.
    proc = subprocess.Popen(cmd, cwd="/", stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            close_fds=True)
    holder = procs.holder_of(proc.pid)
    info = {"manifest": path}
    if holder is not None:
        info.update(holder.to_json())
    log.info("session %s: digest of %s started (pid %d), manifest %s",
             state["id"], base, proc.pid, path)
    return info


def running(state):
    """The session's digest process (a procs.Holder) if it still runs."""
    info = state.get("digest")
    if not info or "pid" not in info:
        return None
    holder = procs.Holder.from_json(info)
    return holder if procs.is_alive(holder) else None


def finish(config, state):
    """Wait, bounded, for the session's digest; stop it if it overruns.

    Returns "complete", "stopped" or None (no digest in this session).
    Either way the digest process has ended when it returns: the commit
    that follows writes into the base it reads.
    """
    info = state.get("digest")
    if not info or "pid" not in info:
        return None
    holder = procs.Holder.from_json(info)
    deadline = time.monotonic() + config.digest_timeout
    while procs.is_alive(holder):
        if time.monotonic() > deadline:
            how = stop(holder)
            log.warning("session %s: the digest ran past digest_timeout "
                        "(%g s) and was stopped (%s); manifest %s stays "
                        "incomplete", state["id"], config.digest_timeout,
                        how, info["manifest"])
            return "stopped"
        time.sleep(POLL)
    return "complete"


def stop(holder, grace=STOP_GRACE):
    """End the digest process holder: SIGTERM, then SIGKILL; say how.

    Through a pidfd, so that a pid reused meanwhile is never signalled, and
    waited for on it (the digest is not our child).  A process still there
    after SIGKILL is stuck in the kernel and runs no more of its code: it
    can no longer write a manifest.
    """
    try:
        fd = os.pidfd_open(holder.pid)
    except ProcessLookupError:
        return "it had ended"
    try:
        if not procs.is_alive(holder):     # the pid is another process's
            return "it had ended"
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(fd, sig)
            except ProcessLookupError:
                return "it had ended"
            if select.select([fd], [], [], grace)[0]:
                return "ended on %s" % sig.name
        log.error("digest pid %d did not end %g s after SIGKILL; it runs "
                  "no more of its code", holder.pid, grace)
        return "killed, not yet gone"
    finally:
        os.close(fd)


def _run(path, base, algorithm, session):
    """The background digest itself."""
    from nbdsnap.verify import manifest, ops, sources
    with sources.open_source(base) as source:
        # One thread: the guest keeps the other cores.
        result = ops.make_manifest(source, algorithm, threads=1)
    result = result._replace(source="%s (session %s)" % (base, session))
    manifest.write(path, result)
    log.info("session %s: digest of %s done: %s", session, base,
             result.digest)


def main(argv=None):
    from nbdsnap.verify.errors import Error as VerifyError
    from . import log as log_mod
    argv = sys.argv[1:] if argv is None else argv
    log_mod.setup("nbdsnap-digest")
    path, base, algorithm, session = argv
    started = time.monotonic()
    try:
        _run(path, base, algorithm, session)
    except (Error, VerifyError, OSError) as e:
        log.error("session %s: digest of %s failed: %s", session, base, e)
        return 1
    except Exception as e:   # noqa: BLE001 -- a detached process: log it all
        log.critical("session %s: digest of %s failed: %s", session, base,
                     e, exc_info=True)
        return 1
    log.info("session %s: digest took %.1f s", session,
             time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
