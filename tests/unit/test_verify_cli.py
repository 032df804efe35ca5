"""nbd-verify run as a program on temporary images."""

import hashlib
import os
import random
import shutil
import subprocess

import pytest

from nbdsnap.verify import sources
from verifykit import (assert_one_error_line, flip, free_port, make_sparse,
                       random_data, ranges, reference, run)

BS = 64 * 1024
# Not a multiple of the block size: the last block is short.
SIZE = 3 * 1024 * 1024 + 4097


@pytest.fixture
def data():
    return random_data(SIZE, seed=42)


@pytest.fixture
def image(tmp_path, data):
    path = tmp_path / "image.raw"
    path.write_bytes(data)
    return path


def test_equal(image, copy):
    cp = run("compare", image, copy)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == ""
    assert cp.stderr == ""


@pytest.mark.parametrize("offset", [0, BS - 1, BS, SIZE // 2, SIZE - 1])
def test_one_byte_changed(image, copy, offset):
    flip(copy, offset)
    cp = run("compare", image, copy)
    assert cp.returncode == 1, cp.stderr
    found = ranges(cp.stdout)
    assert len(found) == 1
    start, length = found[0]
    assert start <= offset < start + length
    # Whole blocks, the last one cut at the end of the image.
    assert start % BS == 0
    assert length == min(BS, SIZE - start)


def test_adjacent_blocks_merged(image, copy):
    flip(copy, 5 * BS - 1)
    flip(copy, 5 * BS)
    flip(copy, 6 * BS + 10)
    flip(copy, 20 * BS)
    cp = run("compare", image, copy)
    assert cp.returncode == 1
    assert ranges(cp.stdout) == [(4 * BS, 3 * BS), (20 * BS, BS)]
    assert cp.stdout.splitlines()[-1].endswith(
        f"2 ranges, {4 * BS} bytes")


def test_many_ranges_capped(image, copy):
    for i in range(0, 48, 2):
        flip(copy, i * BS)
    cp = run("compare", image, copy)
    assert cp.returncode == 1
    assert len(ranges(cp.stdout)) == 20
    assert "differ: 4 more ranges not shown" in cp.stdout
    cp = run("compare", "--max-ranges", "0", image, copy)
    assert len(ranges(cp.stdout)) == 24


def test_size_mismatch(image, tmp_path, data):
    short = tmp_path / "short.raw"
    short.write_bytes(data[:-1])
    cp = run("compare", image, short)
    assert_one_error_line(cp, str(SIZE), str(SIZE - 1))
    assert cp.stdout == ""


def test_missing_file(image, tmp_path):
    cp = run("compare", image, tmp_path / "missing.raw")
    assert_one_error_line(cp, "missing.raw")


def test_not_a_file(image, tmp_path):
    cp = run("compare", image, tmp_path)
    assert_one_error_line(cp, "not a regular file or a block device")


def test_nbd_uri_nobody_listens(image):
    # More NBD cases, against real servers, in test_verify_nbd.py.
    port = free_port()
    cp = run("compare", f"nbd://127.0.0.1:{port}/vda", image)
    assert_one_error_line(cp, f"nbd://127.0.0.1:{port}/vda",
                          "cannot connect")


def test_sparse_equals_dense(tmp_path):
    rnd = random.Random(7)
    data = bytearray(8 * 1024 * 1024 + 123)
    # Data at unaligned places, zeros (holes) everywhere else.
    for start in (0, 1024 * 1024 + 4096, 5 * 1024 * 1024 + 333):
        data[start:start + 200000] = rnd.randbytes(200000)
    data = bytes(data)
    dense = tmp_path / "dense.raw"
    dense.write_bytes(data)
    sparse = tmp_path / "sparse.raw"
    make_sparse(sparse, data, [(400 * 1024, 1024 * 1024),
                               (2 * 1024 * 1024, 5 * 1024 * 1024),
                               (6 * 1024 * 1024, len(data))])
    assert sparse.read_bytes() == data
    # The holes must be real, or this test does not test them.
    with sources.open_source(os.fspath(sparse)) as src:
        holes = [e for e in src.extents() if not e.is_data]
    assert sum(e.length for e in holes) >= 4 * 1024 * 1024

    assert run("compare", sparse, dense).returncode == 0
    assert run("compare", dense, sparse).returncode == 0

    cp = run("digest", sparse, dense)
    assert cp.returncode == 0, cp.stderr
    expected = reference(data)
    assert cp.stdout.splitlines() == [
        f"{expected}  {sparse}", f"{expected}  {dense}"]


def test_truncated_file_equals_zeros(tmp_path):
    empty = tmp_path / "empty.raw"
    with open(empty, "wb") as f:
        f.truncate(SIZE)
    zeros = tmp_path / "zeros.raw"
    zeros.write_bytes(bytes(SIZE))
    assert run("compare", empty, zeros).returncode == 0
    cp = run("digest", empty)
    assert cp.stdout.split() == [reference(bytes(SIZE)), str(empty)]


def test_data_in_a_hole_differs(tmp_path, data):
    sparse = tmp_path / "sparse.raw"
    with open(sparse, "wb") as f:
        f.truncate(SIZE)
    dense = tmp_path / "dense.raw"
    dense.write_bytes(bytes(SIZE))
    flip(dense, 2 * 1024 * 1024 + 5)
    cp = run("compare", sparse, dense)
    assert cp.returncode == 1
    assert ranges(cp.stdout) == [(2 * 1024 * 1024, BS)]


def test_digest(image, data):
    cp = run("digest", image)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == f"{reference(data)}  {image}\n"


def test_digest_empty(tmp_path):
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    cp = run("digest", empty)
    assert cp.stdout.split()[0] == hashlib.sha256(bytes(8)).hexdigest()


def test_digest_algorithm(image, data):
    cp = run("digest", "--algorithm", "sha512", image)
    assert cp.stdout.split() == [reference(data, "sha512"), str(image)]


def test_digest_goes_on_after_an_error(image, copy, tmp_path, data):
    cp = run("digest", image, tmp_path / "missing.raw", copy)
    assert_one_error_line(cp, "missing.raw")
    assert cp.stdout.splitlines() == [
        f"{reference(data)}  {image}", f"{reference(data)}  {copy}"]


def test_digest_unknown_algorithm(image):
    cp = run("digest", "--algorithm", "nope", image)
    assert_one_error_line(cp, "nope")
    assert cp.stdout == ""


@pytest.mark.parametrize("args", [[], ["digest"], ["compare", "x"],
                                  ["check", "x"], ["frobnicate"]])
def test_usage_errors(args):
    cp = run(*args)
    assert_one_error_line(cp)


@pytest.mark.parametrize("command", [[], ["digest"], ["compare"],
                                     ["check"]])
def test_help_names_exit_statuses(command):
    cp = run(*command, "--help")
    assert cp.returncode == 0
    assert "exit status" in cp.stdout


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("losetup") is None,
                    reason="needs root and losetup for a loop device")
def test_block_device(image, data):
    dev = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", os.fspath(image)],
        check=True, capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        cp = run("digest", dev)
        # A loop device rounds its size down to 512-byte sectors.
        size = SIZE // 512 * 512
        assert cp.returncode == 0, cp.stderr
        assert cp.stdout.split() == [reference(data[:size]), dev]
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True, timeout=30)
