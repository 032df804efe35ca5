"""The VM host's side of a pull, over NBD: a disk's export and its manifest.

    nbd://vmhost/vm1-vda            the export: the first connection
                                    freezes the disk (nbd-prerun)
    nbd://vmhost/vm1-vda.manifest   the freeze-time manifest beside it
                                    (digest = on, written by nbdsnap export)

Over TLS the query carries over: nbds://vmhost/vm1-vda?tls-certificates=D
has its manifest at nbds://vmhost/vm1-vda.manifest?tls-certificates=D.

The connections to the export (verify's sources.NbdSource, one per
worker of the transfer) are opened first and held for the whole pull: while one is open the freeze stays, and prerun writes an
incomplete manifest before it lets a client in, so a complete manifest
read then is this freeze's.  The manifest is read anew (a new
connection: nbd-server sizes a file at open) until it is complete.
Every connection ends with NBD_CMD_DISC (nbd.Client.close): one that
vanishes leaves the VM host's freeze to a stale-session recovery.
"""

from __future__ import annotations

import time

from nbdsnap.verify import manifest2, nbd, sources
from nbdsnap.verify.errors import ManifestError, NbdError, UnknownExport
from nbdsnap.verify.readers import SourceReader

POLL = 2.0
# Bytes of block digests read in one pipeline.
RUNS_AT_ONCE = 16 << 20


class NoManifest(Exception):
    """The VM host serves no manifest beside the export (configuration)."""


class Incomplete(Exception):
    """The manifest did not complete in time."""


def manifest_uri(uri: str) -> str:
    """The manifest export's URI: the export's name + ".manifest", the
    query (nbd+unix's socket=, TLS's tls-certificates=) kept."""
    head, sep, query = uri.partition("?")
    return head + ".manifest" + sep + query


def check_served(uri: str) -> None:
    """NoManifest, before any freeze, when the VM host serves no manifest
    export beside uri.  A manifest export that cannot be opened yet (no
    freeze has written its file) is found out later, by read_manifest."""
    try:
        nbd.Client(manifest_uri(uri)).close()
    except UnknownExport:
        raise _no_manifest(uri) from None
    except NbdError:
        pass


def _no_manifest(uri: str) -> NoManifest:
    return NoManifest(
        f"{uri}: the VM host serves no manifest beside this export "
        f"({manifest_uri(uri)}): set digest = on in its nbdsnap.conf and "
        f"write its sections again with nbdsnap export")


class _Reader(SourceReader):
    """pread() over a manifest export, counting the bytes it reads."""

    def __init__(self, client: nbd.Client):
        super().__init__(client)
        self.bytes_read = 0

    def pread(self, offset: int, length: int) -> bytes:
        self.bytes_read += length
        return super().pread(offset, length)


class _Fetched:
    """pread() of the parts read ahead (manifest2's reader interface)."""

    def __init__(self, name: str, parts: dict):
        self.name, self.parts = name, parts

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.parts[offset, length])


class Manifest:
    """The frozen base's manifest, complete and checked: its header, its
    chunk table, and its runs on demand."""

    def __init__(self, client: nbd.Client, reader: _Reader, header,
                 chunks: list):
        self.client, self.header, self.chunks = client, header, chunks
        self.reader = reader
        self.name = client.uri

    @property
    def bytes_read(self) -> int:
        """Of the manifest export, so far."""
        return self.reader.bytes_read

    def run(self, i: int) -> bytes:
        return manifest2.read_run(self.reader, self.header, self.chunks, i)

    def runs(self, indices):
        """(i, run) of each chunk index, in order, each checked; read up to
        RUNS_AT_ONCE bytes in one pipeline (read_many): a 1 TiB disk whose
        chunks all changed has 65536 runs, a round trip each otherwise."""
        h = self.header
        group, size = [], 0
        for i in list(indices) + [None]:
            length = h.run(i)[1] if i is not None else 0
            if group and (i is None or size + length > RUNS_AT_ONCE):
                parts = [h.run(j) for j in group]
                bufs = [bytearray(n) for _, n in parts]
                self.client.read_many(
                    [(o, b) for (o, _), b in zip(parts, bufs)])
                self.reader.bytes_read += sum(map(len, bufs))
                fetched = _Fetched(self.name, dict(zip(parts, bufs)))
                for j in group:
                    yield j, manifest2.read_run(fetched, h, self.chunks, j)
                group, size = [], 0
            if i is not None:
                group.append(i)
                size += length

    def domain_xml(self) -> str:
        return manifest2.read_domain_xml(self.reader, self.header)

    def close(self) -> None:
        self.client.close()


def read_manifest(export: sources.NbdSource, wait: float, say=None,
                  clock=time.monotonic, sleep=time.sleep) -> Manifest:
    """The export's manifest once complete; waits up to wait seconds,
    saying so once (say(line))."""
    uri = manifest_uri(export.name)
    deadline = clock() + wait
    told = False
    while True:
        try:
            client = nbd.Client(uri)
        except UnknownExport:
            raise _no_manifest(export.name) from None
        try:
            reader = _Reader(client)
            header = manifest2.read_header(reader)
            if header.complete:
                if header.size != export.size:
                    raise ManifestError(
                        f"{uri}: the manifest is of {header.size} bytes, "
                        f"the export has {export.size}: not this freeze's")
                chunks = manifest2.read_chunks(reader, header)
                return Manifest(client, reader, header, chunks)
        except BaseException:
            client.close()
            raise
        client.close()
        if clock() >= deadline:
            raise Incomplete(
                f"{uri}: the manifest is still incomplete after {wait:g} s "
                f"(the VM host's digest is still running); run again later, "
                f"or wait longer (--wait)")
        if say and not told:
            say(f"{uri}: the VM host's digest is still running; waiting up "
                f"to {wait:g} s")
            told = True
        sleep(min(POLL, max(0.0, deadline - clock())))
