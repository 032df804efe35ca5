"""manifest2_write: full and incremental v2 manifests written to files.

The property that matters: an incremental manifest made from a previous
one and dirty ranges covering every change is the full manifest of the new
image, byte for byte, but for the header's kind, created and source.
"""

import os
import random
import stat

import pytest

from nbdsnap.verify import blkhash, manifest2, manifest2_pack, plan, sources
from nbdsnap.verify.errors import ManifestError
from nbdsnap.verify.manifest2_write import write_full, write_incremental
from verifykit import make_sparse, random_data, reference

BS = 64 * 1024
CHUNK = 4 * BS          # many chunks, cheaply
XML = "<domain><name>vm \u00e9</name></domain>"
FIELDS = dict(domain_xml=XML, chunk_size=CHUNK, threads=2)
FULL_ONLY = dict(chain_id="chain-9", chain_started="2026-01-01T00:00:00Z")


def image(tmp_path, name, data, holes=()):
    path = tmp_path / name
    make_sparse(path, data, holes)
    return str(path)


def full(tmp_path, name, data, holes=(), **changes):
    """The full manifest of data: (its path, its Stats)."""
    path = str(tmp_path / (name + ".m2"))
    args = dict(FIELDS, **FULL_ONLY, generation=5, source_name="full",
                created="2026-01-02T00:00:00Z")
    args.update(changes)
    with sources.open_source(image(tmp_path, name, data, holes)) as src:
        return path, write_full(path, src, **args)


def incremental(tmp_path, previous, data, dirty, holes=(), **changes):
    path = str(tmp_path / "incr.m2")
    args = dict(FIELDS, generation=5, source_name="incr",
                created="2026-01-03T00:00:00Z")
    args.update(changes)
    with sources.open_source(image(tmp_path, "b.raw", data, holes)) as src, \
            manifest2.FileReader(previous) as prev:
        return path, write_incremental(path, prev, src, dirty, **args)


def header(path):
    with manifest2.FileReader(path) as r:
        return manifest2.read_header(r)


def assert_same_but_kind_created_source(incr, full_path):
    a, b = open(incr, "rb").read(), open(full_path, "rb").read()
    ha, hb = header(incr), header(full_path)
    assert (ha.kind, ha.created, ha.source) == (
        "incremental", "2026-01-03T00:00:00Z", "incr")
    assert (hb.kind, hb.created, hb.source) == (
        "full", "2026-01-02T00:00:00Z", "full")
    same = dict(kind="full", created="", source="")
    assert ha._replace(**same) == hb._replace(**same)
    assert len(a) == len(b) and a[4096:] == b[4096:]


def check(tmp_path, old, new, dirty, old_holes=(), new_holes=()):
    """Previous of old, incremental of new: equal to new's full; the
    incremental's Stats."""
    prev, _ = full(tmp_path, "a.raw", old, old_holes)
    want, _ = full(tmp_path, "b-full.raw", new, new_holes)
    path, stats = incremental(tmp_path, prev, new, dirty, new_holes)
    assert_same_but_kind_created_source(path, want)
    assert header(path).digest.hex() == reference(new)
    return stats


def changed(data, *ranges, seed=3):
    """data with random bytes written over each (offset, length)."""
    out = bytearray(data)
    rnd = random.Random(seed)
    for offset, length in ranges:
        length = max(0, min(length, len(out) - offset))
        out[offset:offset + length] = rnd.randbytes(length)
    return bytes(out)


SIZE = 11 * CHUNK + 3 * BS + 777        # not a multiple of block or chunk


def test_full_equals_build_of_the_block_digests(tmp_path):
    data = random_data(SIZE, [(BS, 5 * BS + 9)], seed=1)
    path, stats = full(tmp_path, "a.raw", data, [(BS, 5 * BS + 9)])
    assert open(path, "rb").read() == manifest2_pack.build(
        blkhash.block_digests(data), SIZE, generation=5, kind="full",
        domain_xml=XML, chunk_size=CHUNK, source="full",
        created="2026-01-02T00:00:00Z", **FULL_ONLY)
    h = header(path)
    assert (h.chain_started, h.complete) == ("2026-01-01T00:00:00Z", True)
    assert stats.kind == "full" and stats.digest.hex() == reference(data)
    # Blocks 1..4 are a hole: the zero digest, never read.
    assert (stats.blocks_zero, stats.blocks_hashed) == (4, 11 * 4 + 4 - 4)
    assert stats.bytes_read == SIZE - 4 * BS
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert os.listdir(tmp_path) == sorted(os.listdir(tmp_path)) and not [
        n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.mark.parametrize("dirty", [
    [(5, 1)],                                   # one byte, unaligned
    [(BS - 1, 2)],                              # across a block edge
    [(CHUNK - 10, 20), (CHUNK - 5, BS)],        # overlapping, across chunks
    [(3 * CHUNK, 2 * CHUNK + 1)],               # whole chunks and a byte
    [(SIZE - 1, 1)],                            # the very end
    [(SIZE - 800, 800), (0, 1)],                # the short last block
])
def test_same_size(tmp_path, dirty):
    old = random_data(SIZE, seed=1)
    stats = check(tmp_path, old, changed(old, *dirty), dirty)
    rehashed = plan.rehash(dirty, SIZE, SIZE, BS)
    assert stats.bytes_read == sum(r.length for r in rehashed)
    assert stats.blocks_copied + stats.blocks_hashed == -(-SIZE // BS)


def test_no_change_reads_only_the_short_last_block(tmp_path):
    old = random_data(SIZE, seed=1)
    stats = check(tmp_path, old, old, [])
    assert stats.bytes_read == 777 and stats.blocks_hashed == 1
    # The previous manifest: header, chunk table, every run once.
    runs = -(-SIZE // CHUNK)
    assert stats.manifest_bytes_read == 4096 + runs * 32 + \
        -(-SIZE // BS) * 32


def test_no_change_block_aligned_reads_nothing(tmp_path):
    old = random_data(6 * CHUNK, seed=1)
    stats = check(tmp_path, old, old, [(6 * CHUNK, 5), (7 * CHUNK, 0)])
    assert stats.bytes_read == 0


@pytest.mark.parametrize("new_size", [
    SIZE + 1, SIZE + BS, SIZE + 5 * CHUNK + 3, 20 * CHUNK,      # grew
    SIZE - 1, SIZE - 777, SIZE - 778, 3 * CHUNK + 1, BS, 5, 0,  # shrank
])
def test_size_changed(tmp_path, new_size):
    old = random_data(SIZE, seed=1)
    grown = random_data(max(SIZE, new_size), seed=2)
    new = changed(old[:new_size] + grown[SIZE:new_size], (2 * BS, 10))
    stats = check(tmp_path, old, new, [(2 * BS, 10)])
    tail = min(SIZE, new_size) // BS * BS
    assert stats.bytes_read == (BS if tail > 2 * BS else 0) + \
        new_size - tail


def test_dirty_range_that_became_zeros(tmp_path):
    old = random_data(SIZE, seed=1)
    zeroed = (3 * CHUNK + 5, 2 * BS + 100)
    new = bytearray(old)
    new[zeroed[0]:zeroed[0] + zeroed[1]] = bytes(zeroed[1])
    check(tmp_path, old, bytes(new), [zeroed])


def test_dirty_range_punched_into_a_hole(tmp_path):
    old = random_data(SIZE, seed=1)
    hole = (2 * CHUNK, 2 * CHUNK + 3 * BS)     # whole blocks: a real hole
    new = bytearray(old)
    new[hole[0]:hole[1]] = bytes(hole[1] - hole[0])
    stats = check(tmp_path, old, bytes(new), [(hole[0], hole[1] - hole[0])],
                  new_holes=[hole])
    assert (stats.blocks_zero, stats.bytes_read) == (3, 777)


def test_dirty_ranges_past_the_end_are_ignored(tmp_path):
    old = random_data(SIZE, seed=1)
    check(tmp_path, old, old[:SIZE - 2 * BS], [(SIZE - BS, 10 * CHUNK)])


@pytest.mark.parametrize("seed", range(12))
def test_random_changes(tmp_path, seed):
    rnd = random.Random(seed)
    old_size = rnd.randrange(0, 14 * CHUNK)
    new_size = max(0, old_size + rnd.randrange(-3 * CHUNK, 3 * CHUNK))
    old = random_data(old_size, seed=seed)
    new = bytearray(old[:new_size] + random_data(
        max(0, new_size - old_size), seed=seed + 100))
    dirty = []
    for _ in range(rnd.randrange(0, 8)):
        offset = rnd.randrange(0, max(1, new_size))
        length = rnd.choice([1, 7, 4096, BS, 3 * BS + 11, CHUNK])
        length = min(length, new_size - offset)
        if rnd.random() < 0.3:
            new[offset:offset + length] = bytes(length)
        else:
            new[offset:offset + length] = rnd.randbytes(length)
        dirty.append((offset, length))
    # Dirty may say more than changed, in any order.
    dirty += [(rnd.randrange(0, 20 * CHUNK), rnd.randrange(0, 3 * BS))
              for _ in range(rnd.randrange(0, 4))]
    rnd.shuffle(dirty)
    check(tmp_path, old, bytes(new), dirty)


# A previous manifest that cannot serve: one ManifestError line, and the
# target keeps what it held.

def refused(tmp_path, prev, words, **changes):
    target = tmp_path / "incr.m2"
    target.write_bytes(b"the incomplete manifest")
    new = random_data(SIZE, seed=1)
    with pytest.raises(ManifestError, match=words) as excinfo:
        incremental(tmp_path, prev, new, [(0, 1)], **changes)
    assert "\n" not in str(excinfo.value)
    assert target.read_bytes() == b"the incomplete manifest"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def previous(tmp_path):
    return full(tmp_path, "a.raw", random_data(SIZE, seed=1))[0]


@pytest.mark.parametrize("chunk", [1, 5, 11])
def test_damaged_run(tmp_path, chunk):
    prev = previous(tmp_path)
    h = header(prev)
    with open(prev, "r+b") as f:
        f.seek(h.run(chunk)[0] + 40)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    refused(tmp_path, prev, f"block digests of chunk {chunk} do not match")


@pytest.mark.parametrize("where,words", [
    (100, "header checksum"), (4096 + 3, "chunk table checksum")])
def test_damaged_header_or_chunk_table(tmp_path, where, words):
    prev = previous(tmp_path)
    with open(prev, "r+b") as f:
        f.seek(where)
        f.write(b"\xee")
    refused(tmp_path, prev, words)


def test_truncated(tmp_path):
    prev = previous(tmp_path)
    os.truncate(prev, header(prev).run(6)[0] + 5)
    refused(tmp_path, prev, "truncated")


def test_incomplete(tmp_path):
    prev = str(tmp_path / "prev.m2")
    manifest2_pack.write(prev, manifest2_pack.build(
        b"", SIZE, generation=1, chain_id="c", kind="full", domain_xml="",
        chunk_size=CHUNK, complete=False))
    refused(tmp_path, prev, "incomplete")


@pytest.mark.parametrize("changes", [
    dict(chunk_size=2 * CHUNK), dict(algorithm="sha512")])
def test_other_sizes_or_algorithm(tmp_path, changes):
    refused(tmp_path, previous(tmp_path), "previous manifest is of",
            **changes)


def test_version_1_previous(tmp_path):
    prev = tmp_path / "v1"
    prev.write_text('{"version": 1}')
    refused(tmp_path, str(prev), "not an nbdsnap manifest of version 2")


def test_chain_carries_over(tmp_path):
    prev = previous(tmp_path)
    path, _ = incremental(tmp_path, prev, random_data(SIZE, seed=1), [],
                          generation=6)
    h = header(path)
    assert (h.chain_id, h.chain_started, h.generation) == (
        "chain-9", "2026-01-01T00:00:00Z", 6)


def test_file_reader(tmp_path):
    path = tmp_path / "m"
    path.write_bytes(b"0123456789")
    with manifest2.FileReader(str(path)) as r:
        assert (r.name, r.pread(2, 3), r.pread(8, 5)) == (str(path), b"234",
                                                           b"89")
    with pytest.raises(ManifestError, match="cannot open manifest .*: No "
                       "such file"):
        manifest2.FileReader(str(tmp_path / "none"))


def test_a_hole_no_dirty_range_names_is_still_zeros(tmp_path):
    """A change the dirty ranges missed, where the image is now a hole: a
    live resize down and back up (QEMU truncates its bitmaps, it does not
    mark them), a hole punched behind QEMU's back.  A hole is known zeros
    without the previous manifest, so the incremental is still the full
    manifest, at no read."""
    old = random_data(SIZE, seed=1)
    hole = (5 * CHUNK + BS, 7 * CHUNK)       # whole blocks, across chunks
    new = bytearray(old)
    new[hole[0]:hole[1]] = bytes(hole[1] - hole[0])
    stats = check(tmp_path, old, bytes(new), [], new_holes=[hole])
    assert stats.blocks_zero == (hole[1] - hole[0]) // BS
    assert stats.bytes_read == 777            # the short last block


def test_scattered_reads_are_announced_ahead_within_the_window():
    from nbdsnap.verify import plan
    from nbdsnap.verify.manifest2_write import _prefetched

    class Hinted:
        def __init__(self):
            self.hints = []

        def will_need(self, offset, length):
            self.hints.append(offset)

    pieces = [plan.Piece(is_data=i % 3 != 0, offset=i * 1000, length=100)
              for i in range(30)]
    source = Hinted()
    seen = []
    for piece in _prefetched(pieces, source, window=250):
        if piece.is_data:
            # announced before it is read, and never more than the window
            # (plus the piece that crossed it) ahead
            assert piece.offset in source.hints
            ahead = [o for o in source.hints if o > piece.offset]
            assert sum(100 for _ in ahead) <= 250 + 100
        seen.append(piece)
    assert seen == pieces
    assert source.hints == [p.offset for p in pieces if p.is_data]


def test_a_source_without_hints_reads_as_before():
    from nbdsnap.verify import plan
    from nbdsnap.verify.manifest2_write import _prefetched
    pieces = [plan.Piece(True, 0, 10), plan.Piece(False, 10, 10)]
    assert list(_prefetched(pieces, object())) == pieces


def test_prefetch_streams_the_plan_instead_of_listing_it():
    # A 2 TiB disk with scattered dirty blocks plans millions of pieces:
    # the look-ahead holds only the window's, never the whole plan.
    from nbdsnap.verify import plan
    from nbdsnap.verify.manifest2_write import _prefetched

    class Hinted:
        def will_need(self, offset, length):
            pass

    pulled = []

    def pieces():
        for i in range(200000):
            pulled.append(i)
            yield plan.Piece(is_data=i % 2 == 0, offset=i * 100, length=100)

    out = _prefetched(pieces(), Hinted(), window=1000)
    first = next(out)
    assert first.offset == 0
    assert len(pulled) < 100


def test_prefetch_look_ahead_is_bounded_in_pieces_between_reads():
    # Long stretches of Keep and zero pieces count no bytes; the look-ahead
    # still stops after MAX_AHEAD of them.
    from nbdsnap.verify import plan
    from nbdsnap.verify import manifest2_write as m

    class Hinted:
        def will_need(self, offset, length):
            pass

    pulled = []

    def pieces():
        for i in range(10 * m.MAX_AHEAD):
            pulled.append(i)
            yield plan.Piece(is_data=False, offset=i * 100, length=100)

    out = m._prefetched(pieces(), Hinted(), window=1000)
    next(out)
    assert len(pulled) <= m.MAX_AHEAD + 1
    assert len(list(out)) == 10 * m.MAX_AHEAD - 1
