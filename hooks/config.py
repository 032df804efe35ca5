"""Settings from /etc/nbdsnap.conf (or the file named by NBDSNAP_CONFIG).

The file is INI with one section, ``[nbdsnap]``.  A missing default file
means all defaults; a file named by NBDSNAP_CONFIG must exist.  A ``#`` or
``;`` after a blank starts a comment, as people write them after a value
(``quiesce = try   # or require``); one with no blank before it belongs to
the value (``/srv/a#b``).  Whatever is wrong with the file is one line.
"""

import configparser
import math
import dataclasses
import os

from .errors import ConfigError

DEFAULT_PATH = "/etc/nbdsnap.conf"
SECTION = "nbdsnap"
QUIESCE_POLICIES = ("require", "try", "off")
# A configuration is a few lines: more is some other file named by mistake.
MAX_BYTES = 1 << 20
STALE_POLICIES = ("refuse", "recover")


@dataclasses.dataclass(frozen=True)
class Config:
    # Session state files and locks (root only).
    state_dir: str = "/var/lib/nbdsnap"
    # Where overlays go; QEMU (libvirt-qemu) must be able to reach it.
    snapshot_dir: str = "/var/lib/nbdsnap/overlays"
    # Quiesce the guest's filesystems through the guest agent.
    quiesce: str = "try"
    # Seconds the guest agent may take to answer, and to freeze and thaw.
    quiesce_timeout: float = 10.0
    # A session nobody holds any more: refuse the client, or recover first.
    stale: str = "refuse"
    # Seconds a hook waits for another hook holding the same disk's lock.
    lock_timeout: float = 120.0
    # Seconds the block commit may take before it is cancelled.
    commit_timeout: float = 600.0
    # The freeze-time manifest: digest the frozen base in the background.
    digest: bool = True
    digest_algorithm: str = "sha256"
    # Where the manifests go, one per domain disk (served read-only).
    manifest_dir: str = "/var/lib/nbdsnap/manifests"
    # Seconds the last postrun waits for the digest before it commits.
    digest_timeout: float = 600.0
    # Days an incremental chain of manifests may run before a full digest
    # (0: every digest is full); a write missed by any means must not live
    # forever.
    digest_full_days: float = 7.0
    # The syslog daemon's socket (a container may bind it elsewhere).
    syslog_socket: str = "/dev/log"
    # node_exporter textfile the hooks rewrite after each run ("": none);
    # checked when written, so that a bad one never refuses a freeze.
    metrics_file: str = ""
    # Where the configuration came from, for messages.
    path: str = ""

    @property
    def locks_dir(self):
        return os.path.join(self.state_dir, "locks")

    @property
    def sessions_dir(self):
        return os.path.join(self.state_dir, "sessions")


def load(path=None):
    """Return the Config from ``path``, NBDSNAP_CONFIG or the default file."""
    explicit = path or os.environ.get("NBDSNAP_CONFIG")
    path = explicit or DEFAULT_PATH
    try:
        text = _read(path)
    except FileNotFoundError:
        if explicit:
            raise ConfigError("configuration file %s does not exist" % path)
        return Config(path="(defaults)")
    parser = configparser.ConfigParser(interpolation=None,
                                       inline_comment_prefixes=("#", ";"))
    try:
        parser.read_string(text, source=path)
    except configparser.Error as e:
        raise ConfigError("cannot read configuration %s: %s"
                          % (path, _parse_error(e, text)))

    if not parser.has_section(SECTION):
        if parser.sections():
            # A misspelt header would otherwise drop every setting silently.
            raise ConfigError("%s: no [%s] section (found %s)" % (
                path, SECTION, ", ".join("[%s]" % s for s in parser.sections())))
        return Config(path=path)
    values = dict(parser.items(SECTION))
    known = {f.name for f in dataclasses.fields(Config)} - {"path"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError("%s: unknown setting %s in [%s]"
                          % (path, ", ".join(unknown), SECTION))
    return _validated(values, path)


def _read(path):
    """The file's text; FileNotFoundError for the caller to judge."""
    def refuse(why):
        return ConfigError("cannot read configuration %s: %s" % (path, why))
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise refuse(e.strerror or e)
    if len(data) > MAX_BYTES:
        raise refuse("larger than %d bytes, not a configuration" % MAX_BYTES)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise refuse("line %d: not UTF-8 text (byte 0x%02x)"
                     % (data.count(b"\n", 0, e.start) + 1, data[e.start]))


def _parse_error(e, text):
    """configparser's error in one line (its own text spans several)."""
    if isinstance(e, configparser.MissingSectionHeaderError):
        return ("line %d: a setting before any section header; the file "
                "must start with [%s]" % (e.lineno, SECTION))
    if isinstance(e, configparser.ParsingError):
        lineno = e.errors[0][0]
        return "line %d: not a setting: %r" % (
            lineno, text.splitlines()[lineno - 1].strip())
    if isinstance(e, configparser.DuplicateOptionError):
        return "line %d: %s is set twice in [%s]" % (e.lineno, e.option,
                                                     e.section)
    if isinstance(e, configparser.DuplicateSectionError):
        return "line %d: section [%s] is there twice" % (e.lineno, e.section)
    return " ".join(str(e).split())


def _validated(values, path):
    kw = {"path": path}
    for name in ("state_dir", "snapshot_dir", "manifest_dir",
                 "syslog_socket"):
        if name in values:
            if not os.path.isabs(values[name]):
                raise ConfigError("%s: %s must be an absolute path, not %r"
                                  % (path, name, values[name]))
            kw[name] = os.path.normpath(values[name])
    if "quiesce" in values:
        kw["quiesce"] = parse_quiesce(values["quiesce"], path)
    if "stale" in values:
        kw["stale"] = values["stale"].strip().lower()
        if kw["stale"] not in STALE_POLICIES:
            raise ConfigError("%s: stale must be one of %s, not %r" % (
                path, ", ".join(STALE_POLICIES), values["stale"]))
    if "digest" in values:
        flag = values["digest"].strip().lower()
        if flag not in ("on", "off", "yes", "no", "true", "false"):
            raise ConfigError("%s: digest must be on or off, not %r"
                              % (path, values["digest"]))
        kw["digest"] = flag in ("on", "yes", "true")
    if "digest_algorithm" in values:
        kw["digest_algorithm"] = parse_digest_algorithm(
            values["digest_algorithm"], path)
    for name in ("lock_timeout", "commit_timeout", "digest_timeout",
                 "quiesce_timeout"):
        if name in values:
            try:
                kw[name] = float(values[name])
            except ValueError:
                kw[name] = -1.0
            # "not >" also refuses nan, whose deadline would never come.
            if not 0 < kw[name] < math.inf:
                raise ConfigError("%s: %s must be a positive number of "
                                  "seconds, not %r" % (path, name, values[name]))
    if "metrics_file" in values:
        kw["metrics_file"] = values["metrics_file"].strip()
    if "digest_full_days" in values:
        try:
            kw["digest_full_days"] = float(values["digest_full_days"])
        except ValueError:
            kw["digest_full_days"] = -1.0
        if not 0 <= kw["digest_full_days"] < math.inf:
            raise ConfigError("%s: digest_full_days must be a number of days, "
                              "0 or more, not %r"
                              % (path, values["digest_full_days"]))
    return Config(**kw)


def parse_digest_algorithm(value, where):
    """The manifest's hash: whatever nbd-verify -a takes on this host (a
    fixed-size hashlib algorithm, or blake3 with its module installed), so
    that the digest started at a freeze cannot fail on it."""
    value = value.strip().lower()
    if value == Config.digest_algorithm:
        # Always there; and blkhash's import (8 ms) stays out of the hooks
        # that read the installed configuration, which names it.
        return value
    from nbdsnap.verify import blkhash
    from nbdsnap.verify.errors import UnknownAlgorithm
    try:
        blkhash.digest_size(value)
    except UnknownAlgorithm as e:
        raise ConfigError("%s: digest_algorithm: %s" % (where, e))
    return value


def parse_quiesce(value, where="--quiesce"):
    value = value.strip().lower()
    if value not in QUIESCE_POLICIES:
        raise ConfigError("%s: quiesce must be one of %s, not %r"
                          % (where, ", ".join(QUIESCE_POLICIES), value))
    return value
