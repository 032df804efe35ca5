"""Local manifests: the block digests of any range of a target."""

import os
from typing import NamedTuple

import pytest

from nbdsnap.pull import local

BLOCK = 64 << 10


class Like(NamedTuple):
    algorithm: str = "sha256"
    block_size: int = BLOCK
    chunk_size: int = 1 << 20


@pytest.fixture
def manifest(tmp_path):
    """The manifest of a 2 MiB + 1000 byte image: 3 chunks, 34 blocks,
    the last one short."""
    image = str(tmp_path / "image")
    with open(image, "wb") as f:
        f.write(os.urandom((2 << 20) + 1000))
    out = str(tmp_path / "m")
    local.scan(image, out, Like(), 1)
    m = local.Local(out)
    yield m
    m.close()


def test_digests_across_chunks(manifest):
    md = manifest.header.digest_size
    whole = manifest.digests(0, manifest.header.size)
    assert len(whole) == 33 * md
    assert manifest.digests(15 * BLOCK, 3 * BLOCK) == whole[15 * md:18 * md]


@pytest.mark.timeout(10)
def test_a_range_past_the_end_stops_at_the_end(manifest):
    # A killed run's journal may hold blocks past a source that shrank
    # since: they have no digest, and asking must not loop for ever.
    md, size = manifest.header.digest_size, manifest.header.size
    whole = manifest.digests(0, size)
    assert manifest.digests(size - 1000, 2 * BLOCK) == whole[-md:]
    assert manifest.digests(4 << 20, BLOCK) == b""
    assert manifest.digests(2 << 20, 4 * BLOCK) == whole[-md:]
