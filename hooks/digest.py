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

The manifest is format version 2 (verify/manifest2.py).  When the freeze
continues a change-tracking chain (tracking.py, chain.py), the digest is
incremental: it rereads only the blocks QEMU saw written since the
previous manifest, which prerun moved aside for it, and copies the rest
of that manifest's block digests; a previous manifest found damaged then
makes it full.  Beside the manifest, hidden and root's, are the digest's
job (what prerun decided), the previous manifest while it is read, and
the result the last postrun puts in the history.

Run as ``python -I -m nbdsnap.hooks.digest JOB``.
"""

import json
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
# What the digest waits for on its stdin before it reads the base.
GO = b"go\n"
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


def _hidden(path, what):
    """A file of the digest's own beside the manifest, never served."""
    folder, name = os.path.split(path)
    return os.path.join(folder, ".%s.%s" % (name, what))


def previous(path):
    """The header of the manifest at path, None, or why it is unusable."""
    from nbdsnap.verify import manifest2
    from nbdsnap.verify.errors import Error as VerifyError
    if not os.path.lexists(path):
        return None
    try:
        with manifest2.FileReader(path) as reader:
            return manifest2.read_header(reader)
    except OSError as e:
        return e.strerror or str(e)
    except VerifyError as e:
        return str(e)


def start(config, state, base, tracked=None, domain_xml="", hold=False):
    """Write the incomplete manifest and start the digest; return its info.

    tracked (tracking.Tracked) says whether the digest is incremental: then
    the previous manifest is moved aside for the digest to build on, and
    the dirty ranges go with the job.  Without it the digest is full.

    With hold, returns (info, release): the digest waits until release()
    is called, after the caller saved info in the session, so that the
    last postrun and recover always know of a digest that reads the base;
    a caller that dies first never releases it, and it ends unstarted.
    """
    from nbdsnap.verify import manifest, manifest2_pack, sources
    from nbdsnap.verify.files import write_atomic
    from . import tracking
    path = manifest_path(config, state)
    prepare_dir(config)
    with sources.open_source(base) as source:
        size = source.size
    if tracked is None:
        tracked = tracking.offline(config, previous(path))
    plan = tracked.plan
    job = {"manifest": path, "base": base, "session": state["id"],
           "algorithm": config.digest_algorithm, "kind": plan.kind,
           "why": plan.why, "generation": plan.generation,
           "chain_id": plan.chain_id, "chain_started": plan.chain_started,
           "domain_xml": domain_xml,
           # From the freeze (saved then), not from now: the bitmap swap
           # and map read count too.
           "frozen": state.get("updated", time.time()),
           "previous": None, "dirty": tracked.dirty}
    for what in ("previous", "result"):
        _unlink(_hidden(path, what))
    if plan.kind == "incremental":
        job["previous"] = _hidden(path, "previous")
        # Clients that have the manifest export open keep reading theirs.
        os.replace(path, job["previous"])
    manifest2_pack.write(path, manifest2_pack.build(
        b"", size, generation=plan.generation, chain_id=plan.chain_id,
        chain_started=plan.chain_started, kind=plan.kind,
        domain_xml=domain_xml, algorithm=config.digest_algorithm,
        complete=False, created=manifest.now(),
        source="%s (session %s, digest running)" % (base, state["id"])))
    job_path = _hidden(path, "job")
    write_atomic(job_path, json.dumps(job), mode=0o600)
    cmd = ["ionice", "-c", "2", "-n", "7", "nice", "-n", "19",
           sys.executable, "-I", "-m", "nbdsnap.hooks.digest", job_path]
    # -I and cwd /: as root, never import a module planted in the caller's
    # directory (first on sys.path) or named by PYTHONPATH.
    proc = subprocess.Popen(cmd, cwd="/", stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            close_fds=True)
    holder = procs.holder_of(proc.pid)
    info = {"manifest": path}
    if holder is not None:
        info.update(holder.to_json())
    log.info("session %s: %s digest of %s started (pid %d), generation %d "
             "of chain %s, manifest %s%s", state["id"], plan.kind, base,
             proc.pid, plan.generation, plan.chain_id, path,
             "" if plan.kind == "incremental" else "; full: " + plan.why)

    def release():
        if proc.stdin.closed:       # released already: once is enough
            return
        try:
            if holder is None:
                # No pid in the session: nothing would wait for it.
                log.error("session %s: the digest (pid %d) is not started: "
                          "its process cannot be recorded", state["id"],
                          proc.pid)
            else:
                proc.stdin.write(GO)
            proc.stdin.close()
        except OSError as e:      # it died: its manifest stays incomplete
            log.error("session %s: the digest (pid %d) ended before it "
                      "started: %s", state["id"], proc.pid, e)
    if hold:
        return info, release
    release()
    return info


def outcome(state):
    """The history fields of the session's digest, once it has ended."""
    info = state.get("digest")
    if not info:
        return {}
    try:
        with open(_hidden(info["manifest"], "result"), "rb") as f:
            result = json.loads(f.read(4096))
        return {"manifest_kind": str(result["kind"]),
                "manifest_seconds": round(float(result["seconds"]), 3),
                "manifest_bytes_read": int(result["bytes_read"]),
                "manifest_why": (None if result.get("why") is None
                                 else str(result["why"]))}
    except (OSError, ValueError, KeyError, TypeError):
        return {"manifest_kind": None}


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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


def _run(job):
    """The background digest itself: incremental if it can, else full."""
    from nbdsnap.verify import manifest, manifest2, manifest2_write, sources
    from nbdsnap.verify.errors import ManifestError
    path, session = job["manifest"], job["session"]
    common = dict(generation=job["generation"],
                  domain_xml=job["domain_xml"],
                  source_name="%s (session %s)" % (job["base"], session),
                  created=manifest.now(), algorithm=job["algorithm"],
                  threads=1)
    stats = None
    why = job["why"]
    with sources.open_source(job["base"]) as source:
        if job["kind"] == "incremental":
            try:
                with manifest2.FileReader(job["previous"]) as previous:
                    _check_previous(manifest2.read_header(previous), job)
                    stats = manifest2_write.write_incremental(
                        path, previous, source, job["dirty"], **common)
            except (ManifestError, OSError) as e:
                why = "cannot build on the previous manifest: %s" % e
                log.warning("session %s: %s; a full digest instead",
                            session, why)
        if stats is None:
            # One thread: the guest keeps the other cores.
            stats = manifest2_write.write_full(
                path, source, chain_id=job["chain_id"],
                chain_started=(job["chain_started"]
                               if job["kind"] == "full" else manifest.now()),
                **common)
    seconds = time.time() - job["frozen"]
    result = {"kind": stats.kind, "seconds": seconds,
              "bytes_read": stats.bytes_read,
              "why": why if stats.kind == "full" else None}
    from nbdsnap.verify.files import write_atomic
    write_atomic(_hidden(path, "result"), json.dumps(result), mode=0o600)
    log.info("session %s: %s manifest of %s complete %.2f s after the "
             "freeze: %d bytes read, generation %d", session, stats.kind,
             job["base"], seconds, stats.bytes_read, job["generation"])


def _check_previous(header, job):
    """The manifest moved aside is the one prerun decided to build on."""
    from nbdsnap.verify.errors import ManifestError
    if (header.chain_id, header.generation + 1) != (job["chain_id"],
                                                   job["generation"]):
        raise ManifestError(
            "it is generation %d of chain %s, not generation %d of chain %s"
            % (header.generation, header.chain_id, job["generation"] - 1,
               job["chain_id"]))


def _terminated(signum, _frame):
    raise SystemExit(128 + signum)


def _load_job(job_path):
    with open(job_path, "rb") as f:
        return json.loads(f.read())


def main(argv=None):
    from nbdsnap.verify.errors import Error as VerifyError
    from . import log as log_mod
    argv = sys.argv[1:] if argv is None else argv
    log_mod.setup("nbdsnap-digest")
    # stop() ends a digest with SIGTERM: unwind, so that the manifest's
    # temporary file (up to 32 bytes per 64 KiB of disk) is removed.
    signal.signal(signal.SIGTERM, _terminated)
    (job_path,) = argv
    started = time.monotonic()
    what = job_path
    try:
        job = _load_job(job_path)
        what = "%s of session %s" % (job["base"], job["session"])
        try:
            if sys.stdin.buffer.read(len(GO)) != GO:
                log.error("digest of %s not started: its prerun ended "
                          "before it recorded it; the manifest stays "
                          "incomplete", what)
                return 1
            _run(job)
        finally:
            for hidden in (job_path, job.get("previous")):
                if hidden:
                    _unlink(hidden)
    except (Error, VerifyError, OSError, ValueError, KeyError) as e:
        log.error("digest of %s failed: %s", what, e)
        return 1
    except Exception as e:   # noqa: BLE001 -- a detached process: log it all
        log.critical("digest of %s failed: %s", what, e, exc_info=True)
        return 1
    log.info("digest of %s took %.1f s", what, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
