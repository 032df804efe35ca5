"""nbd-verify: prove that a copy equals the frozen base.

Argument parsing, output and exit statuses only; the work is in ops.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
import traceback
import uuid

from . import (argtypes, blkhash, manifest, manifest2, manifest2_write, ops,
               sources)
from .errors import ERROR, Error

PROG = "nbd-verify"
EQUAL, DIFFER = 0, 1
MAX_RANGES = 20

SOURCE_HELP = """\
A SOURCE or COPY is a regular file, a block device, or an NBD export:
nbd://HOST[:PORT]/EXPORT (port 10809 by default) or
nbd+unix:///EXPORT?socket=PATH; over TLS, in libnbd's form,
nbds://HOST[:PORT]/EXPORT?tls-certificates=DIR (DIR holding ca-cert.pem,
client-cert.pem and client-key.pem) or
nbds+unix:///EXPORT?socket=PATH&tls-certificates=DIR."""

MAIN_EPILOG = f"""\
{SOURCE_HELP}

exit status:
  0  digests printed / images equal
  1  images differ (compare, check)
  2  error: bad arguments, unreadable source, size mismatch, bad manifest...
     or an internal error (a bug: NBD_VERIFY_DEBUG=1 shows its traceback)
"""

DIGEST_EPILOG = f"""\
Prints one line per SOURCE, "<hex digest>  SOURCE", like sha256sum. The
digest is blkhash: 64 KiB blocks hashed one by one, then their digests and
the image size hashed together; holes and zero blocks are not hashed again.
With --manifest, also writes the digest and the digest of every chunk to
FILE, for "nbd-verify check FILE COPY" (see nbd-verify(1) for the format);
with --manifest-version 2, also the digest of every 64 KiB block.

{SOURCE_HELP}

exit status:
  0  every digest printed
  2  some SOURCE could not be read (the others are still printed), the
     algorithm is not available, or the manifest cannot be written
"""

COMPARE_EPILOG = f"""\
Compares the bytes of COPY with SOURCE. When they differ, prints the
differing ranges, in 64 KiB blocks, merged, one per line:
"differ: offset OFFSET length LENGTH".

{SOURCE_HELP}

exit status:
  0  the images are equal
  1  the images differ
  2  error: a source cannot be read, or the sizes differ
"""

CHECK_EPILOG = f"""\
Checks COPY against MANIFEST, written by "nbd-verify digest --manifest"
(format version 1 or 2).
When they differ, prints the differing ranges, in whole manifest chunks,
merged, one per line: "differ: offset OFFSET length LENGTH". MANIFEST is a
file or an NBD export serving one.

{SOURCE_HELP}

exit status:
  0  the copy matches the manifest
  1  the copy differs
  2  error: COPY cannot be read, its size differs, or MANIFEST cannot be
     read, is damaged, incomplete or not a manifest
"""


_Parser = argtypes.parser_class(PROG)
_count, _positive, _seconds = argtypes.count, argtypes.positive, \
    argtypes.seconds

_SIZE = re.compile(r"(\d+)([KMG]?)(?:I?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _chunk_size(text: str) -> int:
    """A size like 16M, 1GiB or 65536: a positive multiple of 64 KiB."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(text)
    value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0 or value % blkhash.BLOCK_SIZE:
        raise ValueError(text)
    return value


_chunk_size.__name__ = "chunk size (a multiple of 64K)"


def _add_speed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=_positive, metavar="N",
        help="read and hash with N threads (default: one per CPU, or one "
             "per NBD connection if more)")
    parser.add_argument(
        "--connections", type=_positive, metavar="N",
        default=sources.DEFAULT_CONNECTIONS,
        help="open up to N connections to an NBD export that allows "
             "several (default: %(default)s)")


def _add_max_ranges(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-ranges", type=_count, default=MAX_RANGES, metavar="N",
        help="print at most N differing ranges, then how many more "
             "(0: all; default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG, formatter_class=fmt, epilog=MAIN_EPILOG,
        description="Prove that a copy of a disk image equals its source.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    p_digest = commands.add_parser(
        "digest", formatter_class=fmt, epilog=DIGEST_EPILOG,
        help="print the blkhash digest of each SOURCE",
        description="Print the blkhash digest of each SOURCE.")
    p_digest.add_argument(
        "-a", "--algorithm", default=blkhash.DEFAULT_ALGORITHM,
        help="hash algorithm: any hashlib name of fixed size, or blake3 if "
             "the blake3 module is installed (default: %(default)s)")
    p_digest.add_argument(
        "--manifest", metavar="FILE",
        help="also write a manifest of the (single) SOURCE to FILE")
    p_digest.add_argument(
        "--chunk-size", type=_chunk_size,
        default=manifest.DEFAULT_CHUNK_SIZE, metavar="SIZE",
        help="with --manifest: one digest per SIZE bytes, a multiple of "
             "64K (default: 16M)")
    p_digest.add_argument(
        "--manifest-version", type=int, choices=(1, 2), default=1,
        metavar="V",
        help="with --manifest: write format version V, 1 (JSON) or 2 "
             "(binary, every block's digest too; default: %(default)s)")
    _add_speed_options(p_digest)
    p_digest.add_argument("sources", nargs="+", metavar="SOURCE")

    p_compare = commands.add_parser(
        "compare", formatter_class=fmt, epilog=COMPARE_EPILOG,
        help="compare COPY with SOURCE byte for byte",
        description="Compare COPY with SOURCE byte for byte.")
    _add_max_ranges(p_compare)
    _add_speed_options(p_compare)
    p_compare.add_argument("source", metavar="SOURCE")
    p_compare.add_argument("copy", metavar="COPY")

    p_check = commands.add_parser(
        "check", formatter_class=fmt, epilog=CHECK_EPILOG,
        help="check COPY against a manifest of its source",
        description="Check COPY against MANIFEST, written by "
                    "'nbd-verify digest --manifest'.")
    _add_max_ranges(p_check)
    _add_speed_options(p_check)
    p_check.add_argument(
        "--wait", type=_seconds, default=0, metavar="SECONDS",
        help="wait up to SECONDS for an incomplete manifest (a freeze-time "
             "digest still running) to complete, reading it again every "
             "few seconds (default 0: refuse it at once)")
    p_check.add_argument("manifest", metavar="MANIFEST")
    p_check.add_argument("copy", metavar="COPY")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The package's warnings (tls-verify-peer=false, no certificate
    # folder) as nbd-verify's lines.
    warn = logging.getLogger("nbdsnap.verify")
    if not warn.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(PROG + ": %(message)s"))
        warn.addHandler(handler)
        warn.propagate = False
    try:
        if args.command == "digest":
            if args.manifest and len(args.sources) != 1:
                parser.error("--manifest takes exactly one SOURCE")
            return digest(args.sources, args.algorithm, args.manifest,
                          args.chunk_size, args.threads, args.connections,
                          args.manifest_version)
        if args.command == "compare":
            return compare(args.source, args.copy, args.max_ranges,
                           args.threads, args.connections)
        return check(args.manifest, args.copy, args.max_ranges,
                     args.threads, args.connections, args.wait)
    except Error as e:
        _error(e)
        return e.status
    except BrokenPipeError:
        # Whoever reads our output left early (| head): not a bug.  Point
        # stdout at /dev/null, or the interpreter's last flush fails again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"{PROG}: output closed early (broken pipe)", file=sys.stderr)
        return ERROR
    except Exception as e:  # noqa: BLE001 -- a bug must not read "differ"
        _bug(e)
        return ERROR


def digest(names: list, algorithm: str, manifest_path=None,
           chunk_size: int = manifest.DEFAULT_CHUNK_SIZE, threads=None,
           connections=None, manifest_version: int = 1) -> int:
    # Refuse a bad algorithm once, not once per source.
    blkhash.Hasher(algorithm)
    status = 0
    for name in names:
        try:
            with sources.open_source(name, connections) as src:
                if manifest_path and manifest_version == 2:
                    hexdigest = _digest_v2(src, manifest_path, algorithm,
                                           chunk_size, threads)
                elif manifest_path:
                    m = ops.make_manifest(src, algorithm, chunk_size,
                                          threads=threads)
                    manifest.write(manifest_path, m)
                    hexdigest = m.digest
                else:
                    hexdigest = ops.checksum(src, algorithm, threads=threads)
        except Error as e:
            # Like sha256sum: report it, go on with the others, fail at the end.
            _error(e)
            status = max(status, e.status)
            continue
        print(f"{hexdigest}  {name}", flush=True)
    return status


def _digest_v2(src, path: str, algorithm: str, chunk_size: int,
               threads) -> str:
    """Write a version 2 manifest of src to path, return its digest.

    Made by hand, it starts a chain of its own: generation 1, full, a new
    random chain id, no domain definition.
    """
    created = manifest.now()
    stats = manifest2_write.write_full(
        path, src, generation=1, chain_id=uuid.uuid4().hex,
        chain_started=created, domain_xml="", source_name=src.name,
        created=created, algorithm=algorithm, chunk_size=chunk_size,
        threads=threads or ops.default_threads(src))
    return stats.digest.hex()


def compare(source_name: str, copy_name: str, max_ranges: int,
            threads=None, connections=None) -> int:
    with sources.open_source(source_name, connections) as src, \
            sources.open_source(copy_name, connections) as copy:
        ranges = ops.compare(src, copy, threads=threads)
        return _report(ranges, max_ranges, copy_name, source_name)


WAIT_POLL = 2.0


def check(manifest_name: str, copy_name: str, max_ranges: int,
          threads=None, connections=None, wait: float = 0) -> int:
    m = _complete_manifest(manifest_name, wait)
    with sources.open_source(copy_name, connections) as copy:
        ranges = ops.check(m, copy, threads=threads)
    return _report(ranges, max_ranges, copy_name, manifest_name)


def _complete_manifest(name: str, wait: float):
    """The manifest at name, read again (a new connection for nbd://, the
    file anew) until it is complete or wait seconds have passed."""
    deadline = time.monotonic() + wait
    announced = False
    while True:
        with sources.open_source(name, 1) as src:
            m = manifest2.read(src)
        if m.complete or time.monotonic() >= deadline:
            return m        # check refuses one still incomplete
        if not announced:
            print(f"{PROG}: {name}: the digest is still running; waiting up "
                  f"to {wait:g} s", file=sys.stderr, flush=True)
            announced = True
        time.sleep(min(WAIT_POLL, max(0.0, deadline - time.monotonic())))


def _report(ranges, max_ranges: int, copy_name: str, reference: str) -> int:
    count = total = 0
    for r in ranges:
        count += 1
        total += r.length
        if not max_ranges or count <= max_ranges:
            print(f"differ: offset {r.offset} length {r.length}", flush=True)
    if not count:
        return EQUAL
    if max_ranges and count > max_ranges:
        print(f"differ: {count - max_ranges} more ranges not shown")
    print(f"{copy_name} differs from {reference}: {count} ranges, "
          f"{total} bytes")
    return DIFFER


def _error(e: Error) -> None:
    print(f"{PROG}: {e}", file=sys.stderr, flush=True)


DEBUG_ENV = "NBD_VERIFY_DEBUG"


def _bug(e: Exception) -> None:
    """A bug: one line, exit status 2 (1 would say "the images differ");
    the traceback only when DEBUG_ENV asks for it."""
    what = " ".join(f"{type(e).__name__}: {e}".split())
    print(f"{PROG}: internal error, please report it: {what}",
          file=sys.stderr, flush=True)
    if os.environ.get(DEBUG_ENV, "0") != "0":
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
