"""nbd-server's configuration read as nbd-server reads it, and written.

The key-file syntax is checked against glib itself (the library nbd-server
links), called through ctypes: every small file below must give the same
groups, keys and typed values, or fail where glib fails.
"""

import ctypes
import ctypes.util
import os

import pytest

from nbdsnap.hooks import nbd_config
from nbdsnap.hooks.nbd_config import BOOL, INT, INT64, STR, NbdConfigError


# -- glib, the reference ---------------------------------------------------------

class _GError(ctypes.Structure):
    _fields_ = [("domain", ctypes.c_uint32), ("code", ctypes.c_int),
                ("message", ctypes.c_char_p)]


def _glib():
    name = ctypes.util.find_library("glib-2.0")
    if not name:
        pytest.skip("glib is not installed")
    g = ctypes.CDLL(name)
    err = ctypes.POINTER(ctypes.POINTER(_GError))
    g.g_key_file_new.restype = ctypes.c_void_p
    g.g_key_file_free.argtypes = [ctypes.c_void_p]
    g.g_key_file_load_from_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                            ctypes.c_int, err]
    g.g_key_file_get_groups.restype = ctypes.POINTER(ctypes.c_char_p)
    g.g_key_file_get_groups.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    g.g_key_file_get_keys.restype = ctypes.POINTER(ctypes.c_char_p)
    g.g_key_file_get_keys.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                      ctypes.c_void_p, err]
    for name, res in (("string", ctypes.c_char_p), ("boolean", ctypes.c_int),
                      ("integer", ctypes.c_int), ("int64", ctypes.c_int64)):
        f = getattr(g, "g_key_file_get_" + name)
        f.restype = res
        f.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, err]
    return g


def _strv(p):
    out, i = [], 0
    while p[i]:
        out.append(p[i].decode("utf-8", "surrogateescape"))
        i += 1
    return out


def glib_read(path):
    """What glib makes of path: None if it refuses it, else
    {group: {key: {kind: value or "error"}}}."""
    g = _glib()
    kf = g.g_key_file_new()
    err = ctypes.POINTER(_GError)()
    try:
        # G_KEY_FILE_KEEP_COMMENTS | G_KEY_FILE_KEEP_TRANSLATIONS, as
        # nbd-server loads it.
        if not g.g_key_file_load_from_file(kf, path.encode(), 3,
                                           ctypes.byref(err)):
            return None
        result = {}
        for group in _strv(g.g_key_file_get_groups(kf, None)):
            gb = group.encode("utf-8", "surrogateescape")
            keys = _strv(g.g_key_file_get_keys(kf, gb, None,
                                               ctypes.byref(err)))
            result[group] = {}
            for key in keys:
                kb = key.encode("utf-8", "surrogateescape")
                values = {}
                for kind in (STR, BOOL, INT, INT64):
                    e = ctypes.POINTER(_GError)()
                    v = getattr(g, "g_key_file_get_" + kind)(
                        kf, gb, kb, ctypes.byref(e))
                    if e:
                        values[kind] = "error"
                    elif kind == STR:
                        values[kind] = v.decode()
                    else:
                        values[kind] = bool(v) if kind == BOOL else v
                result[group][key] = values
        return result
    finally:
        g.g_key_file_free(kf)


def ours_read(path):
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "surrogateescape")
    try:
        groups = nbd_config.parse_keyfile(text, path)
    except NbdConfigError:
        return None
    result = {}
    for group, raw in groups:
        result[group] = {}
        for key, value in raw.items():
            values = {}
            for kind in (STR, BOOL, INT, INT64):
                try:
                    values[kind] = nbd_config.typed(kind, value)
                except ValueError:
                    values[kind] = "error"
            result[group][key] = values
    return result


CASES = [
    b"[generic]\n",
    b"[generic]\n  user = nbd\n\tgroup=nbd  \n",
    b"# comment\n\n   # indented comment\n[generic]\n",
    b"[generic]\na = true\nb = false \nc = 1\nd = 0\ne = True\nf = yes\n",
    b"[generic]\na = 12\nb = 12 abc\nc = +12\nd = -3\ne = 0x10\nf = 99999999999\n"
    b"g =\nh = 012\n",
    b"[generic]\nv = a\\sb\\tc\\\\d\\ne\\rf\n",
    b"[generic]\nv = a\\qb\n",
    b"[generic]\nv = a\\;b\n",
    b"[generic]\nv = ends with \\\n",
    b"[generic]\nv = \\s leading\n",
    b"[generic]\nv =    leading and trailing   \n",
    b"[generic]\nv = crlf\r\nw = x\r\n",
    b"[generic]\nv = last line no newline\r",
    b"[a]\nk = 1\n[b]\nk = 2\n[a]\nk = 3\nj = 4\n",
    b"[a]\nk = 1\nk = 2\n",
    b"[a] \t\nk = v\n",
    b"[a]x\nk = v\n",
    b"[a\n",
    b"[]\n",
    b"[a[b]\n",
    b"[a b]\nk k = v\n",
    b"k = v\n[a]\n",
    b"[a]\n= v\n",
    b"[a]\nno equals sign\n",
    b"[a]\nk[de] = v\nk[] = w\n",
    b"[a]\nk [de] = v\n",
    b"[a]\nk] = v\n",
    b"[a]\nv = \xff\n# \xfe in a comment\n",
    b"[a]\nEncoding = latin1\n",
    b"[a]\n[b]\nEncoding = latin1\n",
    b"[a]\nprerun = /usr/bin/nbd-prerun %s\npostrun = x '%s' \"%s\"\n",
    b"",
    b"\n\n",
]


@pytest.mark.parametrize("data", CASES, ids=range(len(CASES)))
def test_key_file_reads_as_glib_reads_it(tmp_path, data):
    path = str(tmp_path / "config")
    with open(path, "wb") as f:
        f.write(data)
    assert ours_read(path) == glib_read(path)


# -- nbd-server's rules ------------------------------------------------------------

def write(folder, name, text):
    path = os.path.join(str(folder), name)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_read_generic_exports_and_includedir(tmp_path):
    inc = tmp_path / "conf.d"
    inc.mkdir()
    write(inc, "a.conf", "[a]\nexportname = /a\nreadonly = true\n"
          "[b]\nexportname = /b\n")
    write(inc, "ignored.conf.tmp", "[c]\nexportname = /c\n")
    write(inc, "c.allow", "127.0.0.1\n")
    os.symlink(os.path.join(str(inc), "a.conf"), str(inc / "link.conf"))
    (inc / "dir.conf").mkdir()
    path = write(tmp_path, "config", "[generic]\n  user = nbd\n"
                 "  includedir = %s\n[main]\n  exportname = /m\n"
                 "  readonyl = true\n" % inc)
    conf = nbd_config.read(path)
    assert conf.generic.get("user") == "nbd"
    assert [s.name for s in conf.exports] == ["main", "a", "b"]
    main, a, b = conf.exports
    assert main.get("readonly") is None and main.unknown == ("readonyl",)
    assert a.get("readonly") is True and b.get("readonly") is None
    assert a.file == str(inc / "a.conf")
    assert conf.files == [path, str(inc / "a.conf")]
    assert sorted(conf.skipped) == [str(inc / "dir.conf"),
                                    str(inc / "link.conf")]


def test_included_files_are_not_generic_and_do_not_include(tmp_path):
    inc = tmp_path / "conf.d"
    inc.mkdir()
    write(inc, "x.conf", "[x]\nexportname = /x\nincludedir = /nowhere\n")
    path = write(tmp_path, "config", "[generic]\nincludedir = %s\n" % inc)
    (x,) = nbd_config.read(path).exports
    assert x.unknown == ("includedir",)


@pytest.mark.parametrize("text, message", [
    ("[export]\nexportname = /x\n", "does not start with the [generic]"),
    ("[generic]\n[x]\nreadonly = true\n", "required value exportname"),
    ("[generic]\n[x]\nexportname = /x\nreadonly = yes\n",
     "could not parse readonly in group x"),
    ("[generic]\nmax_threads = four\n", "could not parse max_threads"),
    ("[generic]\n[x]\nexportname = /x\nfilesize = 12 \n",
     "could not parse filesize"),
    ("[generic]\n[x]\nexportname = /x\nprerun = a\\b\n",
     "could not parse prerun"),
    ("[generic]\nincludedir = /nonexistent-nbdsnap\n",
     "includedir /nonexistent-nbdsnap"),
    ("[generic]\nnot a key value\n", "not a key-value pair"),
])
def test_what_nbd_server_refuses(tmp_path, text, message):
    with pytest.raises(NbdConfigError, match=message.replace("[", r"\[")):
        nbd_config.read(write(tmp_path, "config", text))


def test_an_unreadable_file_is_an_error(tmp_path):
    with pytest.raises(NbdConfigError, match="cannot read"):
        nbd_config.read(str(tmp_path / "missing"))


# -- writing -----------------------------------------------------------------------

def test_written_section_reads_back(tmp_path):
    items = [("exportname", "/var/lib/x.raw"), ("readonly", True),
             ("prerun", "/bin/nbd-prerun --domain 'a\\b c' %s"),
             ("postrun", " leading\ttab\nnewline")]
    text = nbd_config.format_section("dom-vda", items, ["a comment"])
    path = write(tmp_path, "config", "[generic]\n" + text)
    (sec,) = nbd_config.read(path).exports
    assert sec.name == "dom-vda"
    assert sec.values == {"exportname": "/var/lib/x.raw", "readonly": True,
                          "prerun": items[2][1], "postrun": items[3][1]}
    assert glib_read(path)["dom-vda"]["prerun"][STR] == items[2][1]


@pytest.mark.parametrize("name", ["", "a[b", "a]b", "a\nb", "generic"])
def test_section_names_nbd_server_cannot_read_are_refused(name):
    with pytest.raises(ValueError):
        nbd_config.format_section(name, [("exportname", "/x")])


# -- hook strings --------------------------------------------------------------------

@pytest.mark.parametrize("hook, pieces, bad", [
    ("/bin/nbd-prerun %s", ["/bin/nbd-prerun ", ""], []),
    ("a %% b %s c", ["a % b ", " c"], []),
    ("a %d %s", ["a  ", ""], ["%d"]),
    ("a %s %s", ["a ", " ", ""], []),
    ("100%", ["100"], ["%"]),
    ("no slot", ["no slot"], []),
])
def test_printf_parts(hook, pieces, bad):
    assert nbd_config.printf_parts(hook) == (pieces, bad)


@pytest.mark.parametrize("hook, contexts", [
    ("x %s", ["unquoted"]),
    ("x '%s'", ["single"]),
    ('x "%s"', ["double"]),
    ("x 'a'%s", ["unquoted"]),
    ("x \"it's\" %s", ["unquoted"]),
    ("x 'say \"' %s '%s'", ["unquoted", "single"]),
    ("x \\' %s", ["unquoted"]),
    ('x "\\"" "%s"', ["double"]),
])
def test_slot_contexts(hook, contexts):
    pieces, _ = nbd_config.printf_parts(hook)
    assert nbd_config.slot_contexts(pieces) == contexts


@pytest.mark.parametrize("path, context, broken", [
    ("/dev/vg0/dom1", "unquoted", False),
    ("/var/lib/images/café.raw", "unquoted", False),
    ("/var/lib/a b.raw", "unquoted", True),
    ("/var/lib/a*.raw", "unquoted", True),
    ("/var/lib/a$b.raw", "unquoted", True),
    ("/var/lib/a;b", "unquoted", True),
    ("/var/lib/a b.raw", "single", False),
    ("/var/lib/it's.raw", "single", True),
    ("/var/lib/a b.raw", "double", False),
    ("/var/lib/a$b.raw", "double", True),
])
def test_breaks(path, context, broken):
    assert nbd_config.breaks(path, context) is broken
