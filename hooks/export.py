"""nbdsnap export: the nbd-server sections that serve a domain's disks.

One section per disk::

    [dom1-vda]
        exportname = /dev/vg0/dom1
        readonly = true
        authfile = /etc/nbd-server/conf.d/dom1-vda.allow
        prerun = /opt/nbdsnap/bin/nbd-prerun --domain dom1 --disk vda %s
        postrun = /opt/nbdsnap/bin/nbd-postrun %s

nbd-server runs a hook string through printf (``%s`` becomes the export's
path, unquoted) and then ``/bin/sh -c``: every literal part is shell-quoted
and its ``%`` doubled, and an exportname the shell would split or
interpret is refused.  ``--domain/--disk`` spare prerun its search of every
domain's XML, which costs time and waits on other domains' jobs.
With several disks, every section's prerun also gets ``--group vda,vdb``,
the same list of all of them in each: the first connection to any of them
freezes them all at one instant, so that a database on vdb and its log on
vda are copied as they were together (--separate: one freeze per disk).
--tls adds ``force_tls = true`` to every section, the manifest's too:
nbd-server then serves them only to a client that negotiated TLS, and it
runs prerun only after the handshake, so a client without a certificate
of [generic]'s cacertfile never freezes the domain.  Without --tls export
warns, as it does without --allow: the disk crosses the network in plain
text, and whoever reaches the port may freeze the domain.

With -o, a file (FILE or its authfile) that holds already what export
would write is left untouched, and export prints one line a file, ``wrote
FILE`` or ``unchanged FILE``: a rerun by a configuration tool changes
nothing and says so.

The authfile (--allow) is written with the sections, first, and only so:
printed sections would name an authfile that nothing writes, and
nbd-server lets every address in when an export's authfile is missing.
nbd-server serves the disk's file as it is: a qcow2 disk is copied as the
qcow2 file, with the path of its backing file if it has one; a comment
above the section and a warning say so.
"""

import ipaddress
import logging
import os
import shlex
import shutil
import stat
import sys
import textwrap

from nbdsnap.verify.files import write_atomic

from . import domxml, locate, nbd_config, virt
from .served import base_path, served_as, served_image
from .errors import ConfigError, Error, NotFound, Unsupported

log = logging.getLogger(__name__)

MARK = "# Written by nbdsnap export"


def allow_address(text):
    """An --allow value as nbd-server's authfile takes it: a numeric
    address or address/prefix; ValueError otherwise."""
    text = text.strip()
    ipaddress.ip_network(text, strict=False)
    return text


def bin_dir(argv0=None):
    """The folder of the running nbdsnap entry point, symlinks resolved."""
    argv0 = argv0 or sys.argv[0]
    found = argv0 if os.sep in argv0 else shutil.which(argv0)
    folder = os.path.dirname(os.path.realpath(found or argv0))
    for name in ("nbd-prerun", "nbd-postrun"):
        if not os.access(os.path.join(folder, name), os.X_OK):
            raise NotFound("%s is not installed next to nbdsnap in %s"
                           % (name, folder))
    return folder


def choose(domain, targets, is_ours):
    """[(target, base path)] of the disks to export, or a clear refusal."""
    if targets:
        chosen = []
        # --disk vda --disk vda: one section, not two of one name.
        for target in dict.fromkeys(targets):
            disk = domxml.find_disk(domain, target)
            if disk is None:
                raise NotFound("domain %s has no disk %s" % (domain.name,
                                                             target))
            why = locate.why_not(disk)
            if why:
                raise Unsupported("disk %s of domain %s is %s"
                                  % (target, domain.name, why))
            chosen.append(disk)
    else:
        chosen = [d for d in domain.disks if not locate.why_not(d)]
        if not chosen:
            raise Unsupported("domain %s has no disk to export (%s)" % (
                domain.name, "; ".join("%s: %s" % (d.target, locate.why_not(d))
                                       for d in domain.disks) or "no disks"))
    return [(d.target, _checked(base_path(d, is_ours))) for d in chosen]


def _checked(path):
    if not nbd_config.shell_safe(path):
        bad = sorted({c for c in path if not nbd_config.shell_safe(c)})
        raise Unsupported(
            "%s holds %s: nbd-server puts the path into the hook's shell "
            "command unquoted; give it a plain name (a symlink will do, the "
            "hooks match disks by identity)" % (path, " ".join(map(repr, bad))))
    return path


def notes_of(domain, disks, is_ours):
    """{target: what a client copies} for the disks that are not raw."""
    notes = {}
    for target, _ in disks:
        fmt, backing = served_image(domxml.find_disk(domain, target), is_ours)
        if fmt != "raw":
            notes[target] = served_as(fmt, backing)
    return notes


def _q(word):
    return nbd_config.printf_escape(shlex.quote(word))


def manifest_section(domain, target, section, manifest_dir, authfile,
                     tls=False):
    """The read-only export of a disk's freeze-time manifest (digest = on),
    no hooks: ``nbd-verify check nbd://HOST/SECTION.manifest COPY``."""
    path = os.path.join(manifest_dir, "%s-%s.manifest"
                        % (domain.replace("/", "_"), target))
    items = [("exportname", nbd_config.printf_escape(path)),
             ("readonly", True)]
    if authfile:
        items.append(("authfile", authfile))
    if tls:
        items.append(("force_tls", True))
    return (section + ".manifest",
            nbd_config.format_section(section + ".manifest", items))


def together(disks, separate=False):
    """The targets that every section's prerun freezes at one instant
    (--group): all of disks when there are several, none with separate."""
    targets = [t for t, _ in disks]
    if separate or len(targets) < 2:
        return []
    for target in targets:
        if "," in target:
            raise Unsupported("disk target %r holds a comma, which --group "
                              "cannot list; export with --separate" % target)
    return targets


def sections(domain, disks, name, folder, authfile=None, manifest_dir=None,
             notes=None, group=(), tls=False):
    """[(section name, text)] for disks = [(target, base path)], and for
    each its manifest export when manifest_dir is given (digest = on).
    notes: {target: what a client copies}, a comment above the section.
    group: the targets every prerun freezes together (together()), in the
    same order in each section, or none.  tls: force_tls in each."""
    result, notes = [], notes or {}
    for target, path in disks:
        section = name if len(disks) == 1 else "%s-%s" % (name, target)
        items = [("exportname", path), ("readonly", True)]
        if authfile:
            items.append(("authfile", authfile))
        if tls:
            items.append(("force_tls", True))
        prerun = [_q(os.path.join(folder, "nbd-prerun")), "--domain",
                  _q(domain), "--disk", _q(target)]
        if group:
            prerun += ["--group", _q(",".join(group))]
        items += [
            ("prerun", " ".join(prerun + ["%s"])),
            ("postrun", "%s %%s" % _q(os.path.join(folder, "nbd-postrun")))]
        for key, hook in items[-2:]:
            pieces, bad = nbd_config.printf_parts(hook)
            assert len(pieces) == 2 and not bad, hook
        try:
            text = nbd_config.format_section(section, items, textwrap.wrap(
                "Clients copy %s." % notes[target], 76, break_on_hyphens=False,
                break_long_words=False) if target in notes else ())
        except ValueError as e:
            raise Unsupported("%s; choose another with --name" % e)
        result.append((section, text))
        if manifest_dir:
            result.append(manifest_section(domain, target, section,
                                           manifest_dir, authfile, tls))
    return result


def render(domain, parts, allow, authfile, group=(), tls=False):
    """The text of the sections, parts = sections(), with their header;
    group and tls as given to sections()."""
    head = [MARK + " for domain %s; it rewrites this file." % domain]
    if group:
        head += ["# " + line for line in textwrap.wrap(
            "The disks %s are frozen together, at one instant: the first "
            "connection to any of them freezes them all, and they stay "
            "frozen until the last connection to any of them ends."
            % ", ".join(group), 76)]
    if allow:
        head.append("# Clients allowed (authfile %s):" % authfile)
        head += ["#     %s" % a for a in allow]
    else:
        head.append("# No authfile: every address that reaches nbd-server "
                    "may copy these disks.")
    head += ["# " + line for line in textwrap.wrap(
        "TLS only (force_tls): [generic] needs certfile, keyfile and "
        "cacertfile ('nbdsnap certs' prints them); a client needs a "
        "certificate of that CA." if tls else
        "Plain text (no --tls): the disks cross the network unencrypted.",
        76)]
    return "\n".join(head) + "\n\n" + "\n".join(t for _, t in parts)


def _ours(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(MARK)
    except FileNotFoundError:
        return True
    except OSError as e:
        raise Error("cannot read %s: %s" % (path, e.strerror))


def same(path, text):
    """Whether path is already text, mode 0644: then export leaves it
    untouched (same inode, same mtime), so that a configuration tool
    (Ansible, the role in contrib/ansible) that reruns export learns that
    nothing changed and nbd-server need not reread anything."""
    data = text.encode("utf-8")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise Error("cannot read %s: %s" % (path, e.strerror))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if (stat.S_IMODE(st.st_mode) != 0o644 or st.st_size != len(data)
                or st.st_uid != os.geteuid()):
            return False
        return f.read(len(data) + 1) == data


def write_file(path, text, force=False):
    """Write text to path atomically, mode 0644; refuse to replace a file
    that nbdsnap export did not write, unless force.  Return False, and
    write nothing, when path holds text already (same())."""
    if os.path.islink(path) or (os.path.lexists(path)
                                and not os.path.isfile(path)):
        raise Unsupported("%s exists and is not a regular file" % path)
    if not force and not _ours(path):
        raise Unsupported("%s exists and was not written by nbdsnap export; "
                          "--force replaces it" % path)
    if same(path, text):
        return False
    try:
        # The temporary name ends in .tmp: nbd-server's includedir skips it.
        write_atomic(path, text, mode=0o644)
    except OSError as e:
        raise ConfigError("cannot write %s: %s" % (path, e.strerror))
    return True


def run(domain_name, targets=(), name=None, allow=(), output=None,
        force=False, folder=None, is_ours=lambda path: False, out=print,
        manifest_dir=None, separate=False, tls=False):
    """Print or write the sections; return the section names.  Several
    disks are frozen together, at one instant, unless separate; tls:
    force_tls in every section."""
    if allow and output is None:
        # Printed sections name an authfile that nothing writes; pasted or
        # redirected into conf.d, nbd-server finds no authfile and lets
        # every address in: the closed export asked for would be open.
        raise ConfigError("--allow needs -o FILE, which writes the authfile "
                          "with the sections: printed, they would name a "
                          "missing authfile, and nbd-server then lets every "
                          "address in")
    if output is not None:
        where = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(where):
            raise ConfigError("cannot write %s: there is no folder %s"
                              % (output, where))
    conn = virt.connect()
    try:
        found = virt.lookup(conn, name=domain_name)
    finally:
        conn.close()
    if found is None:
        raise NotFound("no libvirt domain is named %s" % domain_name)
    domain = found[1]
    disks = choose(domain, targets, is_ours)
    group = together(disks, separate)
    if name is None:
        name = domain.name if len(disks) > 1 else \
            "%s-%s" % (domain.name, disks[0][0])
    if "/" in name or name.startswith("."):
        raise Unsupported("section name %r cannot name the authfile %s.allow"
                          % (name, name))
    authfile = os.path.join(where, name + ".allow") if allow else None
    notes = notes_of(domain, disks, is_ours)
    parts = sections(domain.name, disks, name, folder or bin_dir(),
                     authfile, manifest_dir, notes, group, tls)
    names = [n for n, _ in parts]
    for target, note in notes.items():
        log.warning("disk %s of domain %s: clients copy %s", target,
                    domain.name, note)
    text = render(domain.name, parts, allow, authfile, group, tls)
    if not allow:
        log.warning("%s: no --allow, so no authfile: every address that "
                    "reaches nbd-server may copy %s", ", ".join(names),
                    "them" if len(names) > 1 else "it")
    if not tls:
        log.warning("%s: no --tls: clients copy %s in plain text, and "
                    "whoever reaches the port may freeze the domain "
                    "(nbdsnap certs, then --tls)", ", ".join(names),
                    "them" if len(names) > 1 else "it")
    if output is None:
        out(text.rstrip("\n"))
        return names
    if not output.endswith(".conf"):
        log.warning("%s: nbd-server reads only *.conf files from its "
                    "includedir", output)
    files = []
    if allow:
        # The authfile first: a section naming a missing authfile would
        # let every address in.
        files.append((authfile, write_file(
            authfile, "%s for %s\n%s\n" % (MARK, ", ".join(names),
                                           "\n".join(allow)), force)))
    files.append((output, write_file(output, text, force)))
    # One line a file on stdout, "wrote FILE" or "unchanged FILE": what a
    # script (the Ansible role) reads to learn whether nbd-server must
    # reread its configuration.
    for path, wrote in files:
        out("%s %s" % ("wrote" if wrote else "unchanged", path))
    log.info("%s (%s): %s", output, ", ".join(names), ", ".join(
        "%s %s" % ("wrote" if wrote else "unchanged", path)
        for path, wrote in files))
    return names
