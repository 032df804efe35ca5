"""nbdsnap.hooks.cli: exit statuses and the hooks' watchdog bounds."""

import logging
import os
import subprocess
import sys

import pytest

from nbdsnap.hooks import cli, config


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """A configuration of the test's own; the root logger given back."""
    path = tmp_path / "nbdsnap.conf"
    path.write_text("[nbdsnap]\nstate_dir = %s\nsnapshot_dir = %s\n"
                    "syslog_socket = %s\n" % (tmp_path / "state",
                                              tmp_path / "overlays",
                                              tmp_path / "no-syslog"))
    monkeypatch.setenv("NBDSNAP_CONFIG", str(path))
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = saved


# -- nbdsnap needs root ----------------------------------------------------------

COMMANDS = [["status"], ["status", "--json"], ["history"],
            ["recover", "--all"], ["recover", "--dry-run", "/srv/x"],
            ["export", "dom1"], ["lint", "/nonexistent"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_nbdsnap_as_non_root_is_one_line_and_status_2(monkeypatch, capsys,
                                                      argv):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.nbdsnap_main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("nbdsnap: nbdsnap %s must run as root (the sessions, "
                   "their locks and libvirt's system connection are "
                   "root's)\n" % argv[0])


def test_help_needs_no_root():
    # --help exits before anything is read: no root, no configuration.
    code = ("import os, sys; os.geteuid = lambda: 1000; "
            "from nbdsnap.hooks.cli import nbdsnap_main; "
            "nbdsnap_main(['status', '--help'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "usage: " in proc.stdout
    assert "2 when not run as root" in proc.stdout.replace("\n", " ")


def test_status_as_root_still_exits_0(capsys):
    assert cli.nbdsnap_main(["status"]) == 0
    assert "no sessions" in capsys.readouterr().out
