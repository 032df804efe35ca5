"""Which domain and disk an export is, by identity, not by name.

The export path nbd-server gives us may be a symlink or another node of the
same device (/dev/vg/lv, /dev/mapper/vg-lv and /dev/dm-3 are one disk), so
paths are compared by what they are: device number for block devices,
device and inode for files.  The logic here is pure; the caller passes
``key_of(path)`` (a stat) and ``is_ours(path)`` (an nbdsnap overlay?).
"""

from __future__ import annotations

import dataclasses
import os

from . import domxml, sessions
from .errors import Ambiguous, NotFound, Unsupported

# How a disk relates to the export.
TOP = "top"          # the disk's active image is the export: freeze it
FROZEN = "frozen"    # the disk runs on our overlay, whose backing is the export
FOREIGN = "foreign"  # the export is deeper in a chain whose top is not ours

KINDS = ("file", "block")   # the disk types that have a local path


@dataclasses.dataclass(frozen=True)
class Match:
    domain: domxml.Domain
    disk: domxml.Disk
    how: str

    def __str__(self):
        return "%s:%s" % (self.domain.name, self.disk.target)


def key_of(path):
    """The identity key of a local path, or None if there is nothing there.

    Only absence means "no key": any other failure (permission, I/O) is
    reported, not read as "this is not the disk".
    """
    try:
        return sessions.disk_key(os.stat(path))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise NotFound("cannot stat %s: %s" % (path, e.strerror))


def relation(disk, key, key_of, is_ours):
    """How disk relates to the disk identified by key, or None."""
    layers = disk.layers
    for depth, layer in enumerate(layers):
        if layer.path is None or key_of(layer.path) != key:
            continue
        if depth == 0:
            return TOP
        if depth == 1 and is_ours(layers[0].path):
            return FROZEN
        return FOREIGN
    return None


def matches(domains, key, key_of, is_ours):
    """Every (domain, disk) whose chain holds the disk identified by key."""
    found = []
    for dom in domains:
        for disk in dom.disks:
            how = relation(disk, key, key_of, is_ours)
            if how is not None:
                found.append(Match(dom, disk, how))
    return found


def choose(found, export, searched):
    """The one match that can be frozen, or a clear refusal."""
    if not found:
        raise NotFound("%s is no disk of any libvirt domain (searched %d "
                       "domains); check the export's path, or pass "
                       "--domain and --disk" % (export, searched))
    if len(found) > 1:
        raise Ambiguous("%s is a disk of more than one domain or target (%s): "
                        "a shareable disk cannot be frozen for one of them"
                        % (export, ", ".join(map(str, found))))
    return check(found[0], export)


def check(match, export):
    disk = match.disk
    if disk.device != "disk":
        raise Unsupported("%s is the %s %s of domain %s: only disks can be "
                          "frozen" % (export, disk.device, disk.target,
                                      match.domain.name))
    if disk.shareable:
        raise Unsupported("%s is a shareable disk (%s): another domain may "
                          "write it, so freezing one domain cannot freeze it"
                          % (export, match))
    if disk.readonly:
        raise Unsupported("%s is a read-only disk of %s: nothing writes it, "
                          "export it without the hooks" % (export, match))
    if match.how == FOREIGN:
        raise Unsupported(
            "%s is a backing file of %s, whose top is %s, an overlay that "
            "nbdsnap did not make; commit or remove it first"
            % (export, match, disk.top.path or disk.top.type))
    return match


def why_not(disk):
    """Why a disk cannot be frozen, as a phrase, or None: check()'s rules
    before there is an export (nbdsnap export, lint's --group)."""
    if disk.device != "disk":
        return "a %s" % disk.device
    if disk.top.type not in KINDS or not disk.top.path:
        return "a %s disk, not a local file or block device" % disk.top.type
    if disk.readonly:
        return "read-only: nothing writes it, export it without the hooks"
    if disk.shareable:
        return "shareable: another domain may write it"
    return None


def check_named(domain, target, export, key, key_of, is_ours):
    """--domain/--disk skip the search but must still name the export."""
    disk = domxml.find_disk(domain, target)
    if disk is None:
        raise NotFound("domain %s has no disk %s" % (domain.name, target))
    if disk.top.path is None:
        raise Unsupported("disk %s of domain %s is a %s disk, not a local "
                          "file or block device" % (target, domain.name,
                                                    disk.top.type))
    how = relation(disk, key, key_of, is_ours)
    if how is None:
        raise NotFound("%s is not disk %s of domain %s (its source is %s)"
                       % (export, target, domain.name, disk.top.path))
    return check(Match(domain, disk, how), export)
