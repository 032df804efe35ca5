"""nbdsnap lint's TLS findings (lint_tls) on small configurations, and
export --tls's sections linted clean.

Files are looked at through a fake stat() and a fake readability check,
so that ownership and modes need no root; lint() itself runs on real
files with only the owner faked.
"""

import os
import stat
import subprocess
import time
import types

import pytest

from nbdsnap.hooks import export, lint, lint_tls, nbd_config

from test_lint import KEYS, is_overlay, make_host

TLS = {"certfile": "/tls/server-cert.pem", "keyfile": "/tls/server-key.pem",
       "cacertfile": "/tls/ca-cert.pem"}


def section(name="vm", raw=None, **values):
    raw = dict(raw or {}, **{k: str(v) for k, v in values.items()})
    return nbd_config.Section(name, "/c", raw, values)


def fstat(mode=0o600, uid=0, kind=stat.S_IFREG):
    return types.SimpleNamespace(st_mode=kind | mode, st_uid=uid)


def files(table):
    """stat_of for {path: stat or OSError}; others do not exist."""
    def stat_of(path):
        found = table.get(path, FileNotFoundError(2, "No such file or "
                                                     "directory"))
        if isinstance(found, OSError):
            raise found
        return found
    return stat_of


@pytest.mark.parametrize("addr, only", [
    (None, False), ("", False), ("0.0.0.0", False), ("::", False),
    ("192.0.2.1", False), ("vmhost.example", False), ("127.0.0.1", True),
    ("127.0.0.53", True), ("::1", True), ("localhost", True)])
def test_loopback(addr, only):
    assert lint_tls.loopback(addr) is only


def test_a_forced_section_needs_certfile_and_keyfile():
    forced = section(force_tls=True)
    assert lint_tls.check_section(forced, section("generic", **TLS)) == []
    (found,) = lint_tls.check_section(forced, section("generic"))
    assert found.startswith("force_tls, but [generic] has no certfile or "
                            "keyfile: nbd-server")
    (found,) = lint_tls.check_section(
        forced, section("generic", certfile="/c.pem"))
    assert "has no keyfile:" in found
    # [generic]'s force_tls forces every section.
    (found,) = lint_tls.check_section(section(),
                                      section("generic", force_tls=True))
    assert "has no certfile or keyfile" in found


def test_plain_text_is_a_finding_beyond_loopback_only():
    plain = section()
    assert lint_tls.check_section(
        plain, section("generic", listenaddr="127.0.0.1")) == []
    for generic, where in ((section("generic"), "every address"),
                           (section("generic", listenaddr="0.0.0.0"),
                            "0.0.0.0")):
        (found,) = lint_tls.check_section(plain, generic)
        assert found.startswith("no force_tls and nbd-server listens on %s: "
                                "the disk crosses the network in plain text"
                                % where)
        assert "nbdsnap export --tls" in found


def test_tlsonly_is_named_and_not_an_unknown_option(tmp_path):
    path = tmp_path / "config"
    path.write_text("[generic]\nlistenaddr = 127.0.0.1\ntlsonly = true\n"
                    "colour = blue\n[vm]\nexportname = /x\ntlsonly = true\n")
    conf = nbd_config.read(str(path))
    (sec,) = conf.exports
    (found,) = lint_tls.check_section(sec, conf.generic)
    assert found.startswith("tlsonly is ignored by nbd-server 3.24: a "
                            "plain-text client still connects")
    assert lint_tls.unknown(sec) == []
    assert lint_tls.unknown(conf.generic) == ["colour"]
    assert lint_tls.used(conf)
    (found,) = lint_tls.check_generic(conf.generic, files({}))
    assert found.startswith("tlsonly is ignored by nbd-server 3.24")


def test_good_files_have_no_finding():
    table = {p: fstat() for p in TLS.values()}
    table["/tls/ca-key.pem"] = fstat()
    assert lint_tls.check_generic(section("generic", **TLS), files(table),
                                  readable=lambda p: None) == []


def test_certfile_without_cacertfile_refuses_every_client():
    generic = section("generic", **dict(TLS, cacertfile=None))
    del generic.values["cacertfile"]
    (found,) = lint_tls.check_generic(
        generic, files({p: fstat() for p in TLS.values()}),
        readable=lambda p: None)
    assert found.startswith("certfile without cacertfile: nbd-server 3.24 "
                            "drops every TLS client in the handshake")


def test_missing_odd_and_unreadable_files():
    table = {TLS["certfile"]: fstat(kind=stat.S_IFDIR, mode=0o700),
             TLS["keyfile"]: fstat()}
    found = lint_tls.check_generic(
        section("generic", **TLS), files(table),
        readable=lambda p: "Permission denied")
    assert found == [
        "certfile /tls/server-cert.pem is not a regular file",
        "keyfile /tls/server-key.pem cannot be read (Permission denied): "
        "every TLS handshake fails",
        "cacertfile /tls/ca-cert.pem: No such file or directory: "
        "every TLS handshake fails"]


def test_keys_others_can_read_or_that_are_not_roots():
    table = {p: fstat() for p in TLS.values()}
    table[TLS["keyfile"]] = fstat(mode=0o644, uid=1000)
    table["/tls/ca-key.pem"] = fstat(mode=0o640)
    found = lint_tls.check_generic(section("generic", **TLS), files(table),
                                   readable=lambda p: None)
    assert found == [
        "keyfile /tls/server-key.pem is owned by uid 1000, not root: that "
        "user can pose as this VM host",
        "keyfile /tls/server-key.pem is mode 644: group and others can read "
        "it and pose as this VM host; chmod 600",
        "the CA's key /tls/ca-key.pem is mode 640: group and others can read "
        "it and sign a client certificate nbd-server accepts; chmod 600"]
    # A certificate is public: its mode is no finding.
    table = {p: fstat(mode=0o644) for p in TLS.values()}
    table[TLS["keyfile"]] = fstat()
    assert lint_tls.check_generic(section("generic", **TLS), files(table),
                                  readable=lambda p: None) == []


def test_export_tls_sections_lint_clean(tmp_path, golden):
    """export --tls with the files nbdsnap certs makes, on every address:
    no finding; the same sections without --tls: one each."""
    tls = tmp_path / "tls"
    tls.mkdir()
    generic = ""
    for key, name in (("certfile", "server-cert.pem"),
                      ("keyfile", "server-key.pem"),
                      ("cacertfile", "ca-cert.pem"), (None, "ca-key.pem")):
        (tls / name).write_text("PEM\n")
        os.chmod(tls / name, 0o600)
        generic += "%s = %s\n" % (key, tls / name) if key else ""
    (tmp_path / "dom-two.allow").write_text("192.0.2.1\n")
    disks = export.choose(golden("two_disks"), [], is_overlay)
    group = export.together(disks)

    def linted(tls_on):
        parts = export.sections("dom-two", disks, "dom-two", "/bin",
                                str(tmp_path / "dom-two.allow"),
                                str(tmp_path / "m"), group=group,
                                tls=tls_on)
        text = export.render("dom-two", parts, ["192.0.2.1"],
                             str(tmp_path / "dom-two.allow"), group, tls_on)
        (tmp_path / "config").write_text("[generic]\n" + generic + text)
        conf = nbd_config.read(str(tmp_path / "config"))
        return text, conf, lint.lint(
            conf, make_host(golden), key_of=KEYS.get, find=lambda p, m: True,
            stat_of=lambda p: types.SimpleNamespace(
                st_mode=os.stat(p).st_mode, st_uid=0))

    text, conf, found = linted(True)
    assert [s.name for s in conf.exports] == [
        "dom-two-vda", "dom-two-vda.manifest", "dom-two-vdb",
        "dom-two-vdb.manifest"]
    assert all(s.get("force_tls") is True for s in conf.exports)
    assert "# TLS only (force_tls)" in text
    assert found == []
    text, conf, found = linted(False)
    assert "# Plain text (no --tls)" in text
    assert not any(s.get("force_tls") for s in conf.exports)
    assert [s for s, _ in found] == ["dom-two-vda", "dom-two-vdb",
                                     "dom-two-vda.manifest",
                                     "dom-two-vdb.manifest"]
    assert all("no force_tls and nbd-server listens on every address"
               in f for _, f in found)
    assert all("the manifest crosses the network in plain text" in f
               for s, f in found if s.endswith(".manifest"))


NOW = 1_800_000_000


@pytest.mark.parametrize("days, said", [
    (-1, "certfile /c.pem expired on 2027-01-14: every TLS handshake "
         "fails; renew it"),
    (0, "certfile /c.pem expired on 2027-01-15: every TLS handshake "
        "fails; renew it"),
    (10, "certfile /c.pem expires on 2027-01-25, in 10 days: then every "
         "TLS handshake fails; renew it"),
    (29.5, "certfile /c.pem expires on 2027-02-13, in 29 days"),
    (30, None), (800, None)])
def test_a_certificate_near_its_end(days, said):
    found = lint_tls.expiry("certfile", "/c.pem", NOW + days * 86400, NOW)
    if said is None:
        assert found == []
    else:
        (line,) = found
        assert line.startswith(said)
    assert lint_tls.expiry("certfile", "/c.pem", None, NOW) == []


def test_an_expiring_ca_asks_for_a_new_one():
    (line,) = lint_tls.expiry("cacertfile", "/ca.pem", NOW + 86400, NOW)
    assert line.endswith("make a new CA (nbdsnap certs in a new folder) "
                         "and give every clone host its folder")


def test_real_certificates_are_read_by_openssl(tmp_path):
    """A certificate made for 5 days: lint says when; the key is no
    certificate and has no end; a file that is none has none either."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "5",
                    "-subj", "/CN=vmhost", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True)
    os.chmod(key, 0o600)
    end = lint_tls._not_after(str(cert))
    assert 4.9 * 86400 < end - time.time() <= 5 * 86400
    assert lint_tls._not_after(str(key)) is None
    generic = section("generic", certfile=cert, keyfile=key,
                      cacertfile=cert)
    found = lint_tls.check_generic(generic, stat_of=lambda p: fstat())
    assert [f.split(" expires on ")[0] for f in found] == [
        "certfile %s" % cert, "cacertfile %s" % cert]
    assert all(", in 4 days: then every TLS handshake fails" in f
               for f in found)
