"""nbd-pull's stage against a plain nbd-server (no hooks): what a killed
or disturbed pull leaves, and what the next run makes of it."""

import json
import os
import random
import subprocess

import pytest

import lab

BLOCK = 64 << 10
MiB = 1 << 20


def write_image(path, size, seed, start=0, end=None):
    """Random blocks (about half of them; the rest zeros) over
    [start, end) of path, a file of size bytes."""
    rnd = random.Random(seed)
    with open(path, "r+b" if os.path.exists(path) else "wb") as f:
        f.truncate(size)
        for offset in range(start, end or size, BLOCK):
            f.seek(offset)
            if rnd.random() < 0.5:
                f.write(rnd.randbytes(min(BLOCK, size - offset)))
            else:
                f.write(bytes(min(BLOCK, size - offset)))


class Served:
    """An image and its v2 manifest, served as nbd-pull expects them."""

    def __init__(self, folder):
        self.folder = folder
        self.image = os.path.join(folder, "image")
        self.manifest = os.path.join(folder, "image.manifest")
        self.server = None

    def start(self):
        if os.path.exists(self.manifest):
            os.unlink(self.manifest)
        subprocess.run([os.path.join(lab.VENV_BIN, "nbd-verify"), "digest",
                        "--manifest-version", "2", "--manifest",
                        self.manifest, self.image], check=True,
                       capture_output=True)
        if self.server is None:     # one port: one source for nbd-pull
            plain = {"prerun": "", "postrun": ""}
            self.server = lab.NbdServer(self.folder, {
                "d": (self.image, plain),
                "d.manifest": (self.manifest, plain)}, env={})
            self.uri = self.server.uri("d")
        self.server.start()

    def stop(self):
        if self.server:
            self.server.stop()


@pytest.fixture
def served(tmp_path):
    s = Served(str(tmp_path))
    yield s
    s.stop()


def command(uri, copy, *more):
    return [os.path.join(lab.VENV_BIN, "nbd-pull"), "--json",
            "--syslog-socket", "/nonexistent", *more, uri, copy]


def pull(uri, copy, *more, check=0):
    proc = subprocess.run(command(uri, copy, *more), capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == check, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return json.loads(proc.stdout)["pulls"][0], proc.stderr


def journal_of(copy):
    head, name = os.path.split(copy)
    return os.path.join(head, ".%s.nbd-pull" % name, "journal")


def start_slow_pull(uri, copy, rate="2M"):
    """A pull at rate, once its journal holds some blocks (the first
    batch of 8 MiB goes at once, the next waits for the rate)."""
    proc = subprocess.Popen(command(uri, copy, "--bwlimit", rate),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    journal = journal_of(copy)
    lab.wait_until(lambda: os.path.exists(journal)
                   and os.path.getsize(journal) > 2 * BLOCK, 30,
                   what="the pull to stage blocks")
    return proc


def test_a_killed_pull_then_a_shrunk_source(served, tmp_path):
    write_image(served.image, 64 * MiB, 1)
    served.start()
    copy = str(tmp_path / "copy")
    pull(served.uri, copy)
    served.stop()
    # The last 32 MiB change, and a pull is killed while it stages them.
    write_image(served.image, 64 * MiB, 2, start=32 * MiB)
    served.start()
    proc = start_slow_pull(served.uri, copy)
    proc.kill()
    proc.communicate()
    served.stop()
    # Then the source shrinks below what that journal holds.
    with open(served.image, "r+b") as f:
        f.truncate(16 * MiB)
    served.start()
    got, _ = pull(served.uri, copy)
    assert lab.sha256(copy) == lab.sha256(served.image)
    assert got["blocks_reused"] == 0


def test_a_copy_written_during_the_transfer_is_not_trusted(served, tmp_path):
    write_image(served.image, 64 * MiB, 1)
    served.start()
    copy = str(tmp_path / "copy")
    pull(served.uri, copy)
    served.stop()
    write_image(served.image, 64 * MiB, 3, end=32 * MiB)
    served.start()
    proc = start_slow_pull(served.uri, copy)
    # A standby booted from the copy, meanwhile, writes it.
    with open(copy, "r+b") as f:
        f.seek(60 * MiB)
        f.write(b"standby!" * 512)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "changed" in err and "unchanged" in err
    # The next run reads the copy again, reuses what was staged, and
    # makes it the source's.
    got, _ = pull(served.uri, copy)
    assert "changed" in got["why_scan"] and got["blocks_reused"] > 0
    assert lab.sha256(copy) == lab.sha256(served.image)
