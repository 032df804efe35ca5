"""Logging for commands that nbd-server runs with no terminal.

Every record goes to syslog (facility daemon, tagged ``prog[pid]``) and to
stderr as ``prog: message``.  nbd-server throws the hooks' output away, so
syslog is where an operator finds what a hook decided; when the syslog
socket is missing (no syslog daemon) the hooks go on with stderr alone.

The socket is the configuration's ``syslog_socket``, read here, before the
command reads its configuration: a configuration that cannot be read is
itself logged, to the default socket.
"""

import logging
import logging.handlers
import os
import sys

SYSLOG_SOCKET = "/dev/log"


class _QuietSyslogHandler(logging.handlers.SysLogHandler):
    # A syslog daemon that goes away must not turn a hook's decision into a
    # "--- Logging error ---" traceback on stderr: the stderr handler still
    # has the record.
    def handleError(self, record):
        pass


def setup(prog, verbose=False, stderr_level=logging.INFO):
    """Route the root logger to syslog and stderr for command ``prog``.

    The hooks show everything on stderr too (when run by hand); nbdsnap's
    own report goes to stdout, so it shows only warnings and errors there.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)

    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter(prog + ": %(message)s"))
    stderr.setLevel(logging.DEBUG if verbose else stderr_level)
    root.addHandler(stderr)

    try:
        syslog = _QuietSyslogHandler(
            address=configured_socket(),
            facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    except OSError:
        return
    syslog.ident = "%s[%d]: " % (prog, os.getpid())
    syslog.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(syslog)


def configured_socket():
    """The configuration's syslog_socket, or the default if it is unreadable
    (the command then reports why, and that report must reach syslog)."""
    from . import config
    from .errors import Error
    try:
        return config.load().syslog_socket
    except Error:
        return SYSLOG_SOCKET
