"""nbdsnap.verify.blkhash against fixed answers and a plain implementation."""

import array
import hashlib
import os
import random
import shutil
import subprocess

import pytest

from nbdsnap.verify import blkhash
from nbdsnap.verify.errors import UnknownAlgorithm
from verifykit import reference

BS = 64 * 1024


def seeded(seed, n):
    return random.Random(seed).randbytes(n)


def hole_image():
    """1 MiB: 256 KiB of data, a 512 KiB hole, 256 KiB of data."""
    return seeded(1, 256 * 1024) + bytes(512 * 1024) + seeded(2, 256 * 1024)


# Computed once with reference() and pinned: a change of construction, block
# size or default algorithm must show here.
PINNED = {
    "empty": (
        lambda: b"",
        "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"),
    "one-byte": (
        lambda: b"A",
        "60fb4e2bdf7dfc32f8230836f7453a77e665e4a1d3cc117944e0296d40b7800c"),
    "zero-block": (
        lambda: bytes(BS),
        "8ab067ab7939a3d4f40cbb118956c07c06aeae2d075d6e0a2ebbb94bd42832af"),
    "block-plus-one": (
        lambda: seeded(0, BS + 1),
        "53502d2080e09672552d206f43747759f418ccb3f7cb51b22d044652a790c645"),
    "1m-with-hole": (
        hole_image,
        "c8d0c4914a0db051f8bfe3075f145268e1aee379d7af2385bcdeded3aea0d224"),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned(name):
    make, expected = PINNED[name]
    data = make()
    assert reference(data) == expected
    h = blkhash.Hasher()
    h.update(data)
    assert h.hexdigest() == expected


def test_empty_is_hash_of_size_field():
    # No blocks at all: only le64(0) is hashed, not the empty string.
    assert blkhash.Hasher().digest() == hashlib.sha256(bytes(8)).digest()


def test_hole_through_zero():
    data = hole_image()
    h = blkhash.Hasher()
    h.update(data[:256 * 1024])
    h.zero(512 * 1024)
    h.update(data[768 * 1024:])
    assert h.hexdigest() == PINNED["1m-with-hole"][1]


# The answers of the blkhash project's own C tests (nirs/blkhash,
# test/blkhash-test.c, sha256, 64 KiB blocks): "X" is len bytes of X,
# "\0" len zero bytes given as data, "-" len zero bytes given as a hole.
HALF = BS // 2
UPSTREAM = [
    ("block-data", [("A", BS)],
     "2e3a5f57d5e726ee5de62db1a85ff816f4fa6ea4627807d9a51bdc4c883e165e"),
    ("block-data-zero", [("\0", BS)],
     "8ab067ab7939a3d4f40cbb118956c07c06aeae2d075d6e0a2ebbb94bd42832af"),
    ("block-zero", [("-", BS)],
     "8ab067ab7939a3d4f40cbb118956c07c06aeae2d075d6e0a2ebbb94bd42832af"),
    ("partial-block-data", [("A", HALF)],
     "9467334d6d7668a2f06898185b5cddc78cdfbd962f50c6bf250101f03a0e54dc"),
    ("partial-block-data-zero", [("\0", HALF)],
     "842d185f0ff348b0d689e184bddc47f69a19032a6934c89b879479f1e86f9d56"),
    ("partial-block-zero", [("-", HALF)],
     "842d185f0ff348b0d689e184bddc47f69a19032a6934c89b879479f1e86f9d56"),
    ("sparse", [("-", 8 * BS)],
     "722ac11a3a81034edf196aa3ee68d1a2e345cd0838b0c78c2ce2fb015d4d817d"),
    ("sparse-large", [("-", 1024**3)],
     "c6d6562c3074a2caa0ceea3e1f460f3af678c792ed05e64157eb51e68ae5260d"),
    ("sparse-unaligned", [("-", 8 * BS), ("-", HALF)],
     "e623a5702b1feb08fbb3d18e35bbb7ec10146b8cd1bcff811200a3948c78c55c"),
    ("zero", [("\0", 8 * BS)],
     "722ac11a3a81034edf196aa3ee68d1a2e345cd0838b0c78c2ce2fb015d4d817d"),
    ("zero-unaligned", [("\0", 8 * BS), ("\0", HALF)],
     "e623a5702b1feb08fbb3d18e35bbb7ec10146b8cd1bcff811200a3948c78c55c"),
    ("full", [(c, HALF) for c in "ABCDEF"],
     "4ab1586084326f5beb911621282e9557cd26856105eff7f78cace5986af4738b"),
    ("full-unaligned", [(c, HALF) for c in "ABCDE"],
     "2cad558b3a2a8d87435e80fe7bae69fa664d92eaa1b9411f573b9fbb412a4d43"),
    ("mix", [("A", HALF), ("-", HALF), ("-", HALF), ("\0", HALF),
             ("E", HALF), ("-", HALF), ("-", HALF), ("\0", HALF)],
     "4b2b5acd96f8105f4fb26abaf35c7c5756338ef9ccce19ffe7714c9ad94b4398"),
    ("mix-unaligned", [("A", HALF), ("-", HALF), ("-", HALF), ("\0", HALF),
                       ("E", HALF), ("-", HALF), ("-", HALF)],
     "2510ac29c7103f2e68c672d728cbd43db4ed3dc809a24cde96e62dc5862a0f57"),
]


@pytest.mark.parametrize(
    "extents,expected", [u[1:] for u in UPSTREAM], ids=[u[0] for u in UPSTREAM])
def test_upstream_vectors(extents, expected):
    h = blkhash.Hasher()
    for byte, length in extents:
        if byte == "-":
            h.zero(length)
        else:
            h.update(byte.encode() * length)
    assert h.hexdigest() == expected


@pytest.mark.parametrize("chunk", [1, 7, 4095, BS - 1, BS, BS + 1, 100003])
def test_streaming_equals_one_shot(chunk):
    data = seeded(3, 5 * BS + 12345)
    one = blkhash.Hasher()
    one.update(data)
    streamed = blkhash.Hasher()
    for i in range(0, len(data), chunk):
        streamed.update(data[i:i + chunk])
    assert streamed.hexdigest() == one.hexdigest() == reference(data)


@pytest.mark.parametrize("prefix", [0, 1, 1000, BS - 1, BS])
@pytest.mark.parametrize("length", [0, 1, BS - 1, BS, BS + 1, 3 * BS + 5])
def test_zero_equals_update_with_zeros(prefix, length):
    data = seeded(4, prefix)
    with_hole = blkhash.Hasher()
    with_hole.update(data)
    with_hole.zero(length)
    with_zeros = blkhash.Hasher()
    with_zeros.update(data + bytes(length))
    assert with_hole.hexdigest() == with_zeros.hexdigest()
    assert with_hole.hexdigest() == reference(data + bytes(length))
    assert with_hole.length == prefix + length


def test_zero_shortcut_equals_hashing_zeros():
    # Zero blocks between data blocks, at unaligned offsets too: the
    # precomputed digest must give what hashing the zeros gives.
    data = (seeded(5, BS + 100) + bytes(3 * BS) + seeded(6, 10)
            + bytes(2 * BS + 7))
    h = blkhash.Hasher()
    h.update(data)
    assert h.hexdigest() == reference(data)
    assert blkhash.zero_block_digest() == hashlib.sha256(bytes(BS)).digest()


def test_zero_many_blocks_in_batches():
    # More blocks than one batch of zero digests, plus a tail.
    count = 3 * 4096 + 17
    h = blkhash.Hasher()
    h.zero(count * BS + 3)
    outer = hashlib.sha256(hashlib.sha256(bytes(BS)).digest() * count)
    outer.update(hashlib.sha256(bytes(3)).digest())
    outer.update((count * BS + 3).to_bytes(8, "little"))
    assert h.hexdigest() == outer.hexdigest()


def test_digest_does_not_end_the_hash():
    data = seeded(7, 2 * BS + 99)
    h = blkhash.Hasher()
    h.update(data[:BS + 5])
    assert h.hexdigest() == reference(data[:BS + 5])
    assert h.hexdigest() == reference(data[:BS + 5])
    h.update(data[BS + 5:])
    assert h.hexdigest() == reference(data)


def test_update_accepts_any_buffer():
    data = seeded(8, 3 * BS + 4)
    h = blkhash.Hasher()
    h.update(bytearray(data[:100]))
    h.update(memoryview(data)[100:BS + 200])
    h.update(array.array("I", data[BS + 200:3 * BS]))
    h.update(data[3 * BS:])
    assert h.hexdigest() == reference(data)


@pytest.mark.parametrize("algorithm", ["sha1", "sha512", "blake2b", "sha3_256"])
def test_other_algorithms(algorithm):
    data = seeded(9, 2 * BS + 3) + bytes(BS)
    h = blkhash.Hasher(algorithm)
    h.update(data)
    assert h.hexdigest() == reference(data, algorithm)


def test_block_size_is_a_parameter():
    data = seeded(10, 10000)
    h = blkhash.Hasher(block_size=4096)
    h.update(data)
    assert h.hexdigest() == reference(data, block_size=4096)


def test_blake3():
    blake3 = pytest.importorskip("blake3")
    data = seeded(11, 2 * BS + 3)
    outer = blake3.blake3()
    for i in range(0, len(data), BS):
        outer.update(blake3.blake3(data[i:i + BS]).digest())
    outer.update(len(data).to_bytes(8, "little"))
    h = blkhash.Hasher("blake3")
    h.update(data)
    assert h.hexdigest() == outer.hexdigest()


@pytest.mark.parametrize("algorithm", ["no-such-hash", "shake_128"])
def test_unusable_algorithm(algorithm):
    with pytest.raises(UnknownAlgorithm):
        blkhash.Hasher(algorithm)


def test_available_algorithms():
    names = blkhash.available_algorithms()
    assert "sha256" in names
    assert "shake_128" not in names


def test_negative_zero_length():
    with pytest.raises(ValueError):
        blkhash.Hasher().zero(-1)


@pytest.mark.skipif(shutil.which("blksum") is None,
                    reason="blksum (nirs/blkhash) is not installed")
@pytest.mark.parametrize("name", sorted(PINNED))
def test_same_as_blksum(tmp_path, name):
    make, expected = PINNED[name]
    path = tmp_path / "image"
    path.write_bytes(make())
    out = subprocess.run(
        ["blksum", os.fspath(path)], check=True, capture_output=True,
        text=True, timeout=60).stdout
    assert out.split()[0] == expected


# Block digests computed apart (as the worker threads do) and fed in order.

def split_digests(data, cut, algorithm="sha256", block_size=BS):
    """Hasher fed with add_digests() of data cut at the offsets in cut."""
    h = blkhash.Hasher(algorithm, block_size)
    edges = [0] + list(cut) + [len(data)]
    for start, end in zip(edges, edges[1:]):
        h.add_digests(blkhash.block_digests(data[start:end], algorithm,
                                            block_size), end - start)
    return h


@pytest.mark.parametrize("name", sorted(PINNED))
def test_add_digests_pinned(name):
    make, expected = PINNED[name]
    assert split_digests(make(), []).hexdigest() == expected


@pytest.mark.parametrize("cut", [[], [BS], [BS, 3 * BS], [4 * BS]])
def test_add_digests_in_pieces(cut):
    data = seeded(12, 4 * BS + 777) + bytes(2 * BS) + seeded(13, 5)
    assert split_digests(data, cut).hexdigest() == reference(data)


def test_add_digests_mixed_with_zero():
    data = seeded(14, 2 * BS) + bytes(3 * BS) + seeded(15, BS + 9)
    h = blkhash.Hasher()
    h.add_digests(blkhash.block_digests(data[:2 * BS]), 2 * BS)
    h.zero(3 * BS)
    h.add_digests(blkhash.block_digests(data[5 * BS:]), BS + 9)
    assert h.hexdigest() == reference(data)


def test_block_digests_zero_blocks_use_the_known_digest():
    digests = blkhash.block_digests(bytes(2 * BS) + bytes(100))
    zero = hashlib.sha256(bytes(BS)).digest()
    assert digests == zero + zero + hashlib.sha256(bytes(100)).digest()
    assert blkhash.block_digests(b"") == b""


def test_block_digests_accepts_any_buffer():
    data = seeded(16, 2 * BS)
    assert blkhash.block_digests(memoryview(bytearray(data))) \
        == blkhash.block_digests(data)


def test_add_digests_needs_whole_blocks_before():
    h = blkhash.Hasher()
    h.update(b"x")
    with pytest.raises(ValueError):
        h.add_digests(blkhash.block_digests(bytes(BS)), BS)


def test_nothing_after_the_short_last_block():
    h = blkhash.Hasher()
    h.add_digests(blkhash.block_digests(b"abc"), 3)
    for add in (lambda: h.update(b"d"), lambda: h.zero(1),
                lambda: h.add_digests(blkhash.block_digests(b"d"), 1)):
        with pytest.raises(ValueError):
            add()
    assert h.hexdigest() == reference(b"abc")


def test_add_digests_checks_the_count():
    with pytest.raises(ValueError):
        blkhash.Hasher().add_digests(bytes(32), BS + 1)


@pytest.mark.parametrize("algorithm,size", [("sha256", 32), ("sha1", 20),
                                            ("sha512", 64)])
def test_digest_size(algorithm, size):
    assert blkhash.digest_size(algorithm) == size
