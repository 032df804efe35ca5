"""nbdsnap lint: do the sections of a group of disks agree?

nbdsnap export writes, for several disks of a domain, one section each
whose prerun names them all, in each: ``--domain D --disk vda --group
vda,vdb``.  The first connection to any of them freezes them all at one
instant, and a connection to any of them holds them all (nbd-prerun(8)).
A hand edit can break that in ways nbd-prerun meets only when a client
connects: a --group that nbd-prerun refuses outright, a disk whose own
section freezes it alone or with other disks (then a connection to one
section is refused while the other's freeze lasts), or a disk that no
section serves, so that no client can copy it.

Pure: a section's prerun comes in as a Prerun, a domain as domxml's.
"""

from __future__ import annotations

import dataclasses
import shlex

from . import domxml, locate

REFUSED = "nbd-prerun refuses every connection"


@dataclasses.dataclass
class Prerun:
    """What a section's nbd-prerun is told: its options, as written."""
    section: str
    domain: str | None
    disk: str | None
    group: str | None           # --group's value; None: no --group

    def members(self):
        """The disks of --group, each once, in order."""
        return list(dict.fromkeys(
            t for t in (self.group or "").split(",") if t))

    def grouped(self):
        """Does it freeze other disks with its own (a --group it takes)?"""
        return own(self) is None and len(self.members()) > 1


def own(prerun):
    """What nbd-prerun refuses in a prerun's --group itself, or None."""
    if prerun.group is None:
        return None
    if not (prerun.domain and prerun.disk):
        return "prerun has --group but not --domain and --disk: " + REFUSED
    if prerun.disk not in prerun.members():
        return ("prerun's --group %s does not name its --disk %s: %s"
                % (shlex.quote(prerun.group), prerun.disk, REFUSED))
    return None


def check(preruns):
    """[(section, finding)]: each prerun's own --group, then the sections
    of each disk its --group names."""
    out = [(p.section, own(p)) for p in preruns if own(p)]
    for p in filter(Prerun.grouped, preruns):
        out += [(p.section, f) for disk in p.members() if disk != p.disk
                for f in _member(p, disk, preruns)]
    return out


def _member(p, disk, preruns):
    """Findings on disk, named in p's --group, from its own sections."""
    mine = set(p.members())
    theirs = [q for q in preruns if q.disk == disk and q.domain == p.domain]
    if not theirs:
        # Another domain's section of the same shape is taken for one with
        # a mistyped domain only when it is the one section of its domain.
        other = [q for q in preruns if q.disk == disk and q.group is not None
                 and set(q.members()) == mine
                 and all(r is q or r.domain != q.domain for r in preruns)]
        searching = [q.section for q in preruns if q.disk is None]
        if other:
            return ["disk %s of its --group is served by section %s, whose "
                    "prerun names domain %s, not %s: no section serves %s's "
                    "%s" % (disk, q.section, q.domain, p.domain, p.domain,
                            disk) for q in other]
        if searching:
            return ["no section names disk %s of domain %s with --domain "
                    "and --disk, which its --group freezes with %s; if %s "
                    "serves it, found by search, it freezes %s alone and "
                    "this section is refused while that lasts"
                    % (disk, p.domain, p.disk, " or ".join(searching),
                       disk)]
        return ["no section serves disk %s of domain %s, which its --group "
                "freezes with %s: no client can copy it"
                % (disk, p.domain, p.disk)]
    out = []
    for q in theirs:
        if q.group is None:
            out.append("section %s serves disk %s of domain %s without "
                       "--group: a connection to it can freeze %s alone, "
                       "and this section is then refused until that freeze "
                       "ends" % (q.section, disk, p.domain, disk))
        elif own(q) is None and set(q.members()) != mine:
            out.append("section %s serves disk %s of domain %s with --group "
                       "%s, not %s: while one of the two freezes lasts, a "
                       "connection to the other can be refused"
                       % (q.section, disk, p.domain, q.group, p.group))
    return out


def unknown_disks(prerun, domain):
    """Findings on the disks of prerun's --group that domain (its
    --domain, a domxml.Domain) does not have, or has as nbd-prerun cannot
    freeze them."""
    if prerun is None or not prerun.grouped():
        return []
    out = []
    for target in prerun.members():
        if target == prerun.disk:
            continue            # the section's own, checked as --disk
        disk = domxml.find_disk(domain, target)
        if disk is None:
            out.append("prerun's --group names disk %s, which domain %s "
                       "does not have: %s" % (target, domain.name, REFUSED))
        elif locate.why_not(disk):
            out.append("prerun's --group names disk %s of domain %s (%s): "
                       "%s" % (target, domain.name, locate.why_not(disk),
                               REFUSED))
    return out
