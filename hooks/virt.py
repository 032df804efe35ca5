"""The libvirt boundary: connect, find domains, snapshot, commit and pivot.

libvirt's own errors become VirtError here, with libvirt's message; no
libvirtError leaves this module.  libvirt's default error printer, which
would write to stderr behind our back, is silenced.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import libvirt

from . import domxml
from .errors import CommitFailed, VirtError

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"

RUNNING = "running"
PAUSED = "paused"
SHUTOFF = "shut off"
_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}

_loop_lock = threading.Lock()
_loop_started = False


def _ignore_errors(_ctx, _err):
    pass


def _start_event_loop():
    # The default event implementation must be registered before the
    # connection is opened, and something must run it: a daemon thread.
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run():
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events",
                         daemon=True).start()
        _loop_started = True


def uri():
    return os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


def connect():
    libvirt.registerErrorHandler(_ignore_errors, None)
    _start_event_loop()
    try:
        return libvirt.open(uri())
    except libvirt.libvirtError as e:
        raise VirtError("cannot connect to libvirt at %s: %s"
                        % (uri(), e.get_error_message()))


def _xml(dom):
    # For a running domain XMLDesc gives the live definition, with the
    # backing chain that QEMU actually uses.
    return domxml.parse(dom.XMLDesc(0))


def all_domains(conn):
    """[(virDomain, domxml.Domain)] for every defined or running domain."""
    try:
        doms = conn.listAllDomains(0)
    except libvirt.libvirtError as e:
        raise VirtError("cannot list domains: %s" % e.get_error_message())
    result = []
    for dom in doms:
        try:
            result.append((dom, _xml(dom)))
        except libvirt.libvirtError as e:
            # Undefined or stopped between the list and now: not ours.
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise VirtError("cannot read the XML of domain %s: %s"
                                % (dom.name(), e.get_error_message()))
    return result


def lookup(conn, name=None, uuid=None):
    """(virDomain, domxml.Domain) by UUID (else name); None if undefined."""
    try:
        dom = (conn.lookupByUUIDString(uuid) if uuid
               else conn.lookupByName(name))
        return dom, _xml(dom)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise VirtError("cannot look up domain %s: %s"
                        % (uuid or name, e.get_error_message()))


def reread(dom):
    try:
        return _xml(dom)
    except libvirt.libvirtError as e:
        raise VirtError("cannot read the XML of domain %s: %s"
                        % (dom.name(), e.get_error_message()))


def definition(dom):
    """The domain's inactive definition, without secrets (no
    VIR_DOMAIN_XML_SECURE): what a standby of it is defined from."""
    try:
        return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    except libvirt.libvirtError as e:
        raise VirtError("cannot read the definition of domain %s: %s"
                        % (dom.name(), e.get_error_message()))


def state(dom):
    try:
        return _STATES.get(dom.state()[0], "unknown")
    except libvirt.libvirtError as e:
        raise VirtError("cannot read the state of domain %s: %s"
                        % (dom.name(), e.get_error_message()))


def snapshot(dom, xml, quiesce):
    """An external, disk-only, atomic snapshot with no libvirt metadata."""
    flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
             | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
             | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
    if quiesce:
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
    try:
        dom.snapshotCreateXML(xml, flags)
    except libvirt.libvirtError as e:
        raise VirtError("snapshot of domain %s refused: %s"
                        % (dom.name(), e.get_error_message()))


# Not libvirt's: what _JobWatch records when waiting can no longer succeed.
LOST = "connection to libvirtd lost"
STOPPED = "domain stopped"


class _JobWatch:
    """Collects BLOCK_JOB_2 events of one disk, delivered by the event loop.

    A libvirtd that goes away or a domain that stops sends no job event:
    they end the wait too, instead of letting it run to commit_timeout.
    """

    def __init__(self, target):
        self.target = target
        self.cond = threading.Condition()
        self.events = []

    def _add(self, status):
        with self.cond:
            self.events.append(status)
            self.cond.notify_all()

    def __call__(self, _conn, _dom, disk, _type, status, _opaque):
        if disk == self.target:
            self._add(status)

    def closed(self, _conn, _reason, _opaque):
        self._add(LOST)

    def lifecycle(self, _conn, _dom, event, _detail, _opaque):
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            self._add(STOPPED)

    def wait(self, statuses, deadline):
        with self.cond:
            while not any(s in statuses for s in self.events):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return next(s for s in self.events if s in statuses)


_JOB_NAMES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "completed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "cancelled",
    libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "ready",
}


def commit(conn, dom, target, timeout):
    """Active block commit of target's overlay into its backing file, pivot.

    Shallow: the overlay goes into the image right below it (the exported
    file) and no further.  A plain active commit would merge a linked
    clone's top image into its shared template (docs/DESIGN.md).  The pivot
    waits for the READY event: polling the job's cur == end is not enough.  On
    failure or timeout the job is cancelled, which leaves the domain on the
    overlay with every write in it.
    """
    watch = _JobWatch(target)
    callbacks = []
    try:
        callbacks.append(conn.domainEventRegisterAny(
            dom, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, watch, None))
        callbacks.append(conn.domainEventRegisterAny(
            dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, watch.lifecycle,
            None))
        conn.registerCloseCallback(watch.closed, None)
    except libvirt.libvirtError as e:
        raise CommitFailed("cannot watch block jobs of %s: %s"
                           % (dom.name(), e.get_error_message()))
    try:
        _commit(dom, target, timeout, watch)
    finally:
        for cb in callbacks:
            try:
                conn.domainEventDeregisterAny(cb)
            except libvirt.libvirtError:
                pass
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass


def _commit(dom, target, timeout, watch):
    name = dom.name()
    flags = (libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
             | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW)
    started = time.monotonic()
    try:
        dom.blockCommit(target, None, None, 0, flags)
    except libvirt.libvirtError as e:
        raise CommitFailed("block commit of %s %s refused: %s"
                           % (name, target, e.get_error_message()))
    ends = (libvirt.VIR_DOMAIN_BLOCK_JOB_READY,
            libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED,
            libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED,
            libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED, LOST, STOPPED)
    status = watch.wait(ends, started + timeout)
    if status != libvirt.VIR_DOMAIN_BLOCK_JOB_READY:
        if status is None:
            _cancel(dom, target)
            raise CommitFailed("block commit of %s %s did not get ready in "
                               "%g s (commit_timeout); cancelled, the domain "
                               "stays on its overlay" % (name, target, timeout))
        if status in (LOST, STOPPED):
            raise CommitFailed("block commit of %s %s interrupted: %s; the "
                               "domain is still on its overlay"
                               % (name, target, status))
        raise CommitFailed("block commit of %s %s %s before it was ready"
                           % (name, target, _JOB_NAMES.get(status, status)))
    log.debug("commit of %s %s ready after %.3f s", name, target,
              time.monotonic() - started)
    try:
        # Synchronous: returns once QEMU has switched to the base.
        dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
    except libvirt.libvirtError as e:
        _cancel(dom, target)
        raise CommitFailed("pivot of %s %s failed: %s"
                           % (name, target, e.get_error_message()))


def _cancel(dom, target):
    try:
        dom.blockJobAbort(target, 0)
    except libvirt.libvirtError as e:
        log.warning("cannot cancel the block job of %s %s: %s",
                    dom.name(), target, e.get_error_message())


CANCEL_WAIT = 60


def cancel_job(dom, target, timeout=CANCEL_WAIT):
    """Cancel a block job left on target (by a killed commit), if any.

    Cancelling an active commit, even a ready one, leaves the domain on its
    overlay with every write in it; the commit can then start afresh.
    """
    try:
        if not dom.blockJobInfo(target, 0):
            return
        log.info("cancelling the block job left on %s %s", dom.name(), target)
        dom.blockJobAbort(target, 0)
        deadline = time.monotonic() + timeout
        while dom.blockJobInfo(target, 0):
            if time.monotonic() > deadline:
                raise CommitFailed("the block job left on %s %s did not go "
                                   "away in %d s" % (dom.name(), target,
                                                     timeout))
            time.sleep(0.1)
    except libvirt.libvirtError as e:
        raise VirtError("cannot cancel the block job of %s %s: %s"
                        % (dom.name(), target, e.get_error_message()))


def resume_if_io_paused(dom):
    """Resume a domain that paused on an I/O error, such as a full overlay.

    QEMU stops a guest whose write failed with ENOSPC and retries the write
    on resume: once the domain is back on its base, that write can land.
    A domain paused for any other reason is left paused.
    """
    try:
        state, reason = dom.state()
        if (state == libvirt.VIR_DOMAIN_PAUSED
                and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR):
            dom.resume()
            log.warning("domain %s had paused on an I/O error (a full "
                        "snapshot_dir?); resumed on its base", dom.name())
    except libvirt.libvirtError as e:
        log.warning("cannot resume domain %s: %s", dom.name(),
                    e.get_error_message())


def has_managed_save(dom):
    try:
        return bool(dom.hasManagedSaveImage(0))
    except libvirt.libvirtError as e:
        raise VirtError("cannot ask whether %s has a managed save image: %s"
                        % (dom.name(), e.get_error_message()))


def wait_no_job(dom, timeout, poll=0.5):
    """Wait until the domain has no libvirt job; False if it still has one.

    Measured on libvirt 9.0: while a snapshot runs, virDomainGetJobStats
    waits for the domain's job lock (the snapshot holds it, and lets no
    query in) and gives up after libvirt's own 30 s with
    VIR_ERR_OPERATION_TIMEOUT; once the snapshot has ended it answers
    VIR_DOMAIN_JOB_NONE.  A domain that does not run has no job.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if dom.jobStats(0).get("type") == libvirt.VIR_DOMAIN_JOB_NONE:
                return True
        except libvirt.libvirtError as e:
            code = e.get_error_code()
            if code in (libvirt.VIR_ERR_OPERATION_INVALID,
                        libvirt.VIR_ERR_NO_DOMAIN):
                return True
            if code != libvirt.VIR_ERR_OPERATION_TIMEOUT:
                raise VirtError("cannot ask domain %s for its job: %s"
                                % (dom.name(), e.get_error_message()))
        if time.monotonic() >= deadline:
            return False
        log.info("domain %s still has a libvirt job; waiting", dom.name())
        time.sleep(poll)
