"""nbdsnap lint on small real configuration files, and export's sections.

libvirt is replaced by golden domain XML and stat() by a dict (as in
test_locate): lint.lint() takes them in a Host.  export's sections are
checked by what nbd-server and /bin/sh make of them, and by lint.
"""

import os
import shlex
import subprocess

import pytest

from nbdsnap.hooks import export, lint, nbd_config, served, sessions
from nbdsnap.hooks.errors import ConfigError, NotFound, Unsupported

IMAGES = "/var/lib/libvirt/images/"
OVERLAYS = "/var/lib/nbdsnap/overlays/"
BIN = "/opt/nbdsnap/bin/"
KEYS = {IMAGES + "dom1.raw": "f-1", IMAGES + "dom-two-root.raw": "f-2",
        "/dev/loop4": "b-7-4", IMAGES + "dom1.before-upgrade": "f-3",
        IMAGES + "loose.raw": "f-9",
        IMAGES + "debian-12.5.0-amd64-netinst.iso": "f-4"}
HOOKS = ("    prerun = %snbd-prerun %%s\n    postrun = %snbd-postrun %%s\n"
         % (BIN, BIN))


def is_overlay(path):
    return path is not None and path.startswith(OVERLAYS + "nbdsnap-")


def make_host(golden, names=("file_raw", "two_disks"), verdict=None,
              **kw):
    fields = dict(domains=[golden(n) for n in names], version=9000000,
                  drivers=["dac"], apparmor=False, is_overlay=is_overlay,
                  verdict=verdict or (lambda key: None))
    fields.update(kw)
    return lint.Host(**fields)


@pytest.fixture
def run_lint(tmp_path, golden):
    allow = tmp_path / "allow"
    allow.write_text("192.0.2.7\n10.0.0.0/8  # the clone hosts\n")

    def run(body, generic="", host=None, listen="127.0.0.1", **kw):
        path = tmp_path / "config"
        if listen:
            generic = "    listenaddr = %s\n%s" % (listen, generic)
        path.write_text("[generic]\n%s%s" % (generic, body.replace(
            "AUTH", "    authfile = %s\n" % allow)))
        conf = nbd_config.read(str(path))
        return lint.lint(conf, host or make_host(golden, **kw),
                         key_of=KEYS.get, find=lambda p, m: p.startswith(BIN))
    return run


def test_a_good_section_has_no_finding(run_lint):
    assert run_lint("[dom1-vda]\n    exportname = %sdom1.raw\n"
                    "    readonly = true\nAUTH%s" % (IMAGES, HOOKS)) == []


def test_findings_of_the_section_itself(run_lint):
    found = run_lint(
        "[w]\n    exportname = %sdom1.raw\n    copyonwrite = true\n"
        "    readonyl = true\n    prerun = nbd-prerun %%s 100%%\n" % IMAGES)
    text = "\n".join(f for _, f in found)
    assert {s for s, _ in found} == {"w"}
    for words in ("not read-only", "copyonwrite is on", "no authfile",
                  "bare % (%)", "runs nbd-prerun by name",
                  "postrun is not nbd-postrun", "unknown option readonyl"):
        assert words in text, words
    assert len(found) == 7


def test_postrun_without_prerun_and_hooks_without_slots(run_lint):
    found = run_lint("[x]\n    exportname = %sdom1.raw\n    readonly = true\n"
                     "AUTH    postrun = %snbd-postrun\n" % (IMAGES, BIN))
    assert [f for _, f in found] == [
        "postrun has no %s: nbd-postrun gets no export path",
        "postrun is nbd-postrun but prerun is not nbd-prerun: nothing "
        "freezes the disk, clients copy it while the domain writes it"]


def test_split_only_where_the_shell_would_split(run_lint, golden):
    spaced = IMAGES + "my disk.raw"
    KEYS[spaced] = "f-1"
    try:
        quoted = run_lint("[q]\n    exportname = %s\n    readonly = true\nAUTH"
                          "    prerun = %snbd-prerun '%%s'\n"
                          "    postrun = %snbd-postrun \"%%s\"\n"
                          % (spaced, BIN, BIN))
        bare = run_lint("[b]\n    exportname = %s\n    readonly = true\nAUTH%s"
                        % (spaced, HOOKS))
    finally:
        del KEYS[spaced]
    assert quoted == []
    assert [f.split(":")[0] for _, f in bare] == ["prerun", "postrun"]
    assert "splits or interprets exportname %s" % spaced in bare[0][1]


def test_virtstyle_and_several_slots(run_lint):
    found = run_lint("[v]\n    exportname = /srv/%%s.raw\n    readonly = true"
                     "\nAUTH    prerun = %snbd-prerun %%s %%s\n"
                     "    postrun = %snbd-postrun %%s\n" % (BIN, BIN))
    text = [f for _, f in found]
    assert "prerun has %s 2 times" in text[0]
    assert "virtstyle is ipliteral" in text[1]


def test_domain_checks(run_lint, golden):
    found = dict(run_lint(
        "[loose]\n    exportname = %sloose.raw\n    readonly = true\nAUTH%s"
        "[gone]\n    exportname = %sgone.raw\n    readonly = true\nAUTH%s"
        "[nohooks]\n    exportname = /dev/loop4\n    readonly = true\nAUTH"
        "[named]\n    exportname = %sdom1.raw\n    readonly = true\nAUTH"
        "    prerun = %snbd-prerun --domain dom1 --disk vdb %%s\n"
        "    postrun = %snbd-postrun %%s\n"
        "[unrelated]\n    exportname = /srv/iso\n"
        % (IMAGES, HOOKS, IMAGES, HOOKS, IMAGES, BIN, BIN)))
    assert "is no disk of any libvirt domain" in found["loose"]
    assert "does not exist" in found["gone"]
    assert "is disk dom-two:vdb but has no nbdsnap hooks" in found["nohooks"]
    assert "domain dom1 has no disk vdb" in found["named"]
    assert "unrelated" not in found


@pytest.mark.parametrize("names, verdict, expect", [
    (("frozen_by_nbdsnap",), None, "that no session names"),
    (("frozen_by_nbdsnap",), sessions.STALE, "of a stale session"),
    (("frozen_by_nbdsnap",), sessions.LIVE, "right now: a client is copying"),
    (("foreign_overlay",), None, "an overlay that nbdsnap did not make"),
])
def test_overlays_now(run_lint, names, verdict, expect):
    found = run_lint("[dom1-vda]\n    exportname = %sdom1.raw\n"
                     "    readonly = true\nAUTH%s" % (IMAGES, HOOKS),
                     names=names, verdict=lambda key: verdict)
    (finding,) = found
    assert expect in finding[1]
    if verdict != sessions.LIVE and "foreign" not in names[0]:
        assert "nbdsnap recover %sdom1.raw" % IMAGES in finding[1]


def test_authfile_findings(run_lint, tmp_path):
    (tmp_path / "empty").write_text("# nobody\n\n")
    (tmp_path / "bad").write_text("10.0.0.1\nclonehost.example\n")
    body = "".join("[%s]\n    exportname = %sdom1.raw\n    readonly = true\n"
                   "    authfile = %s\n%s" % (n, IMAGES, tmp_path / n, HOOKS)
                   for n in ("empty", "bad", "missing"))
    found = {}
    for section, finding in run_lint(body, names=("file_raw",)):
        found.setdefault(section, []).append(finding)
    assert found["empty"] == ["authfile %s lists no address: nobody may "
                              "connect" % (tmp_path / "empty")]
    ((bad),) = found["bad"]
    assert "line 2: 'clonehost.example' is no address" in bad
    ((missing),) = found["missing"]
    assert "does not exist: nbd-server then lets every address in" in missing


def test_generic_findings(run_lint):
    body = "[a]\n    exportname = %sdom1.raw\n    readonly = true\nAUTH%s" % (
        IMAGES, HOOKS)
    assert run_lint(body, "    user = root\n    group = root\n") == []
    found = run_lint(body, "    user = nbd-nobody-here\n    group = root\n"
                     "    colour = blue\n")
    assert [s for s, _ in found] == ["generic", "generic"]
    assert "user = nbd-nobody-here: nbd-server runs the hooks as" in found[0][1]
    assert "unknown option colour" in found[1][1]
    assert run_lint("") == [("generic", "no export section: nbd-server "
                             "refuses to start")]


def test_no_libvirt_and_apparmor(run_lint, golden):
    body = "[a]\n    exportname = %sloose.raw\n    readonly = true\nAUTH%s" % (
        IMAGES, HOOKS)
    host = make_host(golden, domains=None, error="cannot connect")
    assert run_lint(body, host=host) == [
        ("host", "cannot connect; the domain checks were skipped")]
    host = make_host(golden, apparmor=True, drivers=["apparmor", "dac"],
                     names=("file_raw",))
    body = body.replace("loose", "dom1")
    ((section, finding),) = run_lint(body, host=host)
    assert section == "host" and "libvirt 9.0 confines QEMU" in finding
    host.version = 12001000
    assert run_lint(body, host=host) == []


@pytest.mark.parametrize("text, on, drivers", [
    ("", True, ["apparmor"]),
    ("", False, []),
    ('#security_driver = "selinux"\n', True, ["apparmor"]),
    ('security_driver = "none"\n', True, ["none"]),
    ('security_driver = [ "selinux", "apparmor" ]\n', True,
     ["selinux", "apparmor"]),
])
def test_security_drivers(text, on, drivers):
    assert lint.security_drivers(text, on) == drivers


# -- the sections of a group (lint_group) -------------------------------------

ROOT, LOOP = IMAGES + "dom-two-root.raw", "/dev/loop4"


def grouped(name, export, options):
    """A section of prerun options (after nbd-prerun, before %s)."""
    return ("[%s]\n    exportname = %s\n    readonly = true\nAUTH"
            "    prerun = %snbd-prerun %s %%s\n"
            "    postrun = %snbd-postrun %%s\n" % (name, export, BIN, options,
                                                 BIN))


def by_section(found):
    out = {}
    for section, finding in found:
        out.setdefault(section, []).append(finding)
    return out


PAIR = (grouped("a", ROOT, "--domain dom-two --disk vda --group vda,vdb")
        + grouped("b", LOOP, "--domain dom-two --disk vdb --group vda,vdb"))


def test_the_sections_of_a_group_that_agree_have_no_finding(run_lint):
    assert run_lint(PAIR) == []
    # The order of --group is not what makes one freeze.
    assert run_lint(PAIR.replace("vdb --group vda,vdb",
                                 "vdb --group=vdb,vda")) == []


@pytest.mark.parametrize("options, words", [
    ("--group vda,vdb", "prerun has --group but not --domain and --disk"),
    ("--disk vda --group vda,vdb", "not --domain and --disk"),
    ("--domain dom-two --disk vda --group vdb,vdc",
     "--group vdb,vdc does not name its --disk vda"),
    ("--domain dom-two --disk vda --group ''", "--group '' does not name"),
])
def test_a_group_that_nbd_prerun_refuses(run_lint, options, words):
    found = by_section(run_lint(grouped("a", ROOT, options),
                                host=make_host(lambda n: None, names=(),
                                               domains=None, error="off")))
    assert found.pop("host") == ["off; the domain checks were skipped"]
    assert found == {"a": [found["a"][0]]}
    assert words in found["a"][0]
    assert found["a"][0].endswith("nbd-prerun refuses every connection")


@pytest.mark.parametrize("b, words", [
    (grouped("b", LOOP, "--domain dom-two --disk vdb"),
     "section b serves disk vdb of domain dom-two without --group: a "
     "connection to it can freeze vdb alone, and this section is then "
     "refused until that freeze ends"),
    (grouped("b", LOOP, "--domain dom-two --disk vdb --group vda,vdb,vdc"),
     "section b serves disk vdb of domain dom-two with --group vda,vdb,vdc, "
     "not vda,vdb: while one of the two freezes lasts, a connection to the "
     "other can be refused"),
    ("", "no section serves disk vdb of domain dom-two, which its --group "
     "freezes with vda: no client can copy it"),
    (grouped("b", LOOP, "--domain dom1 --disk vdb --group vda,vdb"),
     "disk vdb of its --group is served by section b, whose prerun names "
     "domain dom1, not dom-two: no section serves dom-two's vdb"),
])
def test_sections_of_a_group_that_disagree(run_lint, b, words):
    a = grouped("a", ROOT, "--domain dom-two --disk vda --group vda,vdb")
    off = make_host(lambda n: None, names=(), domains=None, error="off")
    for host in (None, off):        # with libvirt and without
        found = by_section(run_lint(a + b, host=host))
        found.pop("host", None)
        assert found.pop("a") == [words]
        if "vda,vdb,vdc" in b:      # b's view of a, and of vdc
            assert [f.split(":")[0] for f in found.pop("b")] == [
                "section a serves disk vda of domain dom-two with --group "
                "vda,vdb, not vda,vdb,vdc",
                "no section serves disk vdc of domain dom-two, which its "
                "--group freezes with vdb"] + [
                    "prerun's --group names disk vdc, which domain dom-two "
                    "does not have"] * (host is None)
        if "dom1" in b:             # and b's view of a, the same disagreement
            assert "served by section a, whose prerun names domain " \
                "dom-two, not dom1" in found["b"][0]
            assert ("domain dom1 has no disk vdb" in found.pop("b")[-1]) \
                == (host is None)
        assert found == {}


def test_a_group_disk_served_by_a_section_that_searches(run_lint):
    """nbd-prerun %s with no --domain/--disk serves vdb, found by search:
    not "no section serves it", but that it freezes vdb alone."""
    a = grouped("a", ROOT, "--domain dom-two --disk vda --group vda,vdb")
    b = grouped("b", LOOP, "")
    off = make_host(lambda n: None, names=(), domains=None, error="off")
    found = by_section(run_lint(a + b, host=off))
    assert found["a"] == [
        "no section names disk vdb of domain dom-two with --domain and "
        "--disk, which its --group freezes with vda; if b serves it, found "
        "by search, it freezes vdb alone and this section is refused while "
        "that lasts"]


def test_another_domain_s_group_is_not_blamed_for_a_missing_section(
        run_lint):
    """dom1 and dom-two exported alike, dom-two's vdb section deleted:
    dom1's vdb section is right, and is not named."""
    body = (grouped("a", ROOT, "--domain dom-two --disk vda --group vda,vdb")
            + grouped("c", "/srv/c.raw", "--domain dom1 --disk vda --group "
                      "vda,vdb")
            + grouped("d", "/srv/d.raw", "--domain dom1 --disk vdb --group "
                      "vda,vdb"))
    off = make_host(lambda n: None, names=(), domains=None, error="off")
    found = by_section(run_lint(body, host=off))
    assert found["a"] == [
        "no section serves disk vdb of domain dom-two, which its --group "
        "freezes with vda: no client can copy it"]


def test_a_group_disk_the_domain_does_not_have(run_lint, monkeypatch):
    body = PAIR.replace("vda,vdb", "vda,vdb,vdz") + grouped(
        "z", "/srv/vdz.raw", "--domain dom-two --disk vdz --group "
        "vda,vdb,vdz")
    found = by_section(run_lint(body))
    for section in ("a", "b"):
        assert found[section] == [
            "prerun's --group names disk vdz, which domain dom-two does not "
            "have: nbd-prerun refuses every connection"]
    # Its exportname is missing: no domain checks.
    assert found["z"] == ["exportname /srv/vdz.raw does not exist"]
    monkeypatch.setitem(KEYS, IMAGES + "dom-net.raw", "f-6")
    monkeypatch.setitem(KEYS, IMAGES + "dom-cdrom.raw", "f-7")
    network = by_section(run_lint(grouped(
        "n", IMAGES + "dom-net.raw", "--domain dom-net --disk vda --group "
        "vda,vdb"), names=("network_nbd",)))
    assert network["n"] == [
        "no section serves disk vdb of domain dom-net, which its --group "
        "freezes with vda: no client can copy it",
        "prerun's --group names disk vdb of domain dom-net (a network disk, "
        "not a local file or block device): nbd-prerun refuses every "
        "connection"]
    cdrom = by_section(run_lint(grouped(
        "c", IMAGES + "dom-cdrom.raw", "--domain dom-cdrom --disk vda "
        "--group vda,sdb"), names=("cdrom",)))
    assert cdrom["c"][-1] == (
        "prerun's --group names disk sdb of domain dom-cdrom (a cdrom): "
        "nbd-prerun refuses every connection")


# -- export's sections ---------------------------------------------------------------

def test_choose_default_disks_and_bases(golden):
    assert export.choose(golden("two_disks"), [], is_overlay) == [
        ("vda", IMAGES + "dom-two-root.raw"), ("vdb", "/dev/loop4")]
    assert export.choose(golden("frozen_by_nbdsnap"), [], is_overlay) == [
        ("vda", IMAGES + "dom1.raw")]
    assert export.choose(golden("cdrom"), [], is_overlay) == [
        ("vda", IMAGES + "dom-cdrom.raw")]
    assert export.choose(golden("network_nbd"), [], is_overlay) == [
        ("vda", IMAGES + "dom-net.raw")]


def test_choose_a_disk_named_twice_once(golden):
    assert export.choose(golden("two_disks"), ["vdb", "vda", "vdb"],
                         is_overlay) == [
        ("vdb", "/dev/loop4"), ("vda", IMAGES + "dom-two-root.raw")]


@pytest.mark.parametrize("name, targets, error, words", [
    ("cdrom", ["sda"], Unsupported, "is a cdrom"),
    ("network_nbd", ["vdb"], Unsupported, "a network disk"),
    ("shareable_a", ["vdb"], Unsupported, "shareable"),
    ("two_disks", ["vdz"], NotFound, "has no disk vdz"),
])
def test_choose_refuses(golden, name, targets, error, words):
    with pytest.raises(error, match=words):
        export.choose(golden(name), targets, is_overlay)


def test_choose_refuses_a_path_the_shell_would_split(golden, golden_text):
    xml = golden_text("file_raw").replace("dom1.raw", "dom 1.raw")
    from nbdsnap.hooks import domxml
    with pytest.raises(Unsupported, match="' '.*symlink"):
        export.choose(domxml.parse(xml), [], is_overlay)


def argv_of(hook, path):
    """What nbd-server then /bin/sh make of a hook string for path."""
    pieces, bad = nbd_config.printf_parts(hook)
    assert len(pieces) == 2 and not bad
    return shlex.split(path.join(pieces))


@pytest.mark.parametrize("domain", ["dom1", "it's 100% mine", 'a "b" $c `d`',
                                    "back\\slash"])
def test_hooks_reach_the_entry_points_as_one_argument_each(tmp_path, domain):
    folder = tmp_path / "nb snap"
    folder.mkdir()
    for entry in ("nbd-prerun", "nbd-postrun"):
        (folder / entry).write_text("#!/bin/sh\nprintf '%s\\n' \"$0\" \"$@\"\n")
        (folder / entry).chmod(0o755)
    ((name, text),) = export.sections(domain, [("vda", "/dev/vg0/x")],
                                      "sec", str(folder), "/a.allow",
                                      group=["vda", "v 100%"])
    path = tmp_path / "config"
    path.write_text("[generic]\n" + text)
    (sec,) = nbd_config.read(str(path)).exports
    assert sec.values["exportname"] == "/dev/vg0/x"
    assert sec.values["readonly"] is True
    assert sec.values["authfile"] == "/a.allow"
    prerun = [str(folder / "nbd-prerun"), "--domain", domain, "--disk", "vda",
              "--group", "vda,v 100%", "/dev/vg0/x"]
    postrun = [str(folder / "nbd-postrun"), "/dev/vg0/x"]
    assert argv_of(sec.values["prerun"], "/dev/vg0/x") == prerun
    assert argv_of(sec.values["postrun"], "/dev/vg0/x") == postrun
    # and the real shell agrees: printf's result goes to /bin/sh -c.
    for key, argv in (("prerun", prerun), ("postrun", postrun)):
        pieces, _ = nbd_config.printf_parts(sec.values[key])
        out = subprocess.run(["/bin/sh", "-c", "/dev/vg0/x".join(pieces)],
                             capture_output=True, text=True, check=True)
        assert out.stdout.splitlines() == argv


def test_exported_sections_lint_clean(tmp_path, golden):
    folder = tmp_path / "bin"
    folder.mkdir()
    disks = export.choose(golden("two_disks"), [], is_overlay)
    group = export.together(disks)
    parts = export.sections("dom-two", disks, "dom-two", str(folder),
                            str(tmp_path / "dom-two.allow"), group=group)
    (tmp_path / "dom-two.allow").write_text("192.0.2.1\n")
    text = export.render("dom-two", parts, ["192.0.2.1"],
                         str(tmp_path / "dom-two.allow"), group)
    (tmp_path / "config").write_text("[generic]\nlistenaddr = ::1\n"
                                     + text)
    conf = nbd_config.read(str(tmp_path / "config"))
    assert [s.name for s in conf.exports] == ["dom-two-vda", "dom-two-vdb"]
    for sec in conf.exports:
        assert "--disk %s --group vda,vdb %%s" % sec.name[-3:] \
            in sec.values["prerun"]
    assert "# The disks vda, vdb are frozen together, at one instant" in text
    assert lint.lint(conf, make_host(golden), key_of=KEYS.get,
                     find=lambda p, m: True) == []


def test_one_disk_or_separate_sections_freeze_each_disk_alone(golden):
    disks = export.choose(golden("two_disks"), [], is_overlay)
    assert export.together(disks) == ["vda", "vdb"]
    assert export.together(disks, separate=True) == []
    assert export.together(disks[1:]) == []
    parts = export.sections("dom-two", disks, "d", "/bin")
    assert "--group" not in "".join(t for _, t in parts)
    assert "together" not in export.render("dom-two", parts, [], None)
    with pytest.raises(Unsupported, match="comma.*--separate"):
        export.together(disks + [("v,x", "/x")])


def test_write_file_is_atomic_and_keeps_foreign_files(tmp_path):
    path = str(tmp_path / "x.conf")
    export.write_file(path, export.MARK + "\n[a]\n")
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    export.write_file(path, export.MARK + "\n[b]\n")
    assert open(path).read() == export.MARK + "\n[b]\n"
    (tmp_path / "theirs.conf").write_text("[theirs]\n")
    with pytest.raises(Unsupported, match="--force"):
        export.write_file(str(tmp_path / "theirs.conf"), "x")
    export.write_file(str(tmp_path / "theirs.conf"), "x", force=True)
    assert sorted(os.listdir(str(tmp_path))) == ["theirs.conf", "x.conf"]


def test_write_file_into_a_missing_folder_is_a_usage_error(tmp_path):
    with pytest.raises(ConfigError, match="No such file") as e:
        export.write_file(str(tmp_path / "no" / "x.conf"), export.MARK)
    assert e.value.status == 2


def test_allow_without_output_is_refused_before_anything(monkeypatch):
    """Printed, the sections would name an authfile nothing writes, and
    nbd-server lets every address in when it is missing."""
    monkeypatch.setattr(export.virt, "connect", lambda: pytest.fail("asked"))
    printed = []
    with pytest.raises(ConfigError, match="--allow needs -o FILE") as e:
        export.run("dom1", allow=["192.0.2.1"], out=printed.append)
    assert e.value.status == 2 and printed == []
    with pytest.raises(ConfigError, match="no folder /nonexistent"):
        export.run("dom1", output="/nonexistent/dom1.conf")


def test_exported_qcow2_sections_say_what_the_copy_is(tmp_path, golden):
    parts = export.sections("clone1", [("vda", IMAGES + "clone1/top.qcow2")],
                            "clone1-vda", str(tmp_path), notes={
                                "vda": served.served_as("qcow2", "/t.qcow2")})
    (tmp_path / "config").write_text("[generic]\n" + parts[0][1])
    text = parts[0][1]
    assert text.startswith("# Clients copy the qcow2 file itself")
    assert "/t.qcow2" in text.split("[clone1-vda]")[0]
    assert [s.name for s in nbd_config.read(
        str(tmp_path / "config")).exports] == ["clone1-vda"]


def test_lint_names_a_linked_clone_export(run_lint, golden):
    top = IMAGES + "clone1/top.qcow2"
    KEYS[top] = "f-5"
    try:
        section = "[c]\n    exportname = %s\n    readonly = true\nAUTH%s" \
            % (top, HOOKS)
        found = run_lint(section, names=("file_raw", "linked_clone"),
                         info=lambda path: pytest.fail("asked qemu-img"))
        asked = run_lint(section, names=("linked_clone_inactive",),
                         info=lambda path: {"format": "qcow2",
                                            "backing-filename": "t.qcow2"})
        plain = run_lint(section, names=("linked_clone_inactive",),
                         info=lambda path: {"format": "qcow2"})
    finally:
        del KEYS[top]
    assert found == [("c", "clone1:vda: clients copy the qcow2 file itself, "
                      "which names backing file %stemplate.qcow2: the copy "
                      "holds only what differs from it and is of no use "
                      "where that file is missing" % IMAGES)]
    assert "names backing file t.qcow2" in asked[0][1]
    assert plain == []


def test_allow_address():
    assert export.allow_address(" 10.0.0.0/8 ") == "10.0.0.0/8"
    assert export.allow_address("2001:db8::1") == "2001:db8::1"
    with pytest.raises(ValueError):
        export.allow_address("clonehost.example")
