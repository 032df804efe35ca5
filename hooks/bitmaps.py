"""QEMU dirty bitmaps over QMP: what changed in a base disk between freezes.

The one module that talks QMP about bitmaps (issue 10; the measured facts
are in docs/DESIGN.md, "Dirty bitmaps").  A bitmap lives on the base disk's
FILE node (driver file or host_device, named like ``libvirt-1-storage`` by
libvirt), never on its format node: only the file node's offsets are the
offsets nbd-server exports (for qcow2, the format node records guest
offsets).  Bitmaps are non-persistent, granularity 64 KiB: they die with
QEMU, which the caller must detect (the bitmap is missing, see names()).

At a freeze, after libvirt's snapshot and before the commit (the base takes
no guest write then), swap() adds the next recording bitmap and disables
the previous one in one QMP transaction; dirty() then reads the disabled
one's extents through QEMU's own NBD server::

    getfd (our listening socket)   nbd-server-start {"type":"fd"}
    blockdev-add  read-only file node on BASE (ours: nbdsnap-tmp-*)
    block-export-add  that node, bitmaps=[{node: FILE NODE, name}]
    NBD client: meta context qemu:dirty-bitmap:NAME, block status, bit 0
    block-export-del, nbd-server-stop, blockdev-del      (always)

Why a temporary node: a qcow2 disk's file node cannot be exported (the
format node above it holds the "resize" permission), and an export
through the format node cuts the map at the guest size.

Where QEMU's NBD server listens: on a socket that we (root) create, bind
in a 0700 folder of ours, listen on, and hand to QEMU with ``getfd``
(libvirt's virDomainQemuMonitorCommandWithFiles, libvirt >= 8.2).
Measured here (libvirt 9.0, QEMU 7.2): it works, and no path needs to be
reachable by the qemu user or allowed by AppArmor/DAC labels, so no
fallback to a socket path is built.  QEMU owns the fd once
nbd-server-start took it; a start that fails leaves it in the monitor,
and closefd drops it.

QEMU runs only one NBD server.  If one is already running (a libvirt
backup job, an operator), dirty() refuses with a BitmapError and never
stops it.  Two dirty() calls on one domain at once collide the same way:
the caller serialises them per domain.

libvirt marks a domain that was sent QMP as tainted: its log
(/var/log/libvirt/qemu/DOMAIN.log) says "Domain id=N is tainted:
custom-monitor" at the first command of every run of QEMU.  The domain runs
on unchanged; it is a note for whoever supports libvirt.
Every QMP or libvirt failure here is one BitmapError line naming the
command.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time

import libvirt
import libvirt_qemu

from .errors import BitmapError

log = logging.getLogger(__name__)

PREFIX = "nbdsnap-"
GRANULARITY = 65536
TMP_PREFIX = PREFIX + "tmp-"            # our temporary nodes and exports
FILE_DRIVERS = ("file", "host_device")
DIRTY = 1                               # qemu:dirty-bitmap flag: dirty
CONTEXT = "qemu:dirty-bitmap:"
# One block status request at most: below 4 GiB (32-bit length), aligned.
STATUS_STEP = (1 << 32) - GRANULARITY
NBD_TIMEOUT = 60.0
TEARDOWN_WAIT = 10.0


# -- pure ------------------------------------------------------------------

def swap_command(node, new, old=None):
    """The QMP transaction of swap(): add new (recording), disable old."""
    actions = [{"type": "block-dirty-bitmap-add",
                "data": {"node": node, "name": new,
                         "granularity": GRANULARITY, "persistent": False}}]
    if old is not None:
        actions.append({"type": "block-dirty-bitmap-disable",
                        "data": {"node": node, "name": old}})
    return {"actions": actions}


def find_file_node(nodes, matches):
    """The file node (name) of nodes (query-named-block-nodes, flat) whose
    filename satisfies matches(filename); None if none.  Our temporary
    nodes are not candidates; two candidates are an error, never a guess.
    """
    found = [n["node-name"] for n in nodes
             if n.get("drv") in FILE_DRIVERS
             and not n.get("node-name", "").startswith(PREFIX)
             and matches(n.get("file", ""))]
    if len(found) > 1:
        raise BitmapError("more than one file node is that disk: %s"
                          % ", ".join(found))
    return found[0] if found else None


def bitmaps_of(nodes, node):
    """The dirty-bitmaps entries of node, from query-named-block-nodes."""
    for n in nodes:
        if n.get("node-name") == node:
            return n.get("dirty-bitmaps") or []
    return None


def merge(ranges, size):
    """(offset, length) ranges sorted, merged where they touch or overlap,
    clipped to [0, size)::

        in    |--a--|  |--b--|--c--|      |--d--|     ...|--e--|--
        out   |--a--|  |-----bc----|      |--d--|     ...|--e|  size
    """
    out = []
    for offset, length in sorted(ranges):
        end = min(offset + length, size)
        offset = max(offset, 0)
        if end <= offset:
            continue
        if out and offset <= out[-1][0] + out[-1][1]:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][1], end - start))
        else:
            out.append((offset, end - offset))
    return out


def dirty_extents(status, offset):
    """The dirty (offset, length) ranges of one block status reply
    [(length, flags)] that starts at offset; and where it ends."""
    out = []
    for n, flags in status:
        if flags & DIRTY:
            out.append((offset, n))
        offset += n
    return out, offset


# -- QMP -------------------------------------------------------------------

def _qmp(dom, command, arguments=None, files=None):
    """The return value of one QMP command, or one BitmapError line."""
    message = {"execute": command}
    if arguments is not None:
        message["arguments"] = arguments
    text = json.dumps(message)
    try:
        if files:
            with_files = getattr(libvirt_qemu, "qemuMonitorCommandWithFiles",
                                 None)
            if with_files is None:
                raise BitmapError(
                    "QMP %s: libvirt-python cannot pass a file descriptor "
                    "(qemuMonitorCommandWithFiles needs libvirt 8.2 or "
                    "later)" % command)
            reply, _ = with_files(dom, text, files, 0)
        else:
            reply = libvirt_qemu.qemuMonitorCommand(dom, text, 0)
    except libvirt.libvirtError as e:
        raise BitmapError("QMP %s on domain %s: %s"
                          % (command, _name(dom), e.get_error_message()))
    try:
        reply = json.loads(reply)
    except ValueError:
        raise BitmapError("QMP %s on domain %s: unreadable reply %.80r"
                          % (command, _name(dom), reply))
    if "error" in reply:
        raise BitmapError("QMP %s on domain %s: %s"
                          % (command, _name(dom),
                             reply["error"].get("desc", reply["error"])))
    return reply.get("return")


def _name(dom):
    try:
        return dom.name()
    except libvirt.libvirtError:
        return "?"


def _nodes(dom):
    return _qmp(dom, "query-named-block-nodes", {"flat": True})


def _same_disk(path):
    """matches(filename) for find_file_node: the same path, or the same
    file or device by identity (a symlink, /dev/mapper/vg-lv vs /dev/dm-3).
    """
    from .sessions import disk_key

    def key(p):
        try:
            return disk_key(os.stat(p))
        except OSError:
            return None
    want = key(path)
    return lambda name: name == path or (
        want is not None and name.startswith("/") and key(name) == want)


# -- the API ---------------------------------------------------------------

def file_node(dom, path):
    """The name of the file node whose file is path (the base disk's), or
    None: never one of our temporary nodes, never an overlay's."""
    return find_file_node(_nodes(dom), _same_disk(path))


def names(dom, node):
    """The names of the bitmaps on node; BitmapError if there is no node."""
    return list(states(dom, node))


def states(dom, node):
    """{name: recording} of the bitmaps on node; BitmapError if there is
    no node.  A chain continues only from a bitmap still recording: one
    that was disabled stopped seeing writes."""
    return _states(dom, _nodes(dom), node)


def find(dom, path):
    """(the file node of path or None, {name: recording} of its bitmaps),
    from one listing of QEMU's nodes: what a freeze asks first."""
    nodes = _nodes(dom)
    node = find_file_node(nodes, _same_disk(path))
    return node, ({} if node is None else _states(dom, nodes, node))


def _states(dom, nodes, node):
    found = bitmaps_of(nodes, node)
    if found is None:
        raise BitmapError("domain %s has no block node %s"
                          % (_name(dom), node))
    return {b["name"]: bool(b.get("recording")) for b in found}


def swap(dom, node, new, old=None):
    """Add bitmap new (recording) on node and, with old, disable old, in
    one QMP transaction: if either fails, neither happened."""
    _qmp(dom, "transaction", swap_command(node, new, old))
    log.debug("domain %s node %s: bitmap %s added%s", _name(dom), node, new,
              ", %s disabled" % old if old else "")


def remove(dom, node, name):
    """Remove bitmap name from node; a missing bitmap is not an error."""
    try:
        _qmp(dom, "block-dirty-bitmap-remove", {"node": node, "name": name})
    except BitmapError:
        if name in names(dom, node):
            raise


def remove_ours(dom, keep=()):
    """Remove every bitmap named PREFIX* on any node, except those in keep;
    the names removed.  For recover and a failed freeze."""
    removed = []
    for n in _nodes(dom):
        for b in n.get("dirty-bitmaps") or []:
            name = b["name"]
            if name.startswith(PREFIX) and name not in keep:
                remove(dom, n["node-name"], name)
                removed.append(name)
    return removed


def remove_leftovers(dom):
    """Remove the temporary exports and nodes a dirty() that was killed
    left in QEMU, and then QEMU's NBD server if it served only ours; the
    names removed.  For recover, with no dirty() running on the domain (it
    would lose its export).  A server ours left with no export yet cannot
    be told from someone else's idle one: it stays (dirty() then refuses).
    """
    exports = [e for e in _qmp(dom, "query-block-exports")
               if e.get("type") == "nbd"]
    ours = [e["id"] for e in exports if e["id"].startswith(TMP_PREFIX)]
    tmp_nodes = [n["node-name"] for n in _nodes(dom)
                 if n["node-name"].startswith(TMP_PREFIX)]
    for tmp in ours:
        _qmp(dom, "block-export-del", {"id": tmp, "mode": "hard"})
    if ours and len(ours) == len(exports):
        _qmp(dom, "nbd-server-stop")
    for tmp in tmp_nodes:
        _delete_node(dom, tmp)
    return sorted(set(ours) | set(tmp_nodes))


def dirty(dom, path, node, name, size):
    """The dirty (offset, length) ranges of the disabled bitmap name on
    node, merged, in order, clipped to size; path is node's file."""
    nodes = _nodes(dom)
    bitmap = next((b for b in bitmaps_of(nodes, node) or []
                   if b["name"] == name), None)
    if bitmap is None:
        raise BitmapError("domain %s has no bitmap %s on node %s"
                          % (_name(dom), name, node))
    if bitmap.get("recording"):
        raise BitmapError("bitmap %s of domain %s is still recording: "
                          "disable it (swap) before reading it"
                          % (name, _name(dom)))
    driver = next(n["drv"] for n in nodes if n["node-name"] == node)
    if driver not in FILE_DRIVERS:
        raise BitmapError("node %s of domain %s is a %s node, not a file "
                          "node" % (node, _name(dom), driver))
    tmp = TMP_PREFIX + secrets.token_hex(4)
    folder = tempfile.mkdtemp(prefix="nbdsnap-bitmap-")
    try:
        sock_path = os.path.join(folder, "nbd.sock")
        _start_server(dom, sock_path, tmp)
        try:
            ranges = _read(dom, path, node, name, size, tmp, sock_path,
                           driver)
        except BaseException:
            try:
                _stop_server(dom, tmp)
            except BitmapError as e:
                # The first failure is the one to report.
                log.warning("%s", e)
            raise
        _stop_server(dom, tmp)
        return ranges
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _start_server(dom, sock_path, fdname):
    """QEMU's NBD server, listening on our socket (fd passing)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(sock_path)
        sock.listen(4)
        _qmp(dom, "getfd", {"fdname": fdname}, files=[sock.fileno()])
        try:
            _qmp(dom, "nbd-server-start",
                 {"addr": {"type": "fd", "data": {"str": fdname}}})
        except BitmapError as e:
            with contextlib.suppress(BitmapError):
                _qmp(dom, "closefd", {"fdname": fdname})
            if "already running" in str(e):
                raise BitmapError(
                    "domain %s: QEMU's NBD server is already running "
                    "(a libvirt backup job, or another reader): cannot "
                    "read a dirty bitmap now" % _name(dom)) from None
            raise
    # QEMU holds the listening socket now; ours is closed.


def _read(dom, path, node, name, size, tmp, sock_path, driver):
    from nbdsnap.verify import nbd
    from nbdsnap.verify.errors import Error as VerifyError
    _qmp(dom, "blockdev-add", {"driver": driver, "filename": path,
                               "node-name": tmp, "read-only": True,
                               "locking": "off"})
    _qmp(dom, "block-export-add", {
        "type": "nbd", "id": tmp, "node-name": tmp, "name": tmp,
        "writable": False, "bitmaps": [{"node": node, "name": name}]})
    uri = "nbd+unix:///%s?socket=%s" % (tmp, sock_path)
    ranges = []
    try:
        with nbd.Client(uri, NBD_TIMEOUT, meta_context=CONTEXT + name) as c:
            if not c.has_block_status:
                raise BitmapError("domain %s: QEMU's NBD server does not "
                                  "offer %s%s" % (_name(dom), CONTEXT, name))
            end = min(size, c.size)
            pos = 0
            while pos < end:
                status = c.block_status(pos, min(STATUS_STEP, end - pos))
                found, pos = dirty_extents(status, pos)
                ranges.extend(found)
    except VerifyError as e:
        raise BitmapError("reading bitmap %s of domain %s: %s"
                          % (name, _name(dom), e)) from None
    return merge(ranges, size)


def _stop_server(dom, tmp):
    """Remove our export, our server and our node, each tried whatever
    the others did; one BitmapError naming what is left, if anything."""
    failures = []
    for command, arguments in (
            ("block-export-del", {"id": tmp, "mode": "hard"}),
            ("nbd-server-stop", None)):
        try:
            _qmp(dom, command, arguments)
        except BitmapError as e:
            if "not found" not in str(e).lower():
                failures.append(str(e))
    try:
        _delete_node(dom, tmp)
    except BitmapError as e:
        failures.append(str(e))
    if failures:
        raise BitmapError("; ".join(failures))


def _delete_node(dom, tmp):
    """blockdev-del of our node, if it is there.  An export goes
    asynchronously, and its node is in use until it has (measured: gone at
    the first try after nbd-server-stop; the wait is a safeguard)."""
    deadline = time.monotonic() + TEARDOWN_WAIT
    while True:
        try:
            if bitmaps_of(_nodes(dom), tmp) is None:
                return
            _qmp(dom, "blockdev-del", {"node-name": tmp})
            return
        except BitmapError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
