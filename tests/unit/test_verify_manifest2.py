"""The manifest, version 2: built from block digests, read in parts."""

import hashlib
import json
import os
import struct

import pytest

from nbdsnap.verify import blkhash, manifest2, manifest2_pack, ops, sources
from nbdsnap.verify.errors import ManifestError
from verifykit import (assert_one_error_line, chunk_reference, flip,
                       make_sparse, random_data, ranges, reference, run)

BS = 64 * 1024
MiB = 1024 * 1024
CHUNK = 1 * MiB
# Not a multiple of the chunk size, nor of the block size.
SIZE = 5 * MiB + 4097
HOLES = [(2 * MiB, 3 * MiB + 5)]
XML = "<domain type='kvm'><name>vm \u00e9</name></domain>"


@pytest.fixture
def data():
    return random_data(SIZE, HOLES, seed=7)


@pytest.fixture
def image(tmp_path, data):
    path = tmp_path / "image.raw"
    make_sparse(path, data, HOLES)
    return path


def build(data, **changes):
    args = dict(generation=7, chain_id="chain-1f2e", kind="incremental",
                domain_xml=XML, chunk_size=CHUNK, source="/images/vm.raw",
                created="2026-01-31T02:00:00Z",
                chain_started="2026-01-24T02:00:00Z")
    args.update(changes)
    digests = blkhash.block_digests(data, args.get("algorithm", "sha256"))
    return manifest2_pack.build(digests, len(data), **args)


class Reader:
    """A manifest in memory that counts its reads."""

    def __init__(self, data, name="m"):
        self.data = bytes(data)
        self.name = name
        self.reads = []

    def pread(self, offset, length):
        self.reads.append((offset, length))
        return self.data[offset:offset + length]


@pytest.fixture
def made(tmp_path, data):
    path = tmp_path / "image.manifest2"
    manifest2_pack.write(str(path), build(data))
    return path


def test_round_trip(data):
    reader = Reader(build(data))
    h = manifest2.read_header(reader)
    assert (h.size, h.algorithm, h.block_size, h.chunk_size) == (
        SIZE, "sha256", BS, CHUNK)
    assert (h.generation, h.kind, h.chain_id, h.complete) == (
        7, "incremental", "chain-1f2e", True)
    assert (h.source, h.created, h.chain_started) == (
        "/images/vm.raw", "2026-01-31T02:00:00Z", "2026-01-24T02:00:00Z")
    assert h.digest.hex() == reference(data)
    chunks = manifest2.read_chunks(reader, h)
    every = b"".join(b"".join(manifest2.read_block_digests(reader, h,
                                                           chunks, i))
                     for i in range(len(chunks)))
    assert every == blkhash.block_digests(data)
    assert manifest2.read_domain_xml(reader, h) == XML


def test_chunks_equal_what_version_1_computes(image, data):
    with sources.open_source(os.fspath(image)) as src:
        v1 = ops.make_manifest(src, chunk_size=CHUNK, threads=2)
    reader = Reader(build(data))
    h = manifest2.read_header(reader)
    assert [c.hex() for c in manifest2.read_chunks(reader, h)] == \
        v1.chunks == chunk_reference(data, CHUNK)
    assert h.digest.hex() == v1.digest


@pytest.mark.parametrize("i", [0, 3, 5])
def test_one_chunk_is_one_read_of_its_run(data, i):
    reader = Reader(build(data))
    h = manifest2.read_header(reader)
    chunks = manifest2.read_chunks(reader, h)
    reader.reads.clear()
    digests = manifest2.read_block_digests(reader, h, chunks, i)
    blocks = -(-min(CHUNK, SIZE - i * CHUNK) // BS)
    offset = manifest2.HEADER_SIZE + len(chunks) * 32 + i * (CHUNK // BS) * 32
    assert reader.reads == [(offset, blocks * 32)]
    assert b"".join(digests) == blkhash.block_digests(
        data[i * CHUNK:(i + 1) * CHUNK])


def test_header_and_chunk_table_are_one_read_each(data):
    reader = Reader(build(data))
    h = manifest2.read_header(reader)
    manifest2.read_chunks(reader, h)
    assert reader.reads == [(0, 4096), (4096, 6 * 32)]


def test_zero_blocks_have_the_zero_digest(data):
    reader = Reader(build(data))
    h = manifest2.read_header(reader)
    chunks = manifest2.read_chunks(reader, h)
    digests = manifest2.read_block_digests(reader, h, chunks, 2)
    # Chunk 2 is [2 MiB, 3 MiB): zeros up to 3 MiB + 5.
    assert digests == [h.zero_digest] * (CHUNK // BS)
    assert h.zero_digest == hashlib.sha256(bytes(BS)).digest()
    first = manifest2.read_block_digests(reader, h, chunks, 3)[0]
    assert first != h.zero_digest


class Source:
    """A manifest as a verify source (a file, an NBD export) that counts
    its reads."""

    def __init__(self, data):
        self.data, self.size, self.name = data, len(data), "nbd://h/m"
        self.reads = []

    def read_into(self, offset, buf):
        self.reads.append((offset, len(buf)))
        buf[:] = self.data[offset:offset + len(buf)]


def test_check_reads_only_the_header_and_the_chunk_table(data):
    src = Source(build(data))
    m = manifest2.read(src)
    assert m.chunks == chunk_reference(data, CHUNK) and m.complete
    assert (m.size, m.chunk_size, m.digest) == (SIZE, CHUNK, reference(data))
    assert src.reads == [(0, 8), (0, 4096), (4096, 6 * 32)]


def test_incomplete_has_the_first_chunks(data):
    first = blkhash.block_digests(data[:2 * CHUNK])
    built = manifest2_pack.build(first, SIZE, generation=1, chain_id="c",
                            kind="full", domain_xml="", chunk_size=CHUNK,
                            complete=False)
    reader = Reader(built)
    h = manifest2.read_header(reader)
    assert not h.complete and h.chunk_count == 2
    chunks = manifest2.read_chunks(reader, h)
    assert [c.hex() for c in chunks] == chunk_reference(data, CHUNK)[:2]
    with pytest.raises(ManifestError, match="no chunk 2"):
        manifest2.read_block_digests(reader, h, chunks, 2)


# Damage: each part refused on its own, in one line.

def damaged(data, offset):
    built = bytearray(build(data))
    built[offset] ^= 1
    return Reader(built)


def read_all(reader):
    h = manifest2.read_header(reader)
    chunks = manifest2.read_chunks(reader, h)
    for i in range(len(chunks)):
        manifest2.read_block_digests(reader, h, chunks, i)
    manifest2.read_domain_xml(reader, h)


def one_line(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text and text.startswith("m: ")
    return text


@pytest.mark.parametrize("where,words", [
    (0, "not an nbdsnap manifest"),
    (20, "header checksum"),
    (4095, "header checksum"),
    (4096 + 40, "chunk table checksum"),
    (4096 + 6 * 32 + 3 * 16 * 32 + 1, "block digests of chunk 3"),
    (-1, "domain XML checksum"),
])
def test_damage_is_refused(data, where, words):
    reader = damaged(data, where if where >= 0 else len(build(data)) - 1)
    with pytest.raises(ManifestError, match=words) as excinfo:
        read_all(reader)
    one_line(excinfo)


@pytest.mark.parametrize("keep", [0, 100, 4095, 4096 + 10, -1])
def test_truncated_is_refused(data, keep):
    built = build(data)
    reader = Reader(built[:keep if keep >= 0 else len(built) - 1])
    with pytest.raises(ManifestError, match="truncated") as excinfo:
        read_all(reader)
    one_line(excinfo)


def resigned(data, **fields):
    """A manifest whose header says fields, with a valid header checksum:
    what only a hostile or buggy writer makes."""
    built = bytearray(build(data))
    names = ("magic version flags size block_size digest_size chunk_size "
             "chunk_count generation kind algorithm chain_id created "
             "chain_started digest "
             "ct_offset ct_length bt_offset bt_length xml_offset xml_length "
             "ct_sha xml_sha source_length").split()
    values = dict(zip(names, manifest2._FIXED.unpack_from(built)))
    values.update(fields)
    manifest2._FIXED.pack_into(built, 0, *(values[n] for n in names))
    built[4064:4096] = hashlib.sha256(built[:4064]).digest()
    return Reader(built)


@pytest.mark.parametrize("fields,words", [
    (dict(version=3), "version 3 is not supported"),
    (dict(flags=6), "unknown flags"),
    (dict(size=1 << 63), "size"),
    (dict(size=1 << 40), "chunks for"),
    (dict(block_size=0), "block size 0"),
    (dict(block_size=1 << 31), "block size"),
    (dict(chunk_size=0), "chunk size"),
    (dict(chunk_size=CHUNK + 1), "chunk size"),
    (dict(chunk_size=1 << 40), "chunk size"),
    (dict(chunk_count=1 << 60), "chunks for"),
    (dict(digest_size=64), "digest size"),
    (dict(algorithm=b"nosuch"), "unknown digest algorithm"),
    (dict(algorithm=b"sha\n256"), "algorithm is not printable"),
    (dict(kind=9), "kind 9"),
    (dict(xml_length=1 << 40), "domain XML of"),
    (dict(xml_offset=10), "not where its sizes put them"),
    (dict(bt_length=1 << 50), "not where its sizes put them"),
    (dict(source_length=4000), "source of"),
])
def test_absurd_headers_are_refused(data, fields, words):
    reader = resigned(data, **fields)
    with pytest.raises(ManifestError, match=words) as excinfo:
        manifest2.read_header(reader)
    one_line(excinfo)
    assert reader.reads == [(0, 4096)]


def test_absurd_sizes_never_allocate(data):
    # A 1 TiB image in 1 GiB chunks is fine; 2**62 bytes in 64 KiB
    # chunks would need a chunk table of 2**51 bytes.
    reader = resigned(data, size=1 << 62, chunk_size=BS,
                      chunk_count=1 << 46)
    with pytest.raises(ManifestError, match="chunk table of"):
        manifest2.read_header(reader)


def test_build_refuses_digests_that_do_not_cover_the_image(data):
    with pytest.raises(ValueError, match="do not cover"):
        manifest2_pack.build(blkhash.block_digests(data[:CHUNK]), SIZE,
                        generation=1, chain_id="c", kind="full",
                        domain_xml="")


# check, as a program: v2 and v1.

def test_check_v2_equal(made, copy):
    cp = run("check", made, copy)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == cp.stderr == ""


def test_check_v2_names_the_differing_chunk(made, copy):
    flip(copy, 4 * CHUNK + 12345)
    cp = run("check", made, copy)
    assert cp.returncode == 1, cp.stderr
    assert ranges(cp.stdout) == [(4 * CHUNK, CHUNK)]


def test_check_v2_damaged(made, copy):
    with open(made, "r+b") as f:
        f.seek(4096 + 5)
        f.write(b"\xff")
    assert_one_error_line(run("check", made, copy), "chunk table checksum")


def test_check_v2_truncated(made, copy):
    os.truncate(made, 4096 + 10)
    assert_one_error_line(run("check", made, copy), "truncated")


def test_check_v2_incomplete(tmp_path, data, copy):
    path = tmp_path / "m2"
    manifest2_pack.write(str(path), manifest2_pack.build(
        b"", SIZE, generation=1, chain_id="c", kind="full", domain_xml="",
        complete=False))
    assert_one_error_line(run("check", path, copy), "incomplete")


def test_check_v1_still_read(tmp_path, image, copy):
    path = tmp_path / "v1.manifest"
    assert run("digest", "--manifest", path, image).returncode == 0
    assert json.loads(path.read_text())["version"] == 1
    assert run("check", path, copy).returncode == 0
    flip(copy, 3)
    assert run("check", path, copy).returncode == 1


def test_the_header_is_documented_little_endian(data):
    built = build(data)
    assert built[:8] == b"NBDSNAPM"
    assert struct.unpack_from("<II", built, 8) == (2, 1)


def test_digest_writes_version_2_on_request(tmp_path, image, copy, data):
    path = tmp_path / "made.manifest2"
    cp = run("digest", "--manifest", path, "--manifest-version", "2",
             "--chunk-size", "1M", image)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == f"{reference(data)}  {image}\n"
    reader = Reader(path.read_bytes())
    h = manifest2.read_header(reader)
    assert (h.generation, h.kind, h.source) == (1, "full", str(image))
    assert len(h.chain_id) == 32 and manifest2.read_domain_xml(reader, h) == ""
    chunks = manifest2.read_chunks(reader, h)
    assert b"".join(b"".join(manifest2.read_block_digests(reader, h, chunks,
                                                          i))
                    for i in range(len(chunks))) == \
        blkhash.block_digests(data)
    assert run("check", path, copy).returncode == 0
    flip(copy, SIZE - 1)
    cp = run("check", path, copy)
    assert ranges(cp.stdout) == [(5 * MiB, SIZE - 5 * MiB)]


def test_digest_writes_version_1_by_default(tmp_path, image):
    path = tmp_path / "default.manifest"
    assert run("digest", "--manifest", path, image).returncode == 0
    assert json.loads(path.read_text())["version"] == 1


def test_packer_hashes_a_short_zero_tail_at_its_length():
    data = b"x" * BS + bytes(2 * BS + 100)
    out = manifest2_pack.MemoryOut()
    packer = manifest2_pack.Packer(
        out, len(data), generation=1, kind="full", chain_id="c",
        chain_started="", created="", source="", domain_xml="",
        chunk_size=2 * BS)
    packer.add_digests(blkhash.block_digests(data[:BS]), BS)
    packer.zero(2 * BS + 100)
    packer.finish()
    assert bytes(out.data) == manifest2_pack.build(
        blkhash.block_digests(data), len(data), generation=1, kind="full",
        chain_id="c", domain_xml="", chunk_size=2 * BS)


def test_build_takes_a_list_of_block_digests(data):
    md = 32
    joined = blkhash.block_digests(data)
    listed = [joined[i:i + md] for i in range(0, len(joined), md)]
    assert manifest2_pack.build(listed, SIZE, generation=7, chain_id="chain-1f2e",
                           kind="incremental", domain_xml=XML,
                           chunk_size=CHUNK, source="/images/vm.raw",
                           created="2026-01-31T02:00:00Z",
                           chain_started="2026-01-24T02:00:00Z") == build(data)


@pytest.mark.parametrize("changes,words", [
    (dict(kind="partial"), "kind"),
    (dict(generation=-1), "generation"),
    (dict(chain_id="has space"), "chain id"),
    (dict(chain_id="x" * 65), "chain id"),
])
def test_build_refuses_bad_metadata(data, changes, words):
    with pytest.raises(ValueError, match=words):
        build(data, **changes)


def test_other_algorithm_round_trip(data):
    reader = Reader(build(data, algorithm="sha512"))
    h = manifest2.read_header(reader)
    assert (h.algorithm, h.digest_size) == ("sha512", 64)
    assert h.digest.hex() == reference(data, "sha512")
    chunks = manifest2.read_chunks(reader, h)
    assert [c.hex() for c in chunks] == chunk_reference(data, CHUNK,
                                                        "sha512")
    assert len(manifest2.read_block_digests(reader, h, chunks, 5)[0]) == 64
