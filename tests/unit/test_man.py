"""The man pages build without warnings and name every option --help has."""

import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

docutils_core = pytest.importorskip("docutils.core")

MAN = os.path.join(os.path.dirname(__file__), "..", "..", "man")
PAGES = sorted(glob.glob(os.path.join(MAN, "*.rst")))

COMMANDS = {
    "nbd-prerun.8": [["nbdsnap.hooks.cli", "prerun_main"]],
    "nbd-postrun.8": [["nbdsnap.hooks.cli", "postrun_main"]],
    "nbdsnap.8": [["nbdsnap.hooks.cli", "nbdsnap_main", "status"],
                  ["nbdsnap.hooks.cli", "nbdsnap_main", "recover"],
                  ["nbdsnap.hooks.cli", "nbdsnap_main", "libvirt-hook"],
                  ["nbdsnap.hooks.cli", "nbdsnap_main", "history"],
                  ["nbdsnap.hooks.cli", "nbdsnap_main", "metrics"],
                  ["nbdsnap.hooks.cli", "nbdsnap_main", "export"],
                  ["nbdsnap.hooks.cli", "nbdsnap_main", "lint"],
                  ["nbdsnap.hooks.cli", "nbdsnap_main", "certs"]],
    "nbd-verify.1": [["nbdsnap.verify.cli", "main", "digest"],
                     ["nbdsnap.verify.cli", "main", "compare"],
                     ["nbdsnap.verify.cli", "main", "check"]],
    "nbd-pull.1": [["nbdsnap.pull.cli", "main"]],
}


def build(page):
    import docutils
    # Docutils 0.22 takes the writer's name as writer=; older ones as
    # writer_name= (and 0.22 warns about that).
    writer = ({"writer": "manpage"} if docutils.__version_info__ >= (0, 22)
              else {"writer_name": "manpage"})
    with open(page, encoding="utf-8") as f:
        return docutils_core.publish_string(
            f.read(), settings_overrides={"report_level": 2, "halt_level": 2},
            **writer)


def test_there_is_a_page_for_every_command_and_the_config_file():
    names = {os.path.basename(p)[:-4] for p in PAGES}
    assert names == set(COMMANDS) | {"nbdsnap.conf.5"}


@pytest.mark.skipif(not shutil.which("groff"), reason="groff not installed")
@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_page_builds_without_warnings(page):
    roff = build(page)
    proc = subprocess.run(["groff", "-ww", "-z", "-man"], input=roff,
                          capture_output=True)
    assert proc.returncode == 0 and proc.stderr == b""


def help_options(module, func, *sub):
    """The options --help lists (its option column), short and long.

    --help must exit 0 and print a usage: an import error or a crash
    prints nothing, which would otherwise pass as "no options".
    """
    code = ("import sys; from %s import %s as m; sys.argv[0] = 'x'; "
            "m(%r)" % (module, func, list(sub) + ["--help"]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True)
    assert proc.returncode == 0, (module, func, sub, proc.stderr)
    assert proc.stdout.startswith("usage: "), (module, func, sub)
    options = set()
    for line in proc.stdout.splitlines():
        column = re.match(r"  (-\S.*?)(?:\s{2,}|$)", line)
        if column:
            options.update(OPTION.findall(column.group(1)))
    assert options, (module, func, sub)
    return options


OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
SELF_EVIDENT = {"-h", "--help"}


def read_page(page):
    with open(os.path.join(MAN, page + ".rst"), encoding="utf-8") as f:
        return f.read()


def declared_options(text):
    """Options on the page's unindented lines: the synopsis and the terms
    of OPTIONS and COMMANDS, where a page says what a command takes (its
    indented prose may name another command's options)."""
    found = set()
    for line in text.splitlines():
        if line.startswith(("**", "| **", "*")):
            found.update(re.findall(r"\*\*(--?[A-Za-z][\w-]*)\*\*", line))
    return found


def page_help_options(page):
    options = set()
    for module, func, *sub in COMMANDS[page]:
        options |= help_options(module, func, *sub)
    return options


@pytest.mark.parametrize("page", sorted(COMMANDS))
def test_page_names_every_option_of_help(page):
    text = read_page(page)
    for option in page_help_options(page) - SELF_EVIDENT:
        assert "**%s**" % option in text, (page, option)


@pytest.mark.parametrize("page", sorted(COMMANDS))
def test_every_option_the_page_declares_is_in_help(page):
    declared = declared_options(read_page(page))
    assert declared, page
    assert declared - page_help_options(page) == set(), page


def test_help_of_an_unimportable_command_fails_the_check():
    with pytest.raises(AssertionError):
        help_options("nbdsnap.hooks.no_such_module", "main")


def test_every_setting_is_documented_and_every_documented_one_exists():
    from nbdsnap.hooks import config
    fields = {f.name for f in dataclasses.fields(config.Config)} - {"path"}
    text = read_page("nbdsnap.conf.5")
    documented = set(re.findall(r"^\*\*(\w+)\*\* = ", text, re.M))
    assert documented == fields


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def test_every_document_the_code_and_docs_cite_is_in_the_repository():
    files = glob.glob(os.path.join(ROOT, "*.md"))
    for folder in ("docs", "hooks", "verify", "pull", "lab", "man",
                   "contrib"):
        files += glob.glob(os.path.join(ROOT, folder, "**", "*.*"),
                           recursive=True)
    cited = {}
    for path in files:
        if path.endswith((".py", ".md", ".rst", ".in")):
            with open(path, encoding="utf-8") as f:
                # The project's documents are named in capitals
                # (README.md); doc/proto.md is nbd's own.
                for name in re.findall(
                        r"(?<![\w/.-])((?:[\w-]+/)*[A-Z][A-Z0-9_]*\.md)\b",
                        f.read()):
                    cited.setdefault(name, path)
    assert "docs/DESIGN.md" in cited
    missing = {name: os.path.relpath(path, ROOT)
               for name, path in cited.items()
               if not os.path.exists(os.path.join(ROOT, name))}
    assert missing == {}


def test_the_docs_say_what_a_manifests_checksum_does_not_prove():
    # Until TLS (nbds://) is supported, the checksum only detects damage.
    page = " ".join(read_page("nbd-verify.1").split())
    assert "it proves nothing against someone on the network" in page
    assert "SECURITY\n========" in read_page("nbd-verify.1")
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = " ".join(f.read().split())
    assert "not a signature, and `nbd://` is plain TCP without TLS" in readme


def test_the_readmes_nbd_pull_lines_are_what_nbd_pull_accepts():
    from nbdsnap.pull import cli
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = [line.split("nbd-pull ", 1)[1] for line in f
                 if re.match(r"[\d*]+ .* root nbd-pull ", line)]
    assert lines, "the README's cron line for nbd-pull is gone"
    for line in lines:
        args = cli.build_parser().parse_args(line.split())
        assert len(args.pairs) % 2 == 0
        assert all(p.startswith(("nbd://", "nbds://"))
                   for p in args.pairs[::2])


def test_the_args_files_shown_are_what_nbd_pull_reads(tmp_path):
    """The README's NAME.args and the example the package ships, read as
    nbd-pull@NAME.service reads them: nbd-pull @FILE."""
    from nbdsnap.pull import cli
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    shown = re.search(r"`/etc/nbdsnap/pull/dom1\.args`:\n\n```\n(.*?)```",
                      readme, re.S)
    assert shown, "the README's dom1.args is gone"
    path = tmp_path / "dom1.args"
    path.write_text(shown.group(1))
    examples = [str(path), os.path.join(ROOT, "contrib",
                                        "nbd-pull.args.example")]
    for example in examples:
        args = cli.build_parser().parse_args(["@" + example])
        assert args.pairs and len(args.pairs) % 2 == 0
        assert all(p.startswith(("nbd://", "nbds://"))
                   for p in args.pairs[::2])
        assert args.define
    unit = open(os.path.join(ROOT, "contrib", "nbd-pull@.service.in")).read()
    assert "ExecStart=@BINDIR@/nbd-pull @@ARGSDIR@/%i.args\n" in unit
