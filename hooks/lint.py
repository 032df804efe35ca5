"""nbdsnap lint: what in nbd-server's configuration will bite, before it does.

The configuration is read as nbd-server reads it (nbd_config).  A section
is checked when its hooks are nbdsnap's or its exportname is a domain's
disk; other exports are not nbdsnap's business.  Each finding is one line,
``SECTION: finding``; ``generic`` is nbd-server's [generic] section and
``host`` this machine (libvirt, AppArmor).  lint() is pure: what libvirt
and the disks say comes in a Host.  Whether the sections of disks frozen
together (prerun's --group) agree is lint_group's; TLS is lint_tls's.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import os
import pwd
import re
import shlex

from . import lint_group, lint_tls, locate, nbd_config, procs, served, sessions
from .errors import CorruptState, Error, NotFound

PRERUN, POSTRUN = "nbd-prerun", "nbd-postrun"
APPARMOR = "/sys/module/apparmor/parameters/enabled"
QEMU_CONF = "/etc/libvirt/qemu.conf"
FIXED_IN = 12001000             # libvirt 12.1: virt-aa-helper fixed


@dataclasses.dataclass
class Hook:
    key: str                    # prerun or postrun
    slots: list                 # how sh sees each %s (nbd_config contexts)
    bad: list                   # printf conversions other than %s and %%
    words: list | None          # shell words, %s as EXPORT; None: unparsable
    entry: str | None           # nbd-prerun or nbd-postrun, when it runs one

    def option(self, name):
        words = self.words or []
        for i, word in enumerate(words[:-1]):
            if word == name:
                return words[i + 1]
        return next((w.split("=", 1)[1] for w in words
                     if w.startswith(name + "=")), None)


def hooks_of(section):
    hooks = {}
    for key in ("prerun", "postrun"):
        if section.get(key):
            pieces, bad = nbd_config.printf_parts(section.get(key))
            try:
                words = shlex.split("EXPORT".join(pieces))
            except ValueError:
                words = None
            entry = next((os.path.basename(w) for w in words or ()
                          if os.path.basename(w) in (PRERUN, POSTRUN)), None)
            hooks[key] = Hook(key, nbd_config.slot_contexts(pieces), bad,
                              words, entry)
    return hooks


def prerun_of(section):
    """The lint_group.Prerun of a section that runs nbd-prerun, or None."""
    pre = hooks_of(section).get("prerun")
    if pre is None or pre.entry != PRERUN:
        return None
    return lint_group.Prerun(section.name, pre.option("--domain"),
                             pre.option("--disk"), pre.option("--group"))


def is_ours(section):
    return any(h.entry for h in hooks_of(section).values())


def virtual(section):
    """Why exportname is not the path the hooks get, or None."""
    style = (section.get("virtstyle") or "ipliteral").split()[0]
    if "%" in section.get("exportname") and style != "none":
        return ("exportname has a %% and virtstyle is %s: nbd-server puts "
                "the client's address into it" % style)
    return None


def check_hooks(section, find=os.access):
    out, hooks = [], hooks_of(section)
    path = section.get("exportname")
    for h in hooks.values():
        if h.bad:
            out.append("%s has a bare %% (%s): printf reads it from memory "
                       "that is no argument; write %%%% for a literal %%"
                       % (h.key, ", ".join(h.bad)))
        if len(h.slots) > 1:
            out.append("%s has %%s %d times: printf has one argument, the "
                       "others read garbage" % (h.key, len(h.slots)))
        if h.words is None:
            out.append("%s: the shell cannot parse it (unbalanced quotes)"
                       % h.key)
        for context in sorted(set(h.slots)):
            if not virtual(section) and nbd_config.breaks(path, context):
                out.append("%s: %%s is %s and the shell splits or interprets "
                           "exportname %s; quote %%s or use a plain path"
                           % (h.key, context, path))
        if h.entry and not h.slots:
            out.append("%s has no %%s: %s gets no export path"
                       % (h.key, h.entry))
        if h.entry and h.words:
            exe = next(w for w in h.words if os.path.basename(w) == h.entry)
            if not os.path.isabs(exe):
                out.append("%s runs %s by name: it depends on nbd-server's "
                           "PATH; give the absolute path" % (h.key, exe))
            elif not find(exe, os.X_OK):
                out.append("%s: %s is not installed" % (h.key, exe))
    pre = getattr(hooks.get("prerun"), "entry", None) == PRERUN
    post = getattr(hooks.get("postrun"), "entry", None) == POSTRUN
    if pre and not post:
        out.append("prerun is nbd-prerun but postrun is not nbd-postrun: the "
                   "overlay is never committed and the domain stays on it")
    if post and not pre:
        out.append("postrun is nbd-postrun but prerun is not nbd-prerun: "
                   "nothing freezes the disk, clients copy it while the "
                   "domain writes it")
    return out


def check_export(section, read):
    out = []
    if not section.get("readonly"):
        out.append("not read-only: a client can write the disk under the "
                   "domain (readonly = true)")
    if section.get("copyonwrite"):
        out.append("copyonwrite is on: clients write into a diff file "
                   "nbd-server keeps beside the disk; set it to false")
    why = virtual(section)
    if why or not os.path.isabs(section.get("exportname")):
        out.append(why or "exportname %s is not an absolute path"
                   % section.get("exportname"))
    out += check_authfile(section.get("authfile"), read)
    return out + ["unknown option %s, which nbd-server ignores" % k
                  for k in lint_tls.unknown(section)]


def check_authfile(authfile, read):
    if not authfile:
        return ["no authfile: every address that reaches nbd-server may "
                "copy this disk"]
    try:
        text = read(authfile)
    except FileNotFoundError:
        return ["authfile %s does not exist: nbd-server then lets every "
                "address in" % authfile]
    except OSError as e:
        return ["cannot read authfile %s (%s): nbd-server then lets every "
                "address in" % (authfile, e.strerror)]
    out, entries = [], 0
    for number, line in enumerate(text.splitlines(), 1):
        word = line.split("#", 1)[0].strip()
        try:
            if word:
                ipaddress.ip_network(word.split()[0], strict=False)
                entries += 1
        except ValueError:
            out.append("authfile %s line %d: %r is no address or "
                       "address/prefix; nbd-server skips it"
                       % (authfile, number, word))
    if not entries:
        out.append("authfile %s lists no address: nobody may connect"
                   % authfile)
    return out


def check_generic(conf, ours, lookup=None, stat_of=os.stat):
    """Findings on [generic] and on the sections as a whole."""
    lookup = lookup or {"user": pwd.getpwnam, "group": grp.getgrnam}
    out = [] if conf.exports else ["no export section: nbd-server refuses "
                                   "to start"]
    for key in ("user", "group") if ours else ():
        value = conf.generic.get(key)
        try:
            root = not value or lookup[key](value)[2] == 0
        except KeyError:
            root = False
        if not root:
            out.append("%s = %s: nbd-server runs the hooks as %s, and they "
                       "need root; remove it or set it to root"
                       % (key, value, value))
    out += ["unknown option %s, which nbd-server ignores" % k
            for k in lint_tls.unknown(conf.generic)]
    if ours or lint_tls.used(conf):
        out += lint_tls.check_generic(conf.generic, stat_of)
    out += ["%s is no regular file: nbd-server skips it (a symlink too)" % p
            for p in conf.skipped]
    found = [("generic", f) for f in out]
    seen = {}
    for sec in conf.exports:
        if sec.name in seen:
            found.append((sec.name, "defined twice (%s and %s): clients get "
                          "whichever nbd-server reads first"
                          % (seen[sec.name], sec.file)))
        seen.setdefault(sec.name, sec.file)
    return found


def apparmor(enabled, version, drivers):
    """The AppArmor finding, or None."""
    if not enabled or version >= FIXED_IN or "apparmor" not in drivers:
        return None
    return ("AppArmor is on and libvirt %d.%d confines QEMU with it: before "
            "libvirt 12.1, virt-aa-helper can deny QEMU writes to a backing "
            "file and break the commit; allow the exported disks in "
            "/etc/apparmor.d/local/abstractions/libvirt-qemu, or set "
            "security_driver = \"none\" in %s"
            % (version // 1000000, version // 1000 % 1000, QEMU_CONF))


def security_drivers(qemu_conf_text, apparmor_on):
    """security_driver from qemu.conf; unset means AppArmor when it is on."""
    for line in qemu_conf_text.splitlines():
        m = re.match(r"\s*security_driver\s*=\s*(.*)", line)
        if m:
            return re.findall(r'"([^"]*)"', m.group(1))
    return ["apparmor"] if apparmor_on else []


# -- against libvirt -----------------------------------------------------------

@dataclasses.dataclass
class Host:
    domains: list | None        # every domxml.Domain; None: no libvirt
    version: int                # libvirt's, as getLibVersion gives it
    drivers: list               # security drivers QEMU runs with
    apparmor: bool              # AppArmor enabled in the kernel
    is_overlay: object          # path -> an nbdsnap overlay?
    verdict: object             # key -> session verdict, None, or "corrupt"
    error: str = ""
    info: object = None         # path -> qemu-img info, when the XML is mute


def check_disk(section, host, key_of):
    """(findings, whether exportname is a domain's disk)."""
    path, ours = section.get("exportname"), is_ours(section)
    if virtual(section) or not os.path.isabs(path):
        return [], False
    try:
        key = key_of(path)
    except NotFound as e:
        return [str(e)], False
    if key is None:
        return (["exportname %s does not exist" % path] if ours else []), False
    found = locate.matches(host.domains, key, key_of, host.is_overlay)
    if not ours:
        return (["is disk %s but has no nbdsnap hooks: clients copy it while "
                 "the domain writes it" % ", ".join(map(str, found))]
                if found else []), bool(found)
    pre = hooks_of(section).get("prerun")
    name, target = (pre.option("--domain"), pre.option("--disk")) if pre \
        else (None, None)
    group = []
    try:
        if name or target:
            dom = next((d for d in host.domains if d.name == name), None)
            if dom is None or not target:
                raise NotFound("prerun names domain %s disk %s, which libvirt "
                               "does not have" % (name, target))
            group = lint_group.unknown_disks(prerun_of(section), dom)
            match = locate.check_named(dom, target, path, key, key_of,
                                       host.is_overlay)
        else:
            match = locate.choose(found, path, len(host.domains))
    except Error as e:
        return [str(e)] + group, bool(found)
    image = group + check_image(match, host)
    if match.how != locate.FROZEN:
        return image, True
    overlay, state = match.disk.top.path, host.verdict(key)
    if state == sessions.LIVE:
        return ["%s runs on nbdsnap overlay %s right now: a client is "
                "copying it" % (match, overlay)] + image, True
    why = ("that no session names (left by a crash)" if state is None
           else "of a %s session" % state)
    return ["%s runs on nbdsnap overlay %s %s: the next client is refused; "
            "run 'nbdsnap recover %s'" % (match, overlay, why, path)
            ] + image, True


def check_image(match, host):
    """A finding when the export is an image with a backing file: nbd-server
    serves the file as it is, and the copy names a backing file that a
    clone host does not have."""
    fmt, backing = served.served_image(match.disk, host.is_overlay, host.info)
    return ["%s: clients copy %s" % (match, served.served_as(fmt, backing))] \
        if backing else []


def _read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


MANIFEST = ".manifest"


def lint(conf, host, key_of=locate.key_of, find=os.access, read=_read,
         stat_of=os.stat):
    """[(section, finding)] for the nbd_config.ServerConfig conf."""
    out, grouped = [], {}
    for name, finding in lint_group.check(
            [p for p in map(prerun_of, conf.exports) if p]):
        grouped.setdefault(name, []).append(finding)
    checked = set()
    for sec in conf.exports:
        found, disk = [], False
        if host.domains is not None:
            found, disk = check_disk(sec, host, key_of)
        if is_ours(sec) or disk:
            checked.add(sec.name)
            found = (check_hooks(sec, find) + grouped.pop(sec.name, [])
                     + check_export(sec, read)
                     + lint_tls.check_section(sec, conf.generic) + found)
        out += [(sec.name, f) for f in found]
    # A checked disk's manifest export (nbdsnap export writes it after).
    out += [(sec.name, f) for sec in conf.exports
            if sec.name.endswith(MANIFEST) and sec.name[:-len(MANIFEST)]
            in checked for f in lint_tls.check_manifest(sec, conf.generic)]
    ours = any(is_ours(s) for s in conf.exports)
    out += check_generic(conf, ours, stat_of=stat_of)
    if host.domains is None:
        out.append(("host", "%s; the domain checks were skipped"
                    % host.error))
    finding = apparmor(host.apparmor, host.version, host.drivers)
    return out + ([("host", finding)] if ours and finding else [])


def host(store):
    """What libvirt, the kernel and qemu.conf say, for lint()."""
    import libvirt
    from lxml import etree
    from . import qemu_img, virt
    from .errors import VirtError

    def verdict(key):
        try:
            state = store.load(key)
        except CorruptState:
            return "corrupt"
        return state and store.assess(state, procs.is_alive)

    try:
        on = _read(APPARMOR).strip() == "Y"
    except OSError:
        on = False
    try:
        drivers = security_drivers(_read(QEMU_CONF), on)
    except OSError:
        drivers = ["apparmor"] if on else []
    result = Host(None, libvirt.getVersion(), drivers, on, store.is_ours,
                  verdict, info=qemu_img.info)
    try:
        conn = virt.connect()
    except VirtError as e:
        result.error = str(e)
        return result
    try:
        result.domains = [p for _, p in virt.all_domains(conn)]
        result.version = conn.getLibVersion()
        caps = etree.fromstring(conn.getCapabilities().encode())
        result.drivers = [m.text for m in caps.findall("host/secmodel/model")]
    except (VirtError, libvirt.libvirtError) as e:
        result.domains, result.error = None, str(e)
    finally:
        conn.close()
    return result
