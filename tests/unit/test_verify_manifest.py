"""The manifest: its chunk digests, its format, and digest --manifest / check."""

import hashlib
import json
import os
import random

import pytest

from nbdsnap.verify import blkhash, manifest, ops, sources
from nbdsnap.verify.manifest import ChunkHasher, ManifestError
from verifykit import (assert_one_error_line, chunk_reference, flip,
                       make_sparse, random_data, ranges, reference, run)

BS = 64 * 1024
MiB = 1024 * 1024
CHUNK = 1 * MiB
# Not a multiple of the chunk size, nor of the block size.
SIZE = 5 * MiB + 4097
# Zeros in the middle, a real hole in the image file.
HOLES = [(2 * MiB, 3 * MiB + 5)]


@pytest.fixture
def data():
    return random_data(SIZE, HOLES, seed=5)


@pytest.fixture
def image(tmp_path, data):
    path = tmp_path / "image.raw"
    make_sparse(path, data, HOLES)
    return path


@pytest.fixture
def made(tmp_path, image):
    path = tmp_path / "image.manifest"
    cp = run("digest", "--manifest", path, "--chunk-size", "1M", image)
    assert cp.returncode == 0, cp.stderr
    return path


# ChunkHasher: every chunk is the blkhash of its own range.

@pytest.mark.parametrize("cuts", [[], [BS], [3 * BS, 20 * BS],
                                  [CHUNK - BS, CHUNK + BS]])
def test_chunks_equal_blkhash_of_each_range(data, cuts):
    chunks = ChunkHasher(chunk_size=CHUNK)
    edges = [0] + cuts + [len(data)]
    for start, end in zip(edges, edges[1:]):
        chunks.add_digests(blkhash.block_digests(data[start:end]),
                           end - start)
    assert chunks.hexdigests() == chunk_reference(data, CHUNK)


def test_chunks_with_zero_runs():
    data = random.Random(1).randbytes(BS) + bytes(3 * CHUNK) + b"tail"
    chunks = ChunkHasher(chunk_size=CHUNK)
    chunks.add_digests(blkhash.block_digests(data[:BS]), BS)
    chunks.zero(3 * CHUNK)
    chunks.add_digests(blkhash.block_digests(b"tail"), 4)
    assert chunks.hexdigests() == chunk_reference(data, CHUNK)


def test_chunk_size_must_be_whole_blocks():
    with pytest.raises(ValueError):
        ChunkHasher(chunk_size=BS + 1)


def test_make_manifest(image, data):
    with sources.open_source(os.fspath(image)) as src:
        m = ops.make_manifest(src, chunk_size=CHUNK, threads=2)
    assert m.digest == reference(data)
    assert m.chunks == chunk_reference(data, CHUNK)
    assert (m.size, m.algorithm, m.block_size, m.chunk_size) == (
        SIZE, "sha256", BS, CHUNK)


def test_differing_ranges_merged():
    a = ["0", "1", "2", "3", "4"]
    b = ["0", "x", "x", "3", "x"]
    assert list(manifest.differing_ranges(a, b, 10, 47)) == [
        (10, 20), (40, 7)]


# The format.

def sample():
    return manifest.Manifest(
        size=3 * CHUNK, algorithm="sha256", block_size=BS, chunk_size=CHUNK,
        digest="ab" * 32, chunks=["cd" * 32] * 3, source="/x",
        created="2026-01-31T02:00:00Z")


def test_round_trip():
    m = sample()
    assert manifest.loads(manifest.dumps(m), "m") == m


def test_documented_members():
    data = json.loads(manifest.dumps(sample()))
    assert sorted(data) == sorted([
        "format", "version", "complete", "source", "created", "size",
        "algorithm", "block_size", "chunk_size", "digest", "chunks",
        "checksum"])
    assert data["format"] == "nbdsnap-manifest" and data["version"] == 1
    body = {k: v for k, v in data.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    assert data["checksum"] == hashlib.sha256(canonical.encode()).hexdigest()


def test_padding_after_the_json_is_ignored():
    assert manifest.loads(manifest.dumps(sample()).encode() + bytes(300),
                          "m") == sample()


def tampered(**changes):
    data = json.loads(manifest.dumps(sample()))
    data.update(changes)
    return json.dumps(data)


def resigned(**changes):
    data = json.loads(manifest.dumps(sample()))
    data.update(changes)
    data["checksum"] = manifest._checksum(data)
    return json.dumps(data)


@pytest.mark.parametrize("text,words", [
    ("", "invalid JSON"),
    ("{\"format\": ", "invalid JSON"),
    (b"\xff\xfe", "not text"),
    ("[1, 2]", "not an nbdsnap manifest"),
    ("{\"format\": \"other\"}", "not an nbdsnap manifest"),
    (tampered(version=2), "version 2 is not supported"),
    (tampered(size=CHUNK), "damaged"),
    (tampered(chunks=["ce" * 32] * 3), "damaged"),
    (tampered(checksum="0" * 64), "damaged"),
    (resigned(chunks=["cd" * 32] * 2), "2 chunks"),
    (resigned(chunks=["zz"] * 3), "not hexadecimal"),
    (resigned(chunk_size=BS + 1), "not a multiple"),
    (resigned(size=-1), "invalid size"),
    (resigned(complete="yes"), "complete"),
])
def test_bad_manifests(text, words):
    with pytest.raises(ManifestError, match=words):
        manifest.loads(text, "m")


def test_incomplete_may_have_fewer_chunks():
    m = manifest.loads(resigned(complete=False, chunks=["cd" * 32]), "m")
    assert not m.complete and len(m.chunks) == 1


# digest --manifest and check, as programs.

def test_digest_writes_the_manifest(made, image, data):
    m = json.loads(made.read_text())
    assert m["digest"] == reference(data)
    assert m["chunks"] == chunk_reference(data, CHUNK)
    assert m["size"] == SIZE and m["chunk_size"] == CHUNK
    assert m["complete"] is True and m["source"] == str(image)
    cp = run("digest", image)
    assert cp.stdout.split()[0] == m["digest"]


def test_check_equal(made, copy):
    cp = run("check", made, copy)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == cp.stderr == ""


@pytest.mark.parametrize("offset", [0, BS, CHUNK - 1, CHUNK, 2 * MiB + 7,
                                    SIZE - 1])
def test_check_finds_and_places_one_byte(made, copy, offset):
    flip(copy, offset)
    cp = run("check", made, copy)
    assert cp.returncode == 1, cp.stderr
    start = offset // CHUNK * CHUNK
    assert ranges(cp.stdout) == [(start, min(CHUNK, SIZE - start))]
    assert cp.stdout.splitlines()[-1].endswith("1 ranges, %d bytes"
                                               % min(CHUNK, SIZE - start))


def test_check_merges_and_caps(made, copy):
    for offset in (10, CHUNK + 10, 4 * CHUNK + 1):
        flip(copy, offset)
    cp = run("check", made, copy)
    assert ranges(cp.stdout) == [(0, 2 * CHUNK), (4 * CHUNK, CHUNK)]
    cp = run("check", "--max-ranges", "1", made, copy)
    assert ranges(cp.stdout) == [(0, 2 * CHUNK)]
    assert "differ: 1 more ranges not shown" in cp.stdout


def test_check_size_mismatch(made, tmp_path, data):
    short = tmp_path / "short.raw"
    short.write_bytes(data[:-1])
    cp = run("check", made, short)
    assert_one_error_line(cp, str(SIZE), str(SIZE - 1))
    assert cp.stdout == ""


@pytest.mark.parametrize("content,words", [
    ("garbage\n", "not a manifest or damaged"),
    ("{\"format\": \"sha256sum\"}", "not an nbdsnap manifest"),
])
def test_check_foreign_manifest(tmp_path, copy, content, words):
    bad = tmp_path / "bad.manifest"
    bad.write_text(content)
    assert_one_error_line(run("check", bad, copy), words)


def test_check_damaged_manifest(made, copy):
    text = made.read_text()
    m = json.loads(text)
    made.write_text(text.replace(m["chunks"][2], "0" * 64))
    assert_one_error_line(run("check", made, copy), "damaged")


def test_check_truncated_manifest(made, copy):
    text = made.read_text()
    made.write_text(text[:len(text) // 2])
    assert_one_error_line(run("check", made, copy), "invalid JSON")


def test_check_incomplete_manifest(made, copy):
    data = json.loads(made.read_text())
    data["complete"] = False
    data["checksum"] = manifest._checksum(data)
    made.write_text(json.dumps(data))
    assert_one_error_line(run("check", made, copy), "incomplete")


def test_check_self_contradicting_manifest(made, copy):
    data = json.loads(made.read_text())
    data["digest"] = "0" * 64
    data["checksum"] = manifest._checksum(data)
    made.write_text(json.dumps(data))
    assert_one_error_line(run("check", made, copy), "contradicts")


def test_check_missing_manifest_or_copy(made, tmp_path, copy):
    assert_one_error_line(run("check", tmp_path / "none", copy), "none")
    assert_one_error_line(run("check", made, tmp_path / "none.raw"),
                          "none.raw")


def test_check_other_algorithm(tmp_path, image, copy, data):
    path = tmp_path / "sha512.manifest"
    cp = run("digest", "-a", "sha512", "--manifest", path, image)
    assert cp.returncode == 0, cp.stderr
    assert json.loads(path.read_text())["algorithm"] == "sha512"
    assert run("check", path, copy).returncode == 0
    flip(copy, 7)
    assert run("check", path, copy).returncode == 1


def test_default_chunk_size(tmp_path, image):
    path = tmp_path / "m"
    assert run("digest", "--manifest", path, image).returncode == 0
    m = json.loads(path.read_text())
    assert m["chunk_size"] == 16 * MiB and len(m["chunks"]) == 1


@pytest.mark.parametrize("value", ["1000", "0", "64X", "1.5M"])
def test_bad_chunk_size(tmp_path, image, value):
    cp = run("digest", "--manifest", tmp_path / "m", "--chunk-size", value,
             image)
    assert_one_error_line(cp, "chunk size")


def test_manifest_takes_one_source(tmp_path, image, copy):
    cp = run("digest", "--manifest", tmp_path / "m", image, copy)
    assert_one_error_line(cp, "exactly one SOURCE")


def test_manifest_cannot_be_written(tmp_path, image):
    cp = run("digest", "--manifest", tmp_path / "no" / "m", image)
    assert_one_error_line(cp, "cannot write manifest")
    assert cp.stdout == ""


def test_check_waits_for_an_incomplete_manifest_to_complete(tmp_path, image):
    import threading
    from nbdsnap.verify import manifest as manifest_mod
    path = str(tmp_path / "m.json")
    assert run("digest", "--manifest", path, image).returncode == 0
    done = manifest_mod.loads(open(path).read(), path)
    manifest_mod.write(path, done._replace(complete=False, chunks=[]))
    refused = run("check", path, image)
    assert refused.returncode == 2 and "incomplete" in refused.stderr
    timer = threading.Timer(1.0, manifest_mod.write, (path, done))
    timer.start()
    try:
        waited = run("check", "--wait", "30", path, image)
    finally:
        timer.join()
    assert waited.returncode == 0, waited.stderr
    assert "waiting up to 30 s" in waited.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "-0.5"])
def test_check_refuses_a_wait_that_never_ends(tmp_path, image, value):
    """nan made the deadline never come: an incomplete manifest was waited
    for for ever.  A usage error, before any manifest is read."""
    from nbdsnap.verify import manifest as manifest_mod
    path = str(tmp_path / "m.json")
    assert run("digest", "--manifest", path, image).returncode == 0
    done = manifest_mod.loads(open(path).read(), path)
    manifest_mod.write(path, done._replace(complete=False, chunks=[]))
    cp = run("check", f"--wait={value}", path, image)
    assert_one_error_line(cp, "--wait", "invalid seconds value", value)
