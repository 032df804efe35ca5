"""The guest agent, for quiesced freezes that must never leave a guest frozen.

A quiesced snapshot asks qemu-guest-agent to freeze the guest's
filesystems, then to thaw them.  Measured with a stopped (SIGSTOP) agent:
libvirt waits for it without end by default; with a response timeout it
gives up, but the freeze command stays queued, and once the agent runs
again it freezes the guest, with nothing left to thaw it.  So:

- a time-limited guest-ping first: an agent that does not answer is not
  asked to freeze anything (quiesce = require refuses, try falls back);
- the snapshot itself runs under the domain's agent response timeout
  (quiesce_timeout), which is set back to libvirt's default afterwards;
- a guest already frozen (by its owner, on purpose) is not asked again
  and not watched: that freeze is its owner's to thaw;
- whenever a freeze may still be pending in the guest, a detached watcher
  waits (bounded) for the agent to answer, and thaws the guest if it finds
  it frozen at that first answer: the agent runs commands in order, so by
  then the freeze we queued has run, and a freeze made later is left
  alone.  Its pid and start time go into the session (nbdsnap status).
  It is not stopped when the session ends: a freeze queued in a stopped
  agent runs whenever the agent does, session or not.

Run as ``python -I -m nbdsnap.hooks.agent UUID SECONDS`` (the watcher).
"""

import json
import logging
import subprocess
import sys
import time

import libvirt
import libvirt_qemu

from . import procs, virt
from .errors import Error, VirtError

log = logging.getLogger(__name__)

WATCH_SECONDS = 600
WATCH_POLL = 2
CHANNEL = "org.qemu.guest_agent.0"      # the virtio-serial port's name


class NoChannel(VirtError):
    """The domain has no guest agent channel: no agent can ever answer."""


def command(dom, execute, timeout):
    """An agent command's return value, or None if the agent did not answer."""
    try:
        return _call(dom, execute, timeout)
    except libvirt.libvirtError as e:
        log.debug("agent %s on %s: %s", execute, dom.name(),
                  e.get_error_message())
        return None


def _call(dom, execute, timeout):
    out = libvirt_qemu.qemuAgentCommand(
        dom, json.dumps({"execute": execute}), int(max(1, timeout)), 0)
    return json.loads(out).get("return")


def answers(dom, timeout):
    """Whether the agent answers a guest-ping within timeout."""
    return silence(dom, timeout) is None


def silence(dom, timeout):
    """None when the agent answers a guest-ping within timeout, else why
    not, in libvirt's words ("not connected" comes at once: no agent
    runs in the guest; "not responding" after timeout).

    A domain with no agent channel raises NoChannel: libvirt says so at
    once (measured, libvirt 9: VIR_ERR_ARGUMENT_UNSUPPORTED, "QEMU guest
    agent is not configured"), and "did not answer in 10 s" after a
    moment would send the operator looking for a hung agent.
    """
    try:
        _call(dom, "guest-ping", timeout)
        return None
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED:
            raise NoChannel("domain %s has no guest agent channel (%s): "
                            "nothing can quiesce its filesystems"
                            % (dom.name(), CHANNEL))
        log.debug("agent guest-ping on %s: %s", dom.name(),
                  e.get_error_message())
        # Never None: that would read as an answer.
        return e.get_error_message() or str(e) or "no reason given"


class ResponseTimeout:
    """The domain's agent response timeout, for the snapshot's duration."""

    def __init__(self, dom, seconds):
        self.dom = dom
        self.seconds = int(max(1, seconds))

    def __enter__(self):
        try:
            self.dom.agentSetResponseTimeout(self.seconds, 0)
        except libvirt.libvirtError as e:
            log.warning("cannot bound the agent's response time on %s: %s",
                        self.dom.name(), e.get_error_message())
        return self

    def __exit__(self, *exc):
        try:
            self.dom.agentSetResponseTimeout(
                libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT, 0)
        except libvirt.libvirtError as e:
            log.warning("cannot restore the agent's response time on %s: %s",
                        self.dom.name(), e.get_error_message())


def frozen(dom, timeout):
    """True if the agent says the guest's filesystems are frozen now."""
    return command(dom, "guest-fsfreeze-status", timeout) == "frozen"


def thaw_if_frozen(dom, timeout):
    """Thaw the guest if its agent says it is frozen; return its state."""
    status = command(dom, "guest-fsfreeze-status", timeout)
    if status == "frozen":
        command(dom, "guest-fsfreeze-thaw", timeout)
        log.warning("domain %s: the guest was left frozen by a quiesce that "
                    "timed out; thawed it", dom.name())
        status = command(dom, "guest-fsfreeze-status", timeout)
    return status


def start_watcher(dom, seconds=WATCH_SECONDS):
    """Detach a watcher that thaws the guest once its agent answers.

    Returns its procs.Holder (None if it is already gone).
    """
    # -I and cwd /: see digest.start.
    proc = subprocess.Popen(
        [sys.executable, "-I", "-m", "nbdsnap.hooks.agent",
         dom.UUIDString(), str(seconds)],
        cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    log.warning("domain %s: a freeze may still be queued in the guest "
                "agent; watching it for up to %d s to thaw the guest",
                dom.name(), seconds)
    return procs.holder_of(proc.pid)


def watch(uuid, seconds):
    deadline = time.monotonic() + seconds
    conn = None
    try:
        while time.monotonic() < deadline:
            if conn is None:
                try:
                    conn = virt.connect()
                except Error as e:      # libvirtd restarting: try again
                    log.warning("%s", e)
                    time.sleep(WATCH_POLL)
                    continue
            try:
                found = virt.lookup(conn, uuid=uuid)
            except Error as e:
                log.warning("%s", e)
                conn.close()
                conn = None
                continue
            if found is None or virt.state(found[0]) not in (virt.RUNNING,
                                                             virt.PAUSED):
                return 0            # no guest, nothing frozen
            dom = found[0]
            try:
                answering = answers(dom, WATCH_POLL)
            except NoChannel:       # redefined without one: nothing queued
                return 0
            if answering:
                # The agent runs again: whatever it had queued is done.
                status = thaw_if_frozen(dom, 10)
                log.info("domain %s: agent answers again, filesystems %s",
                         dom.name(), status)
                return 0 if status == "thawed" else 1
            time.sleep(WATCH_POLL)
        log.error("domain %s: the agent did not answer for %d s; check the "
                  "guest with 'virsh domfsfreeze/domfsthaw'", uuid, seconds)
        return 1
    finally:
        if conn is not None:
            conn.close()


def main(argv=None):
    from . import log as log_mod
    argv = sys.argv[1:] if argv is None else argv
    log_mod.setup("nbdsnap-agent-watch")
    return watch(argv[0], float(argv[1]))


if __name__ == "__main__":
    sys.exit(main())
