"""nbd-verify: prove that a copy equals the frozen base.

Argument parsing, output and exit statuses only; the work is in ops.
"""

from __future__ import annotations

import argparse
import sys

from . import blkhash, ops, sources
from .errors import ERROR, Error

PROG = "nbd-verify"
EQUAL, DIFFER = 0, 1
MAX_RANGES = 20

SOURCE_HELP = """\
A SOURCE or COPY is a regular file or a block device (NBD URIs are not
supported yet)."""

MAIN_EPILOG = f"""\
{SOURCE_HELP}

exit status:
  0  digests printed / images equal
  1  images differ (compare)
  2  error: bad arguments, unreadable source, size mismatch, ...
"""

DIGEST_EPILOG = f"""\
Prints one line per SOURCE, "<hex digest>  SOURCE", like sha256sum. The
digest is blkhash: 64 KiB blocks hashed one by one, then their digests and
the image size hashed together; holes and zero blocks are not hashed again.

{SOURCE_HELP}

exit status:
  0  every digest printed
  2  some SOURCE could not be read (the others are still printed), or the
     algorithm is not available
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


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error, exit status 2."""

    def error(self, message):
        print(f"{PROG}: {message} (see '{self.prog} --help')",
              file=sys.stderr)
        sys.exit(ERROR)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


_count.__name__ = "count"   # argparse says "invalid count value: '-1'"


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
    p_digest.add_argument("sources", nargs="+", metavar="SOURCE")

    p_compare = commands.add_parser(
        "compare", formatter_class=fmt, epilog=COMPARE_EPILOG,
        help="compare COPY with SOURCE byte for byte",
        description="Compare COPY with SOURCE byte for byte.")
    p_compare.add_argument(
        "--max-ranges", type=_count, default=MAX_RANGES, metavar="N",
        help="print at most N differing ranges, then how many more "
             "(0: all; default: %(default)s)")
    p_compare.add_argument("source", metavar="SOURCE")
    p_compare.add_argument("copy", metavar="COPY")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "digest":
            return digest(args.sources, args.algorithm)
        return compare(args.source, args.copy, args.max_ranges)
    except Error as e:
        _error(e)
        return e.status


def digest(names: list[str], algorithm: str) -> int:
    # Refuse a bad algorithm once, not once per source.
    blkhash.Hasher(algorithm)
    status = 0
    for name in names:
        try:
            with sources.open_source(name) as src:
                hexdigest = ops.checksum(src, algorithm)
        except Error as e:
            # Like sha256sum: report it, go on with the others, fail at the end.
            _error(e)
            status = max(status, e.status)
            continue
        print(f"{hexdigest}  {name}", flush=True)
    return status


def compare(source_name: str, copy_name: str, max_ranges: int) -> int:
    with sources.open_source(source_name) as src, \
            sources.open_source(copy_name) as copy:
        count = total = 0
        for r in ops.compare(src, copy):
            count += 1
            total += r.length
            if not max_ranges or count <= max_ranges:
                print(f"differ: offset {r.offset} length {r.length}",
                      flush=True)
    if not count:
        return EQUAL
    if max_ranges and count > max_ranges:
        print(f"differ: {count - max_ranges} more ranges not shown")
    print(f"{copy_name} differs from {source_name}: {count} ranges, "
          f"{total} bytes")
    return DIFFER


def _error(e: Error) -> None:
    print(f"{PROG}: {e}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
