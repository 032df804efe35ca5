"""qemu-img, one function per subcommand used.

Exit codes become errors with qemu-img's own message.
"""

import json
import subprocess
import time

from .errors import Error

TIMEOUT = 3600
INFO_WAIT = 60


class QemuImgError(Error):
    pass


def _run(args, timeout=TIMEOUT):
    cmd = ["qemu-img"] + args
    try:
        return subprocess.run(cmd, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise QemuImgError("qemu-img is not installed (%s)" % cmd[0])
    except subprocess.TimeoutExpired:
        raise QemuImgError("qemu-img %s took more than %g s; stopped"
                           % (args[0], timeout))


def _last_line(text):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1] if lines else "no message"


def info(path):
    """qemu-img info of the image itself (not its chain), as a dict.

    -U (force share): the image may be open in a running QEMU.
    """
    p = _run(["info", "-U", "--output=json", path], timeout=INFO_WAIT)
    if p.returncode != 0:
        raise QemuImgError("qemu-img info %s: %s" % (path, _last_line(p.stderr)))
    return json.loads(p.stdout)


LOCK_WAIT = 30


def backing(path):
    """(path, format) of the image's backing file; (None, None) if none."""
    data = info(path)
    name = data.get("full-backing-filename") or data.get("backing-filename")
    return name, data.get("backing-filename-format")


def commit(path, timeout, lock_wait=LOCK_WAIT):
    """Merge the overlay at path into its backing file, and no further.

    A QEMU that was just destroyed can hold its image locks a moment
    longer than libvirt says it runs: a lock refusal is tried again, for
    lock_wait seconds at most.  One run that outlasts timeout (the
    caller's commit_timeout) is killed and waited for (subprocess.run does
    both), so that no qemu-img goes on writing into the base once its
    caller has given up and let go of the disk's lock.

    A commit killed half-way is safe to run again: qemu-img copies the
    overlay's clusters into the base and empties the overlay only after
    the copy, so the overlay still holds every write and the base got
    some of them, the same bytes; a kill while it empties the overlay
    leaves clusters that fall through to the base, which has them.  Nobody
    writes the base meanwhile (the disk's lock is held, the domain cannot
    start while its session lasts), so the next commit ends in the same
    base.
    """
    deadline = time.monotonic() + lock_wait
    while True:
        p = _run(["commit", "-q", "-f", "qcow2", path], timeout=timeout)
        if p.returncode == 0:
            return
        locked = "lock" in p.stderr
        if not locked or time.monotonic() > deadline:
            raise QemuImgError("qemu-img commit %s: %s"
                               % (path, _last_line(p.stderr)))
        time.sleep(0.5)


def same_content(overlay, base, base_format):
    """True if the overlay's guest view equals the base: it adds nothing.

    qemu-img compare exits 0 identical, 1 different, 2 error.
    """
    p = _run(["compare", "-U", "-q", "-f", "qcow2", "-F", base_format,
              overlay, base])
    if p.returncode in (0, 1):
        return p.returncode == 0
    raise QemuImgError("qemu-img compare %s %s: %s"
                       % (overlay, base, _last_line(p.stderr)))
