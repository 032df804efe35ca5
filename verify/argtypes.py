"""What the command lines of nbd-verify and nbd-pull share: argument types
that say what they want, and usage errors in one line.

argparse names a type in its message ("invalid seconds value: 'nan'"),
so each type carries the name a user reads.
"""

from __future__ import annotations

import argparse
import math
import sys

USAGE = 2       # the exit status of a usage error, as for every error


def parser_class(prog: str):
    """An ArgumentParser whose usage errors are one line, status 2."""

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            print(f"{prog}: {message} (see '{self.prog} --help')",
                  file=sys.stderr)
            sys.exit(USAGE)

    return Parser


def count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def seconds(text: str) -> float:
    """A duration: finite and not negative (nan would wait for ever)."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


count.__name__ = "count"
positive.__name__ = "positive count"
seconds.__name__ = "seconds"
