"""nbdsnap certs: the TLS material of a VM host and its clone hosts.

Made by openssl (the one Debian installs; no crypto of our own), in the
layouts nbd-server and libnbd read::

    DIR/ca-cert.pem, ca-key.pem          the CA that signs the others
    DIR/server-cert.pem, server-key.pem  nbd-server's [generic] certfile,
                                         keyfile (cacertfile: ca-cert.pem)
    DIR/clients/NAME/                    one clone host's folder, libnbd's
        ca-cert.pem                      layout (nbds://...?tls-certificates=
        client-cert.pem                  FOLDER, or /etc/pki/libnbd): the CA
        client-key.pem                   that proves the VM host, and its own

Keys are ECDSA P-256, files 0600 and folders 0700, root's: a key is made
with the umask at 077, so it is never readable by others, not even for a
moment.  Nothing is ever replaced: a second run adds the clients it is
given (and the CA and server certificate if missing) and leaves the rest
as it is, so that the certificates clone hosts already hold stay valid.
Each file is made in a temporary folder inside DIR and moved into place.

The planning (what to make, with which openssl arguments) is pure; make()
runs it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shutil
import stat
import subprocess
import tempfile

from .errors import ConfigError, Error, Unsupported

DEFAULT_DIR = "/etc/nbdsnap/tls"
CA_DAYS = 3650
DAYS = 825              # what browsers accept for a leaf (renewal: nbdsnap(8))
OPENSSL_WAIT = 60

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-config", "openssl.cnf"]
MINIMAL_CNF = "[req]\ndistinguished_name = dn\n[dn]\n"
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


def check_name(name, what):
    """A DNS name, or a client's name, as a folder and a subject take it."""
    if not _NAME.match(name) or ".." in name:
        raise ConfigError("%s %r: use letters, digits, dots and hyphens "
                          "(a host name)" % (what, name))
    return name


def san(names):
    """subjectAltName of the server certificate: DNS names and IPs."""
    parts = []
    for name in names:
        try:
            parts.append("IP:%s" % ipaddress.ip_address(name))
        except ValueError:
            parts.append("DNS:%s" % check_name(name, "server name"))
    return ",".join(parts)


@dataclasses.dataclass(frozen=True)
class Step:
    what: str           # "ca", "server" or "client"
    name: str           # the CN
    files: tuple        # the files it makes, relative to DIR
    argv: tuple         # openssl, in a temporary folder with the CA's files


def plan(have, server_names, clients, days=DAYS):
    """The Steps that make what is missing.  have(relpath) says whether a
    file exists already; server_names: the names clients connect to (the
    first is the CN); clients: the clone hosts' names."""
    steps = []
    if not have("ca-cert.pem"):
        if have("ca-key.pem"):
            raise Unsupported("ca-key.pem exists without ca-cert.pem: not "
                              "ours to replace")
        steps.append(Step("ca", "nbdsnap CA", ("ca-cert.pem", "ca-key.pem"),
                          ("openssl", "req", "-x509", "-new", *_KEY,
                           "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
                           "-days", str(CA_DAYS), "-subj",
                           "/CN=nbdsnap CA %s" % (server_names[0]
                                                  if server_names
                                                  else "host"),
                           "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
                           "-addext", "keyUsage=critical,keyCertSign,"
                           "cRLSign")))
    elif not have("ca-key.pem"):
        raise Unsupported("ca-cert.pem exists without ca-key.pem: nothing "
                          "can be signed")
    if not have("server-cert.pem"):
        if not server_names:
            raise ConfigError("no server certificate yet: name the VM host "
                              "as clients reach it (--server-name)")
        steps.append(Step("server", server_names[0],
                          ("server-cert.pem", "server-key.pem"),
                          _signed("server", server_names[0], days,
                                  "serverAuth",
                                  "subjectAltName=" + san(server_names))))
    for name in clients:
        check_name(name, "client name")
        folder = os.path.join("clients", name)
        if have(os.path.join(folder, "client-cert.pem")):
            continue
        steps.append(Step("client", name, (
            os.path.join(folder, "client-cert.pem"),
            os.path.join(folder, "client-key.pem"),
            os.path.join(folder, "ca-cert.pem")),
            _signed("client", name, days, "clientAuth")))
    return steps


def _signed(kind, name, days, usage, *extra):
    argv = ["openssl", "req", "-x509", "-CA", "ca-cert.pem", "-CAkey",
            "ca-key.pem", *_KEY, "-keyout", kind + "-key.pem", "-out",
            kind + "-cert.pem", "-days", str(days), "-subj", "/CN=" + name,
            "-addext", "basicConstraints=critical,CA:FALSE",
            "-addext", "keyUsage=critical,digitalSignature",
            "-addext", "extendedKeyUsage=" + usage]
    for ext in extra:
        argv += ["-addext", ext]
    return tuple(argv)


def _secure_folder(path):
    """path, a folder of root's closed to others (made if missing)."""
    try:
        if not os.path.lexists(path):
            os.makedirs(path, mode=0o700)
            os.chmod(path, 0o700)
        st = os.lstat(path)
    except OSError as e:
        raise ConfigError("cannot create %s: %s" % (path, e.strerror))
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError("%s is not a folder (a symlink?)" % path)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ConfigError("%s must be a folder of uid %d that others cannot "
                          "open (mode 700); it is uid %d, mode %o"
                          % (path, os.geteuid(), st.st_uid,
                             stat.S_IMODE(st.st_mode)))


def make(folder, server_names=(), clients=(), days=DAYS, out=print):
    """Make what is missing in folder; return the Steps done."""
    folder = os.path.abspath(folder)
    _secure_folder(folder)
    if clients:
        _secure_folder(os.path.join(folder, "clients"))

    def have(rel):
        return os.path.lexists(os.path.join(folder, rel))
    steps = plan(have, list(server_names), list(clients), days)
    old = os.umask(0o077)
    try:
        for step in steps:
            _run(folder, step)
            out("made %s" % ", ".join(os.path.join(folder, f)
                                      for f in step.files))
    finally:
        os.umask(old)
    return steps


def _run(folder, step):
    work = tempfile.mkdtemp(prefix=".nbdsnap-certs-", dir=folder)
    try:
        if step.what != "ca":
            for name in ("ca-cert.pem", "ca-key.pem"):
                shutil.copyfile(os.path.join(folder, name),
                                os.path.join(work, name),
                                follow_symlinks=False)
        # Only the extensions asked for: the system's openssl.cnf would
        # add its own (its v3_ca makes a leaf a CA).
        with open(os.path.join(work, "openssl.cnf"), "w") as f:
            f.write(MINIMAL_CNF)
        try:
            proc = subprocess.run(step.argv, cwd=work, capture_output=True,
                                  text=True, timeout=OPENSSL_WAIT,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise Error("openssl is not installed (apt install openssl)")
        except subprocess.TimeoutExpired:
            raise Error("openssl did not finish in %d s" % OPENSSL_WAIT)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise Error("openssl could not make the %s certificate %s: %s"
                        % (step.what, step.name, last))
        if step.what == "client":
            _secure_folder(os.path.dirname(os.path.join(folder,
                                                        step.files[0])))
            shutil.copyfile(os.path.join(folder, "ca-cert.pem"),
                            os.path.join(work, "ca-cert.pem"))
        for rel in step.files:
            target = os.path.join(folder, rel)
            made = os.path.join(work, os.path.basename(rel))
            os.chmod(made, 0o600)
            try:
                # link() never replaces: a second run at once keeps what
                # the first put there.
                os.link(made, target)
            except FileExistsError:
                raise Unsupported("%s appeared meanwhile: kept, not "
                                  "replaced" % target) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def generic_lines(folder):
    """What nbd-server's [generic] needs for these files."""
    return ["certfile = %s" % os.path.join(folder, "server-cert.pem"),
            "keyfile = %s" % os.path.join(folder, "server-key.pem"),
            "cacertfile = %s" % os.path.join(folder, "ca-cert.pem")]
