"""The man pages build without warnings and name every option --help has."""

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
                  ["nbdsnap.hooks.cli", "nbdsnap_main", "export"],
                  ["nbdsnap.hooks.cli", "nbdsnap_main", "lint"]],
    "nbd-verify.1": [["nbdsnap.verify.cli", "main", "digest"],
                     ["nbdsnap.verify.cli", "main", "compare"],
                     ["nbdsnap.verify.cli", "main", "check"]],
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
    code = ("import sys; from %s import %s as m; sys.argv[0] = 'x'; "
            "m(%r)" % (module, func, list(sub) + ["--help"]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True).stdout
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", out)) - {"--help"}


@pytest.mark.parametrize("page", sorted(COMMANDS))
def test_page_names_every_option_of_help(page):
    with open(os.path.join(MAN, page + ".rst"), encoding="utf-8") as f:
        text = f.read()
    for module, func, *sub in COMMANDS[page]:
        for option in help_options(module, func, *sub):
            assert "**%s**" % option in text, (page, option)
