"""What an export serves: the disk's base file, as it is.

nbd-server serves the exported file, not the guest's view of it.  A raw
disk's copy is the disk; a qcow2 disk's copy is the qcow2 container; a
linked clone's (``top.qcow2`` on a template) names a backing file that a
clone host may not have, and is of no use there.  export, lint and
prerun's log say so, in served_as()'s words.
"""

import logging

from . import qemu_img
from .errors import Error, Unsupported

log = logging.getLogger(__name__)


def base_path(disk, is_ours):
    """The disk's base: its top, or below nbdsnap's overlay when frozen."""
    top = disk.top.path
    if not is_ours(top):
        return top
    if disk.chain and disk.chain[0].path:
        return disk.chain[0].path
    base, _ = qemu_img.backing(top)
    if not base:
        raise Unsupported("disk %s runs on overlay %s, which has no backing "
                          "file; run 'nbdsnap recover --all'" % (disk.target,
                                                                 top))
    return base


def served_image(disk, is_ours, info=qemu_img.info):
    """(format, backing file or None) of the file an export of disk serves.

    The domain XML says, when it lists the chain; info (qemu-img info)
    otherwise, not for raw, which has no backing file.  None: unknown.
    """
    layers = disk.layers[1:] if is_ours(disk.top.path) else disk.layers
    fmt = layers[0].format if layers else None
    if fmt == "raw" or info is None:
        return fmt, None
    if len(layers) > 1 and layers[1].path:
        return fmt, layers[1].path
    try:
        data = info(base_path(disk, is_ours))
    except Error as e:
        log.warning("disk %s: cannot tell its backing file: %s",
                    disk.target, e)
        return fmt, None
    return (fmt or data.get("format"),
            data.get("full-backing-filename") or data.get("backing-filename"))


def what_clients_copy(disk, is_ours):
    """served_as() of disk's export, asking qemu-img if the XML is mute."""
    return served_as(*served_image(disk, is_ours))


def served_as(fmt, backing):
    """What a client copies from an export of a file of format fmt with that
    backing file: nbd-server serves the file as it is, not the guest's view.
    """
    if backing:
        return ("the %s file itself, which names backing file %s: the copy "
                "holds only what differs from it and is of no use where "
                "that file is missing" % (fmt or "image", backing))
    if fmt == "raw":
        return "the raw disk"
    if fmt is None:
        return "the disk's file as it is (format unknown)"
    return ("the %s file itself, not the disk the guest sees: keep the copy "
            "as a %s file" % (fmt, fmt))
