"""nbd-verify when the world or its own code fails: exit 2, one line.

The faults are made to happen at a known point: nbd-verify runs in a child
that first replaces one function of its own (a seam) with one that, once,
does the damage (truncates the file being read) or raises a bug, then calls
the real one.  A death by signal (SIGBUS from a mapped file) or exit status
1 (which means "the images differ") is what these tests exist to catch.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from nbdsnap.verify import sources
from nbdsnap.verify.errors import SourceError
from verifykit import (assert_one_error_line, make_sparse, random_data,
                       reference, run)

MiB = 1024 * 1024
SIZE = 8 * MiB


def run_with_seam(seam, *args, env=None):
    """nbd-verify ARGS in a child that runs the code seam first."""
    code = (seam + "\nimport sys\nfrom nbdsnap.verify import cli\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")
    return subprocess.run(
        [sys.executable, "-c", code, *map(os.fspath, args)],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, **(env or {})))


def truncate_on_first_hash(path, size, then=""):
    """A seam: the first time a piece is hashed, path shrinks to size
    bytes (and the shell command then runs), before the hash reads it."""
    return f"""
import os, subprocess
from nbdsnap.verify import blkhash
_real = blkhash.block_digests
def _truncating(data, *args, **kwargs):
    blkhash.block_digests = _real
    os.truncate({os.fspath(path)!r}, {size})
    if {then!r}:
        subprocess.run({then!r}, shell=True, check=True)
    return _real(data, *args, **kwargs)
blkhash.block_digests = _truncating
"""


@pytest.fixture
def data():
    return random_data(SIZE, seed=9)


@pytest.fixture
def image(tmp_path, data):
    path = tmp_path / "image.raw"
    path.write_bytes(data)
    return path


def assert_no_signal_death(cp):
    assert cp.returncode >= 0, f"killed by signal {-cp.returncode}"


@pytest.mark.parametrize("args", [
    ["digest"],
    # The background digest of the hooks: one thread, a manifest.
    ["digest", "--threads", "1", "--manifest", "{manifest}"],
])
def test_file_truncated_while_digested(image, tmp_path, args):
    manifest = tmp_path / "m.json"
    args = [a.format(manifest=manifest) for a in args]
    cp = run_with_seam(truncate_on_first_hash(image, 100000), *args, image)
    assert_no_signal_death(cp)
    assert_one_error_line(cp, str(image), "offset 100000",
                          "unexpected end of file")
    assert cp.stdout == ""
    assert not manifest.exists()


def test_copy_truncated_while_checked(image, copy, tmp_path):
    manifest = tmp_path / "m.json"
    assert run("digest", "--manifest", manifest, image).returncode == 0
    cp = run_with_seam(truncate_on_first_hash(copy, 100000),
                       "check", manifest, copy)
    assert_no_signal_death(cp)
    assert_one_error_line(cp, str(copy), "unexpected end of file")
    assert cp.stdout == ""


def test_sparse_file_truncated_is_not_a_hole(tmp_path):
    """A file that ends before the hole we are about to report did not
    become zeros: it shrank, and the digest of its old size is a lie."""
    size = 16 * MiB
    data = random_data(size, holes=[(MiB, 15 * MiB)])
    path = tmp_path / "sparse.raw"
    make_sparse(path, data, [(MiB, 15 * MiB)])
    with sources.FileSource(os.fspath(path)) as src:
        extents = src.extents()
        assert next(extents) == sources.Extent(0, MiB, True)
        os.truncate(path, MiB)
        with pytest.raises(SourceError, match="shrank to 1048576 bytes"):
            next(extents)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("losetup") is None,
                    reason="needs root and losetup for a loop device")
def test_block_device_shrinks_while_digested(image, data):
    """A shrinking LV, played by a loop device whose backing file is cut
    and whose size is read again (losetup -c) in the middle of a digest."""
    dev = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", os.fspath(image)],
        check=True, capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        assert run("digest", dev).stdout.split() == [reference(data), dev]
        cp = run_with_seam(truncate_on_first_hash(
            image, 1 * MiB, then=f"losetup -c {dev}"), "digest", dev)
        assert_no_signal_death(cp)
        assert_one_error_line(cp, dev, "offset 1048576")
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True, timeout=30)


BUG = """
from nbdsnap.verify import ops
def _bug(*args, **kwargs):
    raise KeyError("a bug\\non two lines")
ops.{function} = _bug
"""


@pytest.mark.parametrize("function,args", [
    ("checksum", ["digest", "{image}"]),
    ("compare", ["compare", "{image}", "{image}"]),
    ("check", ["check", "{manifest}", "{image}"]),
])
def test_a_bug_is_an_error_not_a_difference(image, tmp_path, function, args):
    manifest = tmp_path / "m.json"
    assert run("digest", "--manifest", manifest, image).returncode == 0
    args = [a.format(image=image, manifest=manifest) for a in args]
    cp = run_with_seam(BUG.format(function=function), *args)
    assert_one_error_line(cp, "internal error", "KeyError", "a bug")
    assert "Traceback" not in cp.stderr
    assert cp.stdout == ""


def test_a_bug_shows_its_traceback_when_asked(image):
    cp = run_with_seam(BUG.format(function="checksum"), "digest", image,
                       env={"NBD_VERIFY_DEBUG": "1"})
    assert cp.returncode == 2
    assert cp.stderr.startswith("nbd-verify: internal error")
    assert "Traceback" in cp.stderr
    assert "KeyError" in cp.stderr.splitlines()[-1]


def test_output_closed_early(image, tmp_path):
    """nbd-verify compare ... | head -1: the reader left, nobody erred."""
    copy = tmp_path / "copy.raw"
    copy.write_bytes(bytes(SIZE))
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbdsnap.verify.cli", "compare",
         "--max-ranges", "0", image, copy],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err == "nbd-verify: output closed early (broken pipe)\n"


def test_background_digest_of_a_shrinking_base(image, tmp_path):
    """The hooks' freeze-time digest (hooks/digest.py, a detached child)
    runs this code: a base that shrinks under it is a logged failure and
    exit status 1, its manifest not written, not a death by SIGBUS."""
    manifest = tmp_path / "m.manifest"
    job = tmp_path / ".m.manifest.job"
    job.write_text(json.dumps({
        "manifest": os.fspath(manifest), "base": os.fspath(image),
        "session": "s1", "algorithm": "sha256", "kind": "full",
        "why": "test", "generation": 1, "chain_id": "c1",
        "chain_started": "2026-12-01T00:00:00Z", "domain_xml": "",
        "frozen": 0, "previous": None, "dirty": None}))
    code = truncate_on_first_hash(image, 100000) + f"""
import sys
from nbdsnap.hooks import digest
sys.exit(digest.main([{os.fspath(job)!r}]))
"""
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=120, input="go\n")
    assert_no_signal_death(cp)
    assert cp.returncode == 1, cp.stderr
    assert "digest of" in cp.stderr and "failed" in cp.stderr
    assert "unexpected end of file" in cp.stderr
    assert "Traceback" not in cp.stderr
    assert not manifest.exists()
