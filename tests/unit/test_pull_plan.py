"""What a pull fetches: fixed cases of the pure plan."""

from nbdsnap.pull import plan
from nbdsnap.verify import blkhash, manifest2_pack, manifest2
from nbdsnap.verify.readers import BytesReader

BS = 64 * 1024
CHUNK = 4 * BS


def header_of(image: bytes):
    data = manifest2_pack.build(
        blkhash.block_digests(image), len(image), generation=1,
        chain_id="c", kind="full", source="t",
        domain_xml="", chunk_size=CHUNK)
    reader = BytesReader(data)
    h = manifest2.read_header(reader)
    chunks = manifest2.read_chunks(reader, h)
    runs = [manifest2.read_run(reader, h, chunks, i)
            for i in range(len(chunks))]
    return h, chunks, runs


def block(byte):
    return bytes([byte]) * BS


def test_only_differing_chunks_are_read():
    old = block(1) * 4 + block(2) * 4 + block(3) * 2
    new = block(1) * 4 + block(2) * 3 + block(9) + block(3) * 2
    _, a, _ = header_of(old)
    _, b, _ = header_of(new)
    assert plan.differing_chunks(b, a) == [1]
    assert plan.differing_chunks(b, None) == [0, 1, 2]
    assert plan.differing_chunks(b, a[:1]) == [1, 2]     # COPY's ends early


def test_changed_blocks_are_fetched_zeros_never():
    old = block(1) * 4
    new = block(1) + block(7) + bytes(BS) + block(1)
    h, _, new_runs = header_of(new)
    _, _, old_runs = header_of(old)
    b = plan.blocks(h, 0, new_runs[0], old_runs[0])
    assert b.fetch == [1] and b.zero == [2] and b.same == 2


def test_unknown_copy_fetches_all_data_and_zeroes_the_rest():
    new = bytes(BS) + block(5) + bytes(BS) + block(6) + block(7) + b"x" * 100
    h, _, runs = header_of(new)
    first = plan.blocks(h, 0, runs[0], None)
    assert first.fetch == [1, 3] and first.zero == [0, 2] and first.same == 0
    # The short last block: data is fetched at its length.
    last = plan.blocks(h, 1, runs[1], None)
    assert last.fetch == [4, 5]
    assert plan.block_lengths(last.fetch, BS, len(new)) == BS + 100


def test_a_short_last_block_of_zeros_is_zeroed_not_fetched():
    new = block(5) + bytes(100)
    h, _, runs = header_of(new)
    b = plan.blocks(h, 0, runs[0], None)
    assert b.fetch == [0] and b.zero == [1]


def test_a_grown_disk_compares_what_both_have():
    old = block(1) * 2 + b"y" * 10         # the last block was short
    new = block(1) * 2 + b"y" * 10 + bytes(BS - 10) + block(4)
    h, _, new_runs = header_of(new)
    _, _, old_runs = header_of(old)
    b = plan.blocks(h, 0, new_runs[0], old_runs[0])
    assert b.same == 2 and b.fetch == [2, 3] and b.zero == []


def test_ranges_merge_touching_blocks_up_to_a_limit():
    size = 10 * BS - 5
    assert plan.ranges([0, 1, 2, 5, 9], BS, size, 2 * BS) == [
        (0, 2 * BS), (2 * BS, BS), (5 * BS, BS), (9 * BS, BS - 5)]
    assert plan.ranges([], BS, size, BS) == []
