"""nbd-server's configuration, read as nbd-server 3.24 reads it, and written.

nbd-server loads its file with glib's GKeyFile (glib 2.74 on Debian 12):

- a line is a comment when it is blank or its first non-blank character is
  ``#``; leading whitespace of every line is dropped, a ``\\r`` before the
  newline too;
- ``[name]`` opens a group (trailing spaces and tabs allowed after ``]``; no
  ``[``, ``]`` or control character in the name); a group named twice is
  one group; a key given twice keeps its last value;
- ``key = value``: the key loses its trailing whitespace, the value its
  leading whitespace only; strings unescape ``\\s \\n \\t \\r \\\\`` and
  refuse any other escape and a value that is not UTF-8; booleans are
  ``true``, ``false``, ``1`` or ``0`` (trailing whitespace allowed);
  integers are decimal (g_key_file_get_integer stops at a blank, and
  g_key_file_get_int64, for filesize, does not).

nbd-server's own rules on top (parse_cfile and do_cfile_dir in nbd-server.c):
the main file's first group must be ``[generic]``, whose keys are read with
their own table; every other group is an export.  ``includedir`` names a
folder whose regular files (not symlinks, on file systems that report the
type in readdir) whose names end in ``.conf`` are read the same way, in
readdir order, with every group an export and no further includedir.  Only
the keys of nbd-server's tables are read; any other key is ignored.  A
value of the wrong type, a missing exportname or an unreadable file stop
nbd-server: they raise NbdConfigError here.

A hook string (prerun, postrun) is a printf format with one argument, the
export's file name, and the result goes to ``/bin/sh -c``: helpers for both
steps are at the end.
"""

from __future__ import annotations

import dataclasses
import os
import re

from .errors import ConfigError

STR, BOOL, INT, INT64 = "string", "boolean", "integer", "int64"

GENERIC_KEYS = {
    "user": STR, "group": STR, "oldstyle": BOOL, "listenaddr": STR,
    "port": STR, "includedir": STR, "allowlist": BOOL, "unixsock": STR,
    "duallisten": BOOL, "max_threads": INT, "force_tls": BOOL,
    "certfile": STR, "keyfile": STR, "cacertfile": STR, "tlsprio": STR,
}
EXPORT_KEYS = {
    "exportname": STR, "authfile": STR, "filesize": INT64, "virtstyle": STR,
    "prerun": STR, "postrun": STR, "transactionlog": STR, "cowdir": STR,
    "readonly": BOOL, "multifile": BOOL, "treefiles": BOOL,
    "copyonwrite": BOOL, "waitfile": BOOL, "sparse_cow": BOOL, "sdp": BOOL,
    "sync": BOOL, "flush": BOOL, "fua": BOOL, "rotational": BOOL,
    "temporary": BOOL, "trim": BOOL, "datalog": BOOL, "listenaddr": STR,
    "maxconnections": INT, "force_tls": BOOL, "splice": BOOL,
}
GENERIC = "generic"
DEFAULT_PATH = "/etc/nbd-server/config"

_SPACE = " \t\n\r\f\v"          # g_ascii_isspace
_ESCAPES = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


class NbdConfigError(ConfigError):
    """nbd-server would refuse this configuration."""


@dataclasses.dataclass
class Section:
    name: str
    file: str
    raw: dict                       # key -> value as written (escaped)
    values: dict = dataclasses.field(default_factory=dict)   # typed
    unknown: tuple = ()             # keys nbd-server ignores

    def get(self, key, default=None):
        return self.values.get(key, default)


@dataclasses.dataclass
class ServerConfig:
    path: str
    generic: Section
    exports: list
    files: list                     # every file read, main file first
    skipped: list = dataclasses.field(default_factory=list)  # *.conf unread


# -- GKeyFile ----------------------------------------------------------------

def _is_group_name(name):
    return bool(name) and not any(c in "[]" or ord(c) < 32 or ord(c) == 127
                                  for c in name)


_KEY = re.compile(r"[^=\[\]]+(\[[\w.@-]*\])?\Z")


def _is_key_name(key):
    return (bool(_KEY.match(key)) and not key.startswith(" ")
            and not key.split("[")[0].endswith(" "))


def parse_keyfile(text, path="<config>"):
    """[(group, {key: raw value})] in the order groups first appear."""
    groups, current, first = {}, None, None
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if number < len(lines) and line.endswith("\r"):
            line = line[:-1]
        line = line.split("\0", 1)[0].lstrip(_SPACE)
        where = "%s:%d" % (path, number)
        if not line or line.startswith("#"):
            continue
        m = re.match(r"\[([^\]]*)\][ \t]*\Z", line)
        if m:
            if not _is_group_name(m.group(1)):
                raise NbdConfigError("%s: invalid group name: %s"
                                     % (where, m.group(1)))
            current = groups.setdefault(m.group(1), {})
            if first is None:
                first = current
            continue
        if "=" not in line or line.startswith("="):
            raise NbdConfigError("%s: line %r is not a key-value pair, "
                                 "group, or comment" % (where, line))
        if current is None:
            raise NbdConfigError("%s: key file does not start with a group"
                                 % where)
        key, value = line.split("=", 1)
        key = key.rstrip(_SPACE)
        if not _is_key_name(key):
            raise NbdConfigError("%s: invalid key name: %s" % (where, key))
        value = value.lstrip(_SPACE)
        if (current is first and key == "Encoding"
                and value.lower() != "utf-8"):
            raise NbdConfigError("%s: unsupported encoding %s" % (where, value))
        current[key] = value
    return list(groups.items())


def unescape(raw):
    out, chars = [], iter(raw)
    for c in chars:
        if c != "\\":
            out.append(c)
            continue
        n = next(chars, None)
        if n not in _ESCAPES:
            raise ValueError("invalid escape sequence \\%s" % (n or ""))
        out.append(_ESCAPES[n])
    return "".join(out)


_INT = re.compile(r"[+-]?[0-9]+(?=[ \t\n\r\f\v]|\Z)")
_RANGE = {INT: 1 << 31, INT64: 1 << 63}


def typed(kind, raw):
    """raw as g_key_file_get_string/boolean/integer/int64 reads it, or
    ValueError."""
    if kind == STR:
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("value is not UTF-8")
        return unescape(raw)
    if kind == BOOL:
        word = raw.rstrip(_SPACE)
        if word in ("true", "1"):
            return True
        if word in ("false", "0"):
            return False
        raise ValueError("value %r cannot be interpreted as a boolean" % raw)
    m = _INT.match(raw)
    if not m or (kind == INT64 and m.end() != len(raw)):
        raise ValueError("value %r cannot be interpreted as a number" % raw)
    if not -_RANGE[kind] <= int(m.group()) < _RANGE[kind]:
        raise ValueError("value %r is out of range" % raw)
    return int(m.group())


def _section(name, raw, path, table):
    sec = Section(name, path, raw)
    for key, kind in table.items():
        if key in raw:
            try:
                sec.values[key] = typed(kind, raw[key])
            except ValueError as e:
                raise NbdConfigError("%s: could not parse %s in group %s: %s"
                                     % (path, key, name, e))
    sec.unknown = tuple(k for k in raw if k not in table)
    if table is EXPORT_KEYS and "exportname" not in sec.values:
        raise NbdConfigError("%s: could not find required value exportname "
                             "in group %s" % (path, name))
    return sec


def _load(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise NbdConfigError("cannot read %s: %s" % (path, e.strerror))
    # glib checks UTF-8 in the values it reads, not in the whole file.
    return parse_keyfile(data.decode("utf-8", "surrogateescape"), path)


def included_files(folder):
    """(read, skipped): the *.conf files of nbd-server's includedir that it
    reads, in readdir order, and those it skips (symlinks, folders)."""
    try:
        with os.scandir(folder) as it:
            names = [e for e in it if e.name.endswith(".conf")]
    except OSError as e:
        raise NbdConfigError("includedir %s: %s" % (folder, e.strerror))
    return ([e.path for e in names if e.is_file(follow_symlinks=False)],
            [e.path for e in names if not e.is_file(follow_symlinks=False)])


def read(path=DEFAULT_PATH):
    """The configuration nbd-server would run with; NbdConfigError if none."""
    groups = _load(path)
    if not groups or groups[0][0] != GENERIC:
        raise NbdConfigError("%s does not start with the [generic] group"
                             % path)
    generic = _section(GENERIC, groups[0][1], path, GENERIC_KEYS)
    exports = [_section(n, raw, path, EXPORT_KEYS) for n, raw in groups[1:]]
    files, skipped = [path], []
    folder = generic.get("includedir")
    if folder:
        included, skipped = included_files(folder)
        for name in included:
            files.append(name)
            exports += [_section(n, raw, name, EXPORT_KEYS)
                        for n, raw in _load(name)]
    return ServerConfig(path, generic, exports, files, skipped)


# -- writing -----------------------------------------------------------------

def escape(value):
    """value as a GKeyFile string that reads back as value."""
    text = value.replace("\\", "\\\\").replace("\n", "\\n") \
        .replace("\t", "\\t").replace("\r", "\\r")
    if text.startswith(" "):
        text = "\\s" + text[1:]
    return text


def format_section(name, items, comments=()):
    """One export section: ``[name]`` and ``key = value`` lines."""
    if not _is_group_name(name) or name == GENERIC:
        raise ValueError("%r cannot name an nbd-server section" % name)
    lines = ["# " + c if c else "#" for c in comments] + ["[%s]" % name]
    for key, value in items:
        if isinstance(value, bool):
            value = "true" if value else "false"
        lines.append("    %s = %s" % (key, escape(str(value))))
    return "\n".join(lines) + "\n"


# -- hook strings: printf, then /bin/sh -c -------------------------------------

def printf_escape(text):
    """text as a printf format that prints text."""
    return text.replace("%", "%%")


def printf_parts(hook):
    """(pieces, bad): hook split at each %s, with %% made %; and every other
    conversion, which printf would feed with memory that is no argument."""
    pieces, bad, cur, i = [], [], [], 0
    while i < len(hook):
        c = hook[i]
        if c != "%":
            cur.append(c)
            i += 1
            continue
        nxt = hook[i + 1:i + 2]
        if nxt == "%":
            cur.append("%")
        elif nxt == "s":
            pieces.append("".join(cur))
            cur = []
        else:
            bad.append("%" + nxt)
        i += 2
    pieces.append("".join(cur))
    return pieces, bad


# Characters no POSIX shell treats specially anywhere in a word.
_SAFE = re.compile(r"[A-Za-z0-9_@+=:,./-]")


def shell_safe(text):
    return bool(text) and all(_SAFE.match(c) or (ord(c) > 127 and
                                                 c.isprintable())
                              for c in text)


def slot_contexts(pieces):
    """How sh sees each %s: 'unquoted', 'single' or 'double' quoted."""
    state, contexts = "unquoted", []
    for n, piece in enumerate(pieces):
        i = 0
        while i < len(piece):
            c = piece[i]
            if state == "unquoted":
                if c == "\\":
                    i += 1
                elif c in "'\"":
                    state = "single" if c == "'" else "double"
            elif state == "single":
                if c == "'":
                    state = "unquoted"
            elif c == "\\":
                i += 1
            elif c == '"':
                state = "unquoted"
            i += 1
        if n < len(pieces) - 1:
            contexts.append(state)
    return contexts


def breaks(path, context):
    """True if path substituted into a word of that context would not reach
    the command as one argument, unchanged."""
    if context == "single":
        return "'" in path
    if context == "double":
        return any(c in path for c in '"$`\\')
    return not shell_safe(path)
