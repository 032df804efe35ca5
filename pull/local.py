"""Manifests on the clone host: COPY's record, a pull's target, a scan.

All three are version 2 manifests (verify/manifest2.py), read with the
same checked functions as the VM host's: a record damaged on disk is a
ManifestError, never a wrong block.  Digests(offset, length) gives the
block digests of any block-aligned range, one checked run at a time.
"""

from __future__ import annotations

import datetime
import os

from nbdsnap.verify import blkhash, manifest2, manifest2_write, sources
from nbdsnap.verify.readers import FileReader


class Local(manifest2.Runs):
    """A complete local manifest, open: header, chunks, and its block
    digests by chunk (run) or by image range (digests)."""

    def __init__(self, path: str):
        self.path = path
        reader = FileReader(path)
        try:
            header = manifest2.read_header(reader)
            if not header.complete:
                raise manifest2.ManifestError(f"{path}: incomplete")
            chunks = manifest2.read_chunks(reader, header)
        except BaseException:
            reader.close()
            raise
        super().__init__(reader, header, chunks)

    def close(self) -> None:
        self.reader.close()


def digest_of(path: str):
    """The header digest of the complete manifest at path, or None (no
    file, damaged, incomplete)."""
    try:
        with FileReader(path) as reader:
            header = manifest2.read_header(reader)
    except (OSError, manifest2.ManifestError):
        return None
    return header.digest if header.complete else None


def zeros_digest(algorithm: str, block_size: int, size: int) -> bytes:
    """The digest of an image of size bytes, all zeros."""
    hasher = blkhash.Hasher(algorithm, block_size)
    hasher.zero(size)
    return hasher.digest()


def scan(path: str, out: str, like, threads: int) -> manifest2.Header:
    """Read COPY at path and write its manifest to out, with like's
    algorithm, block and chunk size (like: the source's header)."""
    with sources.FileSource(path) as source:
        manifest2_write.write_full(
            out, source, generation=0, chain_id="", chain_started="",
            domain_xml="", source_name=path, created=now(),
            algorithm=like.algorithm, block_size=like.block_size,
            chunk_size=like.chunk_size, threads=threads)
    os.chmod(out, 0o600)
    with FileReader(out) as reader:
        return manifest2.read_header(reader)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
