"""A network namespace of the test's own, its loopback shaped to a real speed.

Loopback on one machine moves gigabytes a second, so a client that wastes
round trips or opens too few connections looks as good as one that does
not.  A VM host and a clone host talk over a link of about 1 Gbit/s: inside
a namespace of our own, with its loopback shaped by a token bucket
(`tc ... tbf`), nbd-server and a client see that speed, and nothing else
on the machine does (docs/DESIGN.md, "A link of a real speed")::

    host namespace                 nbdsnap-<pid>-<n>
    --------------                 ------------------------------------
    libvirtd (unix socket) <-----  nbd-server on 127.0.0.1:PORT
                                        ^  lo: tbf rate 1gbit
                                        v
                                   client (ip netns exec ...)

Only loopback exists inside: test traffic cannot reach any other address.
The namespace's lo counts every byte that crossed it (tx_bytes), which is
how a benchmark proves what a client put on the link.

Processes run inside through `ip netns exec`, which also remounts /sys for
the command so that /sys/class/net shows the namespace's devices.  Process
ids stay global (no pid namespace): a daemon started inside can be stopped
by its pid from outside.  Every command is an argument list, never a shell
string.
"""

import contextlib
import itertools
import os
import subprocess

_numbers = itertools.count(1)

PREFIX = "nbdsnap-"
TX_BYTES = "/sys/class/net/lo/statistics/tx_bytes"
# The token bucket: a burst of 512 KiB lets one TCP window through at full
# speed (as a NIC's queue would), 100 ms of queue before packets drop.
BURST = "512kb"
LATENCY = "100ms"


class NetnsError(RuntimeError):
    """An ip or tc command failed; the message is one line."""


def _run(argv, timeout=30):
    proc = subprocess.run(argv, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode:
        detail = " ".join(proc.stderr.split()) or "exit %d" % proc.returncode
        raise NetnsError("%s: %s" % (" ".join(argv), detail))
    return proc.stdout


class ShapedLink:
    """A named network namespace whose loopback runs at rate (None: unshaped).

        with ShapedLink("1gbit") as link:
            server = NbdServer(folder, exports, {}, wrap=link.argv([]))
            ...
            link.run(["nbdcopy", uri, "null:"])

    The name is unique to this process and call (nbdsnap-PID-N), so tests
    running side by side never share a namespace.  close() deletes it, also
    when the with block raised; stop what runs inside first (a process left
    inside keeps the namespace alive, nameless, until it exits).
    """

    def __init__(self, rate="1gbit"):
        self.rate = rate
        self.name = "%s%d-%d" % (PREFIX, os.getpid(), next(_numbers))
        self._created = False

    def open(self):
        _run(["ip", "netns", "add", self.name])
        self._created = True
        try:
            _run(["ip", "-n", self.name, "link", "set", "lo", "up"])
            if self.rate:
                # tc -n (iproute2 >= 4.x) applies inside the namespace
                # without a process of its own there.
                _run(["tc", "-n", self.name, "qdisc", "add", "dev", "lo",
                      "root", "tbf", "rate", self.rate, "burst", BURST,
                      "latency", LATENCY])
        except BaseException:
            self.close()
            raise
        return self

    def argv(self, cmd):
        """cmd (a list) as run inside the namespace."""
        return ["ip", "netns", "exec", self.name] + list(cmd)

    def popen(self, cmd, **kwargs):
        return subprocess.Popen(self.argv(cmd), **kwargs)

    def run(self, cmd, **kwargs):
        """subprocess.run inside the namespace; checked, 600 s at most,
        unless kwargs say otherwise."""
        kwargs.setdefault("check", True)
        kwargs.setdefault("timeout", 600)
        return subprocess.run(self.argv(cmd), **kwargs)

    def tx_bytes(self):
        """Bytes sent on the namespace's loopback so far (each byte on
        loopback is sent once and received once: this is the link's
        traffic, both directions)."""
        return int(_run(self.argv(["cat", TX_BYTES])).strip())

    def exists(self):
        return os.path.exists(os.path.join("/run/netns", self.name))

    def close(self):
        """Delete the namespace; a second close, or one after someone else
        deleted it, does nothing."""
        if not self._created:
            return
        self._created = False
        if self.exists():
            with contextlib.suppress(NetnsError):
                _run(["ip", "netns", "delete", self.name])
            if self.exists():
                raise NetnsError("ip netns delete %s: still there" % self.name)

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "<ShapedLink %s %s>" % (self.name, self.rate or "unshaped")
