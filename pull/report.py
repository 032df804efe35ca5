"""What nbd-pull's user sees: the one line of a completed pull, the
progress line on a terminal, and where the lines go (stderr; syslog as
well for cron; the journal alone for a systemd unit)."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

from . import run


class QuietSyslog(logging.handlers.SysLogHandler):
    # No syslog daemon (or one that went away) must not print a
    # "--- Logging error ---" traceback: stderr has the line already.
    def handleError(self, record):
        pass



def summary(r: run.Result) -> str:
    return (f"{r.copy}: equal to {r.source} ({r.kind}, digest "
            f"{r.digest[:16]}), {mib(r.bytes_read)} read, "
            f"{r.blocks_changed} of {r.blocks_total} blocks changed "
            f"({r.blocks_fetched} fetched, {r.blocks_zero} zero, "
            f"{r.blocks_reused} reused), {r.seconds:.1f} s"
            + (f"; read the copy again: {r.why_scan}" if r.why_scan else ""))


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class Progress:
    """One line, rewritten: bytes fetched of those to fetch, rate, ETA."""

    def __init__(self, copy: str, clock=None):
        import time
        self.copy, self.clock = copy, clock or time.monotonic
        self.start = self.clock()
        self.total = None

    def __call__(self, done: int, total: int = None) -> None:
        if total is not None:
            self.total = total
        seconds = max(self.clock() - self.start, 1e-6)
        rate = done / seconds
        text = f"{self.copy}: {mib(done)}"
        if self.total:
            left = (self.total - done) / rate if rate else 0
            text += (f" of {mib(self.total)} "
                     f"({100 * done / self.total:.0f}%), ETA {left:.0f} s")
        print(f"\r{text}, {rate / (1 << 20):.1f} MiB/s\033[K", end="",
              file=sys.stderr, flush=True)

    def end(self) -> None:
        print(file=sys.stderr, flush=True)


def journal(stream) -> bool:
    """Is stream systemd's journal (a unit's stderr)?  Then it has every
    line already, with the unit's name: syslog would record each twice."""
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"


def setup_logging(log, socket_path: str) -> None:
    """log's lines on stderr; to syslog too when no terminal sees them
    (cron), unless stderr is the journal (a unit).  The verify package's
    warnings (tls-verify-peer=false, no certificate folder) go the same
    ways."""
    verify_log = logging.getLogger("nbdsnap.verify")
    handlers = [logging.StreamHandler(sys.stderr)]
    handlers[0].setFormatter(logging.Formatter(log.name + ": %(message)s"))
    if not sys.stderr.isatty() and not journal(sys.stderr):
        try:
            handler = QuietSyslog(
                address=socket_path,
                facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            handler.ident = f"{log.name}[{os.getpid()}]: "
            handler.setFormatter(logging.Formatter("%(message)s"))
            handlers.append(handler)
        except OSError:
            pass
    for logger in (log, verify_log):
        logger.handlers.clear()
        logger.propagate = False
        logger.setLevel(logging.INFO if logger is log else logging.WARNING)
        for handler in handlers:
            logger.addHandler(handler)
