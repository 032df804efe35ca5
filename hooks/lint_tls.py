"""nbdsnap lint: does nbd-server serve the disks over TLS, and can it?

An export carries a whole disk, with every secret on it.  With TLS
([generic] certfile, keyfile, cacertfile; force_tls = true in the section,
as ``nbdsnap export --tls`` writes it) only a client holding a certificate
of cacertfile's CA gets it, and nbd-server runs prerun only after the
handshake, so no other client freezes the domain.  What nbd-server 3.24
does when that set-up is incomplete, measured on Debian 12 with nbdinfo
(libnbd 1.14); in every case nbd-server starts and says nothing:

- force_tls (in the section or [generic]) while [generic] lacks certfile
  or keyfile: it refuses STARTTLS, and a plain-text client is told that
  TLS is required: every client is refused;
- certfile and keyfile without cacertfile: it drops every TLS client
  during the handshake, even one with a certificate of the CA;
- certfile, keyfile or cacertfile naming a missing file: the same, the
  handshake fails;
- ``tlsonly``, which nbd-server(5) documents, is no key 3.24 reads, in the
  section or in [generic]: a plain-text client connects and prerun runs;
- a section without force_tls: a plain-text client gets it.  On loopback
  that is the host's own business; beyond it, the disk crosses the network.

A key readable by others lets them be the VM host (keyfile), or sign a
client certificate nbd-server accepts (the CA's key, ca-key.pem next to
cacertfile, as ``nbdsnap certs`` lays them out).

A certificate past its end (certfile, or cacertfile's CA) fails every
handshake as a missing file does, and on a date nobody watches: lint says
so from RENEW_DAYS before it.

Pure but for the files, looked at through the functions passed in
(os.stat and open by default).
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
import subprocess
import time

FILES = ("certfile", "keyfile", "cacertfile")
CA_KEY = "ca-key.pem"
TLSONLY = "tlsonly"
LOOPBACK_NAMES = ("localhost", "ip6-localhost", "ip6-loopback")
RENEW_DAYS = 30
DAY = 86400


def forced(section, generic):
    """Does nbd-server serve section over TLS only?"""
    return bool(section.get("force_tls") or generic.get("force_tls"))


def loopback(listenaddr):
    """Does nbd-server listen on loopback only?  Unset: every address."""
    if not listenaddr:
        return False
    if listenaddr in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(listenaddr).is_loopback
    except ValueError:
        return False            # a host name: whatever it resolves to


def check_manifest(section, generic):
    """Findings on a disk's manifest export (SECTION.manifest, no hooks):
    in plain text beyond loopback, someone on the way can change the
    manifest and the copy alike, and the check passes."""
    if forced(section, generic) or loopback(generic.get("listenaddr")):
        return []
    return ["no force_tls and nbd-server listens on %s: the manifest "
            "crosses the network in plain text, and a check against it "
            "proves nothing against someone on the way; set force_tls = "
            "true (nbdsnap export --tls)"
            % (generic.get("listenaddr") or "every address")]


def check_section(section, generic):
    """Findings on one export section's TLS."""
    out = []
    if TLSONLY in section.raw:
        out.append("tlsonly is ignored by nbd-server 3.24: a plain-text "
                   "client still connects and prerun freezes the domain; "
                   "write force_tls = true")
    if forced(section, generic):
        missing = [k for k in ("certfile", "keyfile") if not generic.get(k)]
        if missing:
            out.append("force_tls, but [generic] has no %s: nbd-server "
                       "refuses STARTTLS, so every client of this export is "
                       "refused (nbdsnap certs prints the lines)"
                       % " or ".join(missing))
    elif not loopback(generic.get("listenaddr")):
        out.append("no force_tls and nbd-server listens on %s: the disk "
                   "crosses the network in plain text, and any client the "
                   "authfile lets in may freeze the domain; set "
                   "force_tls = true (nbdsnap export --tls)"
                   % (generic.get("listenaddr") or "every address"))
    return out


def check_generic(generic, stat_of=os.stat, readable=None, not_after=None,
                  now=None):
    """Findings on [generic]'s TLS settings and their files.  not_after:
    a certificate file's end (seconds since the epoch), or None."""
    readable = readable or _readable
    not_after = not_after or _not_after
    now = time.time() if now is None else now
    out = []
    if TLSONLY in generic.raw:
        out.append("tlsonly is ignored by nbd-server 3.24: plain-text "
                   "clients still connect; write force_tls = true in the "
                   "sections (nbdsnap export --tls)")
    if generic.get("certfile") and generic.get("keyfile") \
            and not generic.get("cacertfile"):
        out.append("certfile without cacertfile: nbd-server 3.24 drops "
                   "every TLS client in the handshake; set cacertfile to "
                   "the CA of the clone hosts' certificates")
    for key in FILES:
        path = generic.get(key)
        if path:
            found = _file(key, path, stat_of, readable)
            if not found and key != "keyfile":
                found = expiry(key, path, not_after(path), now)
            out += found
    if generic.get("cacertfile"):
        ca_key = os.path.join(os.path.dirname(generic.get("cacertfile")),
                              CA_KEY)
        try:
            st = stat_of(ca_key)
        except FileNotFoundError:
            st = None
        except OSError as e:
            out.append("cannot look at %s: %s" % (ca_key, e.strerror))
            st = None
        if st is not None:
            out += _secret("the CA's key %s" % ca_key, st,
                           "sign a client certificate nbd-server accepts")
    return out


def _file(key, path, stat_of, readable):
    try:
        st = stat_of(path)
    except OSError as e:
        return ["%s %s: %s: every TLS handshake fails"
                % (key, path, e.strerror)]
    if not stat.S_ISREG(st.st_mode):
        return ["%s %s is not a regular file" % (key, path)]
    why = readable(path)
    if why:
        return ["%s %s cannot be read (%s): every TLS handshake fails"
                % (key, path, why)]
    if key == "keyfile":
        return _secret("keyfile %s" % path, st, "pose as this VM host")
    return []


def expiry(key, path, end, now):
    """A finding when the certificate at path ends within RENEW_DAYS."""
    if end is None:
        return []
    date = time.strftime("%Y-%m-%d", time.gmtime(end))
    how = ("make a new CA (nbdsnap certs in a new folder) and give every "
           "clone host its folder" if key == "cacertfile" else
           "renew it (nbdsnap certs: move the certificate and its key "
           "aside, then run it again with the same names)")
    if end <= now:
        return ["%s %s expired on %s: every TLS handshake fails; %s"
                % (key, path, date, how)]
    if end - now < RENEW_DAYS * DAY:
        return ["%s %s expires on %s, in %d days: then every TLS "
                "handshake fails; %s" % (key, path, date,
                                         (end - now) // DAY, how)]
    return []


def _not_after(path):
    """The certificate's end, by openssl; None when it cannot tell (then
    the handshake's own error says more than lint could)."""
    try:
        out = subprocess.run(["openssl", "x509", "-noout", "-enddate",
                              "-in", path], capture_output=True, text=True,
                             timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    if out.returncode or not text.startswith("notAfter="):
        return None
    try:
        return ssl.cert_time_to_seconds(text[len("notAfter="):])
    except ValueError:
        return None


def _secret(what, st, harm):
    """A key file must be root's and closed to group and others."""
    out = []
    if st.st_uid != 0:
        out.append("%s is owned by uid %d, not root: that user can %s"
                   % (what, st.st_uid, harm))
    if st.st_mode & 0o077:
        out.append("%s is mode %o: group and others can read it and %s; "
                   "chmod 600" % (what, stat.S_IMODE(st.st_mode), harm))
    return out


def _readable(path):
    """Why path cannot be read, or None."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return e.strerror
    return None


def used(conf):
    """Does the configuration use TLS at all (so [generic]'s TLS settings
    matter)?"""
    return any(conf.generic.get(k) for k in FILES + ("force_tls",)) \
        or TLSONLY in conf.generic.raw \
        or any(s.get("force_tls") for s in conf.exports)


def unknown(section):
    """The keys nbd-server ignores, but tlsonly: its own finding says
    more."""
    return [k for k in section.unknown if k != TLSONLY]

