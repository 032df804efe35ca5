"""Faults of nbd-pull on real parts, with no libvirt.

A plain nbd-server (no hooks) serves an image as export "d" and a real
v2 manifest of it (nbd-verify digest) as "d.manifest", as the VM host
serves a frozen base.  nbd-pull runs as an operator runs it, a process
with no terminal, and is killed, stopped, starved and raced the way a
clone host meets it.  Each test checks what a user would: the copy's
sha256 is the old image or the new one (never anything else, unless a
sealed journal says the next run finishes it), the exit status, and the
one line on stderr that says which.
"""

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import time
from typing import NamedTuple

import pytest

import lab

from nbdsnap.pull import journal
from nbdsnap.verify import blkhash, manifest2_pack

MiB = 1 << 20
BLOCK = blkhash.BLOCK_SIZE
NO_HOOKS = {"prerun": "", "postrun": ""}
_ZEROS = bytes(BLOCK)


# -- images -------------------------------------------------------------------

def image(seed, size, old=None, pieces=12, zeros=3, spans=()):
    """size bytes: old's (cut or grown), random data at scattered offsets,
    some areas zeroed, and each (offset, length) of spans random."""
    rng = random.Random(seed)
    buf = bytearray(size)
    if old is not None:
        buf[:min(size, len(old))] = old[:size]
    for _ in range(pieces):
        n = rng.choice([4096, BLOCK, 200_000, MiB, 2 * MiB])
        off = rng.randrange(0, size - n) // 4096 * 4096
        buf[off:off + n] = rng.randbytes(n)
    for _ in range(zeros):
        n = rng.choice([BLOCK, MiB])
        off = rng.randrange(0, size - n) // BLOCK * BLOCK
        buf[off:off + n] = bytes(n)
    for off, n in spans:
        buf[off:off + n] = rng.randbytes(n)
    return buf


def write_sparse(path, buf):
    """buf at path, its zero blocks holes (as a thin disk's are)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.truncate(len(buf))
        view = memoryview(buf)
        for off in range(0, len(buf), BLOCK):
            block = view[off:off + BLOCK]
            if block != _ZEROS[:len(block)]:
                os.pwrite(f.fileno(), block, off)
    os.replace(tmp, path)


def sha(data):
    return hashlib.sha256(data).hexdigest()


def sha_of(path):
    return lab.sha256(path) if os.path.exists(path) else None


# -- the VM host: nbd-server serving an image and its manifest ----------------

class Source:
    """nbd-server serving image "d" and its manifest "d.manifest"."""

    def __init__(self, folder, manifest=True):
        os.makedirs(folder, exist_ok=True)
        self.image = os.path.join(folder, "d.img")
        self.manifest = os.path.join(folder, "d.manifest")
        exports = {"d": (self.image, NO_HOOKS)}
        if manifest:
            exports["d.manifest"] = (self.manifest, NO_HOOKS)
        self.server = lab.NbdServer(folder, exports, env={})
        self.uri = self.server.uri("d")
        self.sha = None

    def publish(self, buf):
        """A new frozen base: the image, then its manifest."""
        write_sparse(self.image, buf)
        tmp = self.manifest + ".tmp"
        subprocess.run([os.path.join(lab.VENV_BIN, "nbd-verify"), "digest",
                        "--manifest-version", "2", "--manifest", tmp,
                        self.image], check=True, capture_output=True,
                       timeout=60)
        os.replace(tmp, self.manifest)
        self.sha = sha(buf)

    def start(self):
        self.server.start()

    def stop(self, sig=signal.SIGTERM):
        """The server and every connection's child (ours, forked by it)."""
        if self.server.pid is None:
            return
        children = self.server.children()
        self.server.stop(sig)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def sources(env):
    """make(name, manifest=True) -> a Source in env's folder; all stopped
    at the end."""
    made = []

    def make(name="src", manifest=True):
        made.append(Source(env.path(name), manifest))
        return made[-1]
    yield make
    for src in made:
        src.stop(signal.SIGKILL)


# -- nbd-pull -----------------------------------------------------------------

class Run(NamedTuple):
    status: int
    lines: list         # stderr, each "nbd-pull: ..."
    pulls: list         # --json's outcomes (None when killed)

    @property
    def line(self):
        return self.lines[-1] if self.lines else ""


@pytest.fixture
def pulls(env):
    """start(src, copy, *options) -> a running nbd-pull (Popen); every one
    still running at the end is killed."""
    procs = []

    def start(src, copy, *options):
        cmd = [os.path.join(lab.VENV_BIN, "nbd-pull"), "--json",
               "--syslog-socket", env.path("no-syslog"), *options,
               src.uri, copy]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
        return procs[-1]
    yield start
    for proc in procs:
        end(proc)


def end(proc):
    """Kill proc if it still runs (stopped or not) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
            os.kill(proc.pid, signal.SIGCONT)
    proc.wait(60)
    for f in (proc.stdout, proc.stderr):
        if f and not f.closed:
            f.close()


def finish(proc, timeout=120):
    """proc's Run, once it ends: one line per outcome, no traceback."""
    out, err = proc.communicate(timeout=timeout)
    lines = err.splitlines()
    assert "Traceback" not in err, err
    assert all(line.startswith("nbd-pull: ") for line in lines), err
    pulls = json.loads(out)["pulls"] if out.strip() else None
    return Run(proc.returncode, lines, pulls)


def pull(start, src, copy, *options):
    return finish(start(src, copy, *options))


def done(run, src, copy):
    """run completed: exit 0, one line saying so (after one saying that
    it finished an interrupted apply, if it did), copy == the source."""
    assert run.status == 0, run.lines
    assert len(run.lines) == 1 or len(run.lines) == 2 and \
        "finished applying" in run.lines[0], run.lines
    assert "equal to " + src.uri in run.line, run.lines
    assert sha_of(copy) == src.sha
    return run.pulls[0]


def failed(run, status, *words):
    """run failed as one line on stderr holding every word says."""
    assert run.status == status, run.lines
    assert len(run.lines) == 1, run.lines
    for word in words:
        assert word in run.line, run.lines


def killed(proc):
    proc.kill()
    proc.wait(60)


# -- COPY's state folder ------------------------------------------------------

def state_folder(copy):
    head, name = os.path.split(copy)
    return os.path.join(head, ".%s.nbd-pull" % name)


def journal_contents(path):
    fd = journal.open_existing(path)
    if fd is None:
        return None
    try:
        return journal.read(fd)
    finally:
        os.close(fd)


def sealed(path):
    contents = journal_contents(path)
    return contents is not None and contents.digest is not None


def staged(path):
    """Bytes of the journal's sound DATA records: blocks a next run reuses."""
    contents = journal_contents(path)
    return sum(r.length for r in contents.records
               if r.kind == journal.DATA) if contents else 0


def lock_holder(copy):
    """The pid in COPY's lock file, as text ("" while it is rewritten)."""
    try:
        with open(os.path.join(state_folder(copy), "lock")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def catch_sealed(proc, path):
    """Stop proc between the journal's seal and its removal, then kill it:
    True, or False if proc ended first.  proc is stopped while the journal
    is read, so it cannot move on meanwhile."""
    while proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGSTOP)
        if sealed(path):
            killed(proc)
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.001)
    return False


def wait_for(pred, what, timeout=60):
    return lab.wait_until(pred, timeout, 0.002, what)


def pulled(env, sources, pulls, old):
    """A source serving old, and copy.img made of it by a first pull."""
    src = sources()
    src.publish(old)
    src.start()
    copy = env.path("copy.img")
    done(pull(pulls, src, copy), src, copy)
    return src, copy


def seal_then_kill(start, src, copy, old, new, *options):
    """A pull of new into copy (now old) killed right after its seal; may
    take a few tries, each a pull that completed (and is then undone by
    publishing old, pulling it, and publishing new again)."""
    jpath = os.path.join(state_folder(copy), "journal")
    for _ in range(5):
        proc = start(src, copy, *options)
        if catch_sealed(proc, jpath):
            return jpath
        done(finish(proc), src, copy)
        src.publish(old)
        done(pull(start, src, copy), src, copy)
        src.publish(new)
    pytest.fail("never caught a pull between its seal and its apply")


# -- the tests ----------------------------------------------------------------

SIZE = 24 * MiB
# A state folder between pulls: nothing staged, nothing half-written.
CLEAN = ["lock", "record", "record.json"]
# 16 MiB of changes: two batches of a transfer, the second one held back
# by --bwlimit for seconds, ample time to act in between.
SLOW = ("--bwlimit", "2M", "-c", "1")


def old_and_new(size=SIZE, spans=((4 * MiB, 16 * MiB),)):
    old = image(1, size)
    return old, image(2, size, old, spans=spans)


def killed_while_staging(src, copy, pulls, new):
    """Publish new, start a slow pull of it and kill it once it has staged
    more than 1 MiB; the path of the journal it left."""
    src.publish(new)
    jpath = os.path.join(state_folder(copy), "journal")
    proc = pulls(src, copy, *SLOW)
    wait_for(lambda: staged(jpath) > MiB, "blocks staged")
    killed(proc)
    return jpath


def test_kill_during_transfer(env, sources, pulls):
    old, new = old_and_new()
    src, copy = pulled(env, sources, pulls, old)

    jpath = killed_while_staging(src, copy, pulls, new)
    assert sha_of(copy) == sha(old)
    assert not sealed(jpath)
    # What a run killed while it wrote its target leaves too.
    with open(os.path.join(state_folder(copy), ".target.0badc0de.tmp"),
              "wb") as f:
        f.write(bytes(4096))

    info = done(pull(pulls, src, copy), src, copy)
    assert info["kind"] == "incremental"
    assert info["blocks_reused"] > 0, info
    assert info["why_scan"] is None
    assert sorted(os.listdir(state_folder(copy))) == CLEAN


def test_kill_at_random_points(env, sources, pulls):
    old, new = old_and_new(spans=((2 * MiB, 12 * MiB),))
    src, copy = pulled(env, sources, pulls, old)
    jpath = os.path.join(state_folder(copy), "journal")

    def started(proc):
        """Once proc holds COPY's lock: its work begins (not Python's)."""
        wait_for(lambda: proc.poll() is not None
                 or lock_holder(copy) == str(proc.pid), "the pull's lock")

    # How long a pull's work takes, from its lock to its end.
    src.publish(new)
    proc = pulls(src, copy)
    started(proc)
    began = time.monotonic()
    done(finish(proc), src, copy)
    took = time.monotonic() - began

    rng = random.Random(7)
    images = [old, new]
    for i in range(6):
        before = sha_of(copy)
        src.publish(images[i % 2])
        proc = pulls(src, copy)
        started(proc)
        time.sleep(rng.uniform(0, took))
        killed(proc)
        now = sha_of(copy)
        if now not in (before, src.sha):
            assert sealed(jpath), "iteration %d: the copy is neither the " \
                "old image nor the new, and no sealed journal" % i
        done(pull(pulls, src, copy), src, copy)

    # Killed while it applied, and the VM host gone: the next run still
    # finishes the apply (no network), then says the export is down.
    holds, target = (new, old) if sha_of(copy) == sha(new) else (old, new)
    src.publish(target)
    seal_then_kill(pulls, src, copy, holds, target)
    src.stop()
    run = pull(pulls, src, copy)
    assert run.status == 1, run.lines
    assert len(run.lines) == 2, run.lines
    assert "finished applying the pull that was interrupted" in \
        run.lines[0], run.lines
    assert "cannot connect" in run.line, run.lines
    assert sha_of(copy) == src.sha
    assert sorted(os.listdir(state_folder(copy))) == CLEAN


def test_partly_applied_journal(env, sources, pulls):
    old, new = old_and_new()
    src, copy = pulled(env, sources, pulls, old)

    src.publish(new)
    jpath = seal_then_kill(pulls, src, copy, old, new)
    # The copy as the seal left it (the kill may have come a little
    # later), then half of the journal's records written, as a run killed
    # mid-apply leaves it.
    with open(copy, "r+b") as f:
        f.write(old)
    contents = journal_contents(jpath)
    records = contents.records[:len(contents.records) // 2]
    assert records
    fd_j = os.open(jpath, os.O_RDONLY)
    fd_c = os.open(copy, os.O_WRONLY)
    try:
        for rec in records:
            data = bytes(rec.length)
            if rec.kind == journal.DATA:
                data = os.pread(fd_j, rec.length, rec.pos)
            os.pwrite(fd_c, data, rec.offset)
    finally:
        os.close(fd_j)
        os.close(fd_c)
    assert sha_of(copy) not in (sha(old), sha(new))

    run = pull(pulls, src, copy)
    info = done(run, src, copy)
    assert "finished applying the pull that was interrupted" in \
        run.lines[0], run.lines
    assert info["why_scan"] == \
        "its last pull was interrupted while it applied"
    assert not os.path.exists(jpath)


def corrupt(src, offset):
    """4 KiB of the served image not what its manifest says."""
    with open(src.image, "r+b") as f:
        f.seek(offset)
        f.write(random.Random(offset).randbytes(4096))


def test_corrupt_block_at_source(env, sources, pulls):
    src = sources()
    old, new = old_and_new()
    # Inside data blocks (a zero block is written, never read): the old
    # image's first, and the new image's changed span.
    first = next(off for off in range(0, SIZE, BLOCK)
                 if old[off:off + BLOCK] != _ZEROS)
    bad = 10 * MiB + 8192

    # A first pull: no copy made.
    src.publish(old)
    corrupt(src, first + 4096)
    src.start()
    copy = env.path("copy.img")
    run = pull(pulls, src, copy)
    failed(run, 1, "do not match the manifest", "nothing was applied",
           "the copy is not made yet")
    assert not os.path.exists(copy)

    # An existing copy: unchanged, nothing sealed.
    src.publish(old)
    done(pull(pulls, src, copy), src, copy)
    src.publish(new)
    corrupt(src, bad)
    run = pull(pulls, src, copy)
    failed(run, 1, "do not match the manifest", "the copy is unchanged")
    assert sha_of(copy) == sha(old)
    assert not sealed(os.path.join(state_folder(copy), "journal"))


def test_copy_changed_behind_its_back(env, sources, pulls):
    old, _ = old_and_new()
    src, copy = pulled(env, sources, pulls, old)
    with open(copy, "r+b") as f:
        f.seek(5 * MiB + 100)
        f.write(b"garbage" * 1000)

    run = pull(pulls, src, copy)
    info = done(run, src, copy)
    assert "read the copy again: it changed since the last pull" in \
        run.line, run.lines
    assert info["blocks_changed"] >= 1


def test_source_grows_and_shrinks(env, sources, pulls):
    small = image(1, SIZE)
    src, copy = pulled(env, sources, pulls, small)
    # The same server: each connection opens the image anew.
    grown = image(2, 40 * MiB, small, spans=((30 * MiB, 3 * MiB),))
    src.publish(grown)
    done(pull(pulls, src, copy), src, copy)
    assert os.path.getsize(copy) == len(grown)
    shrunk = image(3, 20 * MiB + 12288, grown)      # a short last block
    src.publish(shrunk)
    done(pull(pulls, src, copy), src, copy)
    assert os.path.getsize(copy) == len(shrunk)


def test_server_gone_midway(env, sources, pulls):
    old, new = old_and_new()
    src, copy = pulled(env, sources, pulls, old)

    src.publish(new)
    jpath = os.path.join(state_folder(copy), "journal")
    proc = pulls(src, copy, *SLOW)
    wait_for(lambda: staged(jpath) > MiB, "blocks staged")
    src.stop(signal.SIGKILL)
    failed(finish(proc), 1, "the copy is unchanged")
    assert sha_of(copy) == sha(old)

    src.start()
    info = done(pull(pulls, src, copy), src, copy)
    assert info["blocks_reused"] > 0, info


def test_manifest_incomplete_or_missing(env, sources, pulls):
    src = sources()
    data = image(1, SIZE)
    src.publish(data)
    # Only the first chunk's digests: what the VM host serves while its
    # digest still runs.
    chunk = 16 * MiB
    manifest2_pack.write(src.manifest, manifest2_pack.build(
        blkhash.block_digests(data[:chunk], "sha256", BLOCK), SIZE,
        generation=1, chain_id="c", kind="full", domain_xml="",
        chunk_size=chunk, complete=False))
    src.start()
    copy = env.path("copy.img")
    run = pull(pulls, src, copy, "--wait", "1")
    assert run.status == 1, run.lines
    assert len(run.lines) == 2, run.lines      # waiting, then gave up
    assert "still incomplete after 1 s" in run.line, run.lines
    assert not os.path.exists(copy)

    bare = sources("bare", manifest=False)
    bare.publish(data)
    bare.start()
    failed(pull(pulls, bare, copy), 2, "serves no manifest", "digest = on")
    assert not os.path.exists(copy)


def filled(path, size, seed):
    with open(path, "wb") as f:
        f.write(random.Random(seed).randbytes(size))
    return path


def test_block_device_copy(env, sources, pulls):
    src = sources()
    old, new = old_and_new()
    src.publish(old)
    src.start()
    backing = env.path("lv.img")
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    states = env.path("state")
    with lab.loop_device(backing) as dev:
        info = done(pull(pulls, src, dev, "--state-dir", states), src, dev)
        assert info["kind"] == "full"
        src.publish(new)
        info = done(pull(pulls, src, dev, "--state-dir", states), src, dev)
        assert info["kind"] == "incremental"
        assert info["why_scan"] is None

    wrong = filled(env.path("small.img"), SIZE - MiB, 5)
    with lab.loop_device(wrong) as dev:
        before = sha_of(dev)
        failed(pull(pulls, src, dev, "--state-dir", states), 2,
               "the block device holds %d bytes" % (SIZE - MiB),
               "the copy is unchanged")
        assert sha_of(dev) == before


def test_state_disk_full(env, sources, pulls):
    src = sources()
    old, new = old_and_new()
    src.publish(old)
    src.start()
    copy = env.path("copy.img")
    tiny = env.path("tiny")
    os.mkdir(tiny)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", tiny],
                   check=True)
    try:
        done(pull(pulls, src, copy, "--state-dir", tiny), src, copy)
        src.publish(new)
        failed(pull(pulls, src, copy, "--state-dir", tiny), 2, "MiB free",
               "the copy is unchanged")
        assert sha_of(copy) == sha(old)
    finally:
        subprocess.run(["umount", "-l", tiny], check=False)


def test_two_at_once(env, sources, pulls):
    old, new = old_and_new()
    src, copy = pulled(env, sources, pulls, old)

    src.publish(new)
    first = pulls(src, copy, *SLOW)
    wait_for(lambda: lock_holder(copy) == str(first.pid),
             "the first pull's lock")
    # Stopped, so that it is surely still at work while the second runs.
    os.kill(first.pid, signal.SIGSTOP)
    second = pull(pulls, src, copy)
    os.kill(first.pid, signal.SIGCONT)
    failed(second, 1, "another nbd-pull (pid %d)" % first.pid,
           "did not touch the copy")
    done(finish(first), src, copy)
    assert sorted(os.listdir(state_folder(copy))) == CLEAN


def qemu_locked(path):
    """Does QEMU fail to take its image locks on path?  (When it does not,
    it writes 512 bytes: call it on a copy done with.)"""
    proc = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", path],
                          capture_output=True, text=True, timeout=60)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0 or "Failed to get" in said, said
    return proc.returncode != 0


def test_standby_running_from_copy(env, sources, pulls):
    old, new = old_and_new()
    src, copy = pulled(env, sources, pulls, old)

    # A QEMU serving the copy, as a standby booted from it would hold it.
    src.publish(new)
    sock = env.path("standby.sock")
    standby = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", sock, copy],
                               stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(sock), "qemu-nbd's socket")
        failed(pull(pulls, src, copy), 1, "is in use",
               "the copy is unchanged")
        assert sha_of(copy) == sha(old)
        # Refused before any transfer: nothing staged to apply later.
        assert not os.path.exists(os.path.join(state_folder(copy),
                                               "journal"))
    finally:
        standby.terminate()
        standby.wait(60)
    done(pull(pulls, src, copy), src, copy)

    # The other way: a QEMU started while nbd-pull writes a block device
    # in place (a first pull) cannot take it.  The new image's 16 MiB of
    # changes are two batches, --bwlimit holding the second back.
    backing = env.path("lv.img")
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    with lab.loop_device(backing) as dev:
        proc = pulls(src, dev, "--state-dir", env.path("state"), *SLOW)
        try:
            wait_for(lambda: lab.read_range(dev, 0, SIZE).count(0) < SIZE,
                     "the pull's first writes")
            os.kill(proc.pid, signal.SIGSTOP)
            assert qemu_locked(dev)
            os.kill(proc.pid, signal.SIGCONT)
            done(finish(proc), src, dev)
        finally:
            end(proc)
        assert not qemu_locked(dev)         # the locks went with nbd-pull


def test_killed_pull_then_a_shrunk_source(env, sources, pulls):
    old = image(1, 64 * MiB)
    # Changes in the upper half only: what the killed run stages lies
    # there, past the end of the source once it shrinks.
    new = image(2, 64 * MiB, old, pieces=0, zeros=0,
                spans=((32 * MiB, 16 * MiB),))
    src, copy = pulled(env, sources, pulls, old)

    killed_while_staging(src, copy, pulls, new)
    # The source shrinks below what that journal holds: the next run must
    # neither hang on it nor reuse any of it.
    src.publish(new[:16 * MiB])
    got = done(pull(pulls, src, copy), src, copy)
    assert got["blocks_reused"] == 0


def test_copy_written_during_the_transfer_is_not_trusted(env, sources,
                                                          pulls):
    old = image(1, SIZE)
    new = image(2, SIZE, old, pieces=0, zeros=0, spans=((0, 16 * MiB),))
    src, copy = pulled(env, sources, pulls, old)

    src.publish(new)
    jpath = os.path.join(state_folder(copy), "journal")
    proc = pulls(src, copy, *SLOW)
    wait_for(lambda: staged(jpath) > MiB, "blocks staged")
    # A standby booted from the copy, meanwhile, writes it.
    with open(copy, "r+b") as f:
        f.seek(SIZE - MiB)
        f.write(b"standby!" * 512)
    failed(finish(proc), 2, "written while the pull fetched",
           "the copy is unchanged")
    assert not sealed(jpath)
    # The next run reads the copy again, reuses what was staged, and
    # makes it the source's.
    got = done(pull(pulls, src, copy), src, copy)
    assert "changed" in got["why_scan"] and got["blocks_reused"] > 0
