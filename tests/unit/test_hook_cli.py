"""nbdsnap.hooks.cli and watchdog: exit statuses, the watchdog's bounds."""

import logging
import os
import subprocess
import sys

import pytest

from nbdsnap.hooks import cli, config, watchdog


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


# -- the watchdog's bounds -------------------------------------------------------

def settings(**kw):
    return config.Config(**dict(dict(lock_timeout=120, quiesce_timeout=10,
                                     digest_timeout=600,
                                     commit_timeout=600), **kw))


# A commit's fixed waits: the digest stopped (2 x 5 s), a libvirt job's end
# (60 s + libvirt's 30 s), a block job left (60 s), qemu-img info (60 s) and
# its image locks (30 s).
FIXED = 2 * 5 + 60 + 30 + 60 + 60 + 30


@pytest.mark.parametrize("prog,stale,seconds", [
    # disk lock + domain lock + ping, fsfreeze-status, freeze, thaw + the
    # previous bitmap's read (digest = on) + margin
    ("nbd-prerun", "refuse", 120 + 120 + 4 * 10 + 70 + 300),
    # ... + the stale session's commit first: digest, commit, domain lock
    ("nbd-prerun", "recover",
     120 + 120 + 4 * 10 + 70 + 300 + 600 + FIXED + 600 + 120),
    # disk lock + digest + fixed waits + commit + domain lock + margin
    ("nbd-postrun", "refuse", 120 + 600 + FIXED + 600 + 120 + 300),
    ("nbd-postrun", "recover", 120 + 600 + FIXED + 600 + 120 + 300),
])
def test_watchdog_seconds(prog, stale, seconds):
    assert FIXED == 250
    assert watchdog.seconds(settings(stale=stale), prog) == seconds


def test_the_watchdogs_fixed_waits_are_the_waiting_modules_own():
    from nbdsnap.hooks import bitmaps, digest, plan, qemu_img, virt
    assert (watchdog.STOP_GRACE, watchdog.JOB_WAIT, watchdog.CANCEL_WAIT,
            watchdog.QEMU_IMG_INFO, watchdog.QEMU_IMG_LOCKS) == (
        digest.STOP_GRACE, plan.JOB_WAIT, virt.CANCEL_WAIT,
        qemu_img.INFO_WAIT, qemu_img.LOCK_WAIT)
    assert watchdog.MAP_READ == bitmaps.NBD_TIMEOUT + bitmaps.TEARDOWN_WAIT


def test_a_group_counts_a_commit_and_a_map_read_for_each_disk():
    one = settings(stale="recover")
    for prog, each in (("nbd-postrun", 600 + FIXED + 600 + 120),
                       ("nbd-prerun", 70 + 600 + FIXED + 600 + 120)):
        assert (watchdog.seconds(one, prog, 3) - watchdog.seconds(one, prog)
                == 2 * each)


def test_extend_rearms_from_the_first_arming(monkeypatch):
    timers = []

    class Timer:
        def __init__(self, limit, what):
            self.limit = limit
            self.cancelled = False
            self.daemon = False
            timers.append(self)

        def start(self):
            pass

        def cancel(self):
            self.cancelled = True
    now = [100.0]
    monkeypatch.setattr(watchdog.threading, "Timer", Timer)
    monkeypatch.setattr(watchdog.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(watchdog, "_armed", {})
    watchdog.extend("nbd-prerun", 900)          # never armed: nothing
    assert timers == []
    watchdog.arm("nbd-prerun", 600)
    now[0] = 130.0
    watchdog.extend("nbd-prerun", 900)
    assert [t.limit for t in timers] == [600, 870]
    assert [t.cancelled for t in timers] == [True, False]


def test_digest_off_freezes_without_the_map_read():
    assert (watchdog.seconds(settings(), "nbd-prerun")
            - watchdog.seconds(settings(digest=False), "nbd-prerun")
            == watchdog.MAP_READ)


@pytest.mark.parametrize("kw", [
    {}, {"commit_timeout": 7200}, {"digest_timeout": 3600},
    {"lock_timeout": 1}, {"quiesce_timeout": 60}])
def test_a_prerun_that_recovers_outlasts_the_commit_it_finishes(kw):
    # Shorter, and every client would restart the same commit and be
    # refused when the watchdog ends it.
    c = settings(stale="recover", **kw)
    assert (watchdog.seconds(c, "nbd-prerun")
            > watchdog.seconds(c, "nbd-postrun")
            + 4 * c.quiesce_timeout)


@pytest.mark.parametrize("main,prog", [(cli.prerun_main, "nbd-prerun"),
                                       (cli.postrun_main, "nbd-postrun")])
def test_the_hooks_arm_the_watchdog_with_these_bounds(monkeypatch, tmp_path,
                                                      main, prog):
    path = tmp_path / "recover.conf"
    path.write_text("[nbdsnap]\nstale = recover\nlock_timeout = 30\n"
                    "commit_timeout = 1000\ndigest_timeout = 100\n"
                    "quiesce_timeout = 5\n")
    monkeypatch.setenv("NBDSNAP_CONFIG", str(path))
    armed = []
    monkeypatch.setattr(watchdog, "arm", lambda p, s: armed.append((p, s)))

    class Freezer:
        def __init__(self, config):
            pass

        def prerun(self, export, **kw):
            pass

        def postrun(self, export):
            pass
    from nbdsnap.hooks import freeze, release
    monkeypatch.setattr(freeze, "Freezer", Freezer)
    monkeypatch.setattr(release, "Releaser", Freezer)
    assert main(["/srv/x"]) == 0
    expected = {"nbd-prerun": 30 + 30 + 4 * 5 + 70 + 300 + 100 + FIXED + 1000
                + 30,
                "nbd-postrun": 30 + 100 + FIXED + 1000 + 30 + 300}
    assert armed == [(prog, expected[prog])]


# -- a reader that goes away ---------------------------------------------------

RECOVER_WITHOUT_LIBVIRT = """
import os, sys
os.geteuid = lambda: 0
from nbdsnap.hooks import cli, virt
class Conn:
    def close(self):
        pass
virt.connect = lambda *a, **kw: Conn()
virt.all_domains = lambda conn: []
sys.exit(cli.nbdsnap_main(["recover", "--all"]))
"""


def test_recover_into_a_closed_pipe_recovers_every_disk(tmp_path):
    """nbdsnap recover | head -1: the reader is gone before the first line;
    every stale session is still recovered, the status still says so."""
    from nbdsnap.hooks import freeze, procs, sessions
    store = freeze.Freezer(config.load()).store
    store.prepare()
    gone = procs.Holder(pid=1, start=-1, boot=procs.boot_id())
    keys = ["k-%d-1" % n for n in range(5)]
    for key in keys:
        store.save(sessions.new_session(key, "/srv/%s" % key, "dom1", "U",
                                        "vda", "/srv/b", sessions.OFFLINE,
                                        gone))
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-c", RECOVER_WITHOUT_LIBVIRT],
                              stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    finally:
        os.close(write)
    assert proc.stderr == "" and proc.returncode == 0
    assert [store.load(key) for key in keys] == [None] * 5


# -- metrics_file --------------------------------------------------------------

class _Refusing:
    def __init__(self, config):
        pass

    def prerun(self, export, **kw):
        from nbdsnap.hooks.errors import Refused
        raise Refused("refused for the test")

    postrun = prerun


def _hooks_with_metrics_file(monkeypatch, tmp_path, where, work):
    """A configuration naming metrics_file where; work does the hooks'."""
    path = tmp_path / "metrics.conf"
    path.write_text("[nbdsnap]\nstate_dir = %s\nsnapshot_dir = %s\n"
                    "syslog_socket = %s\nmetrics_file = %s\n" % (
                        tmp_path / "state", tmp_path / "overlays",
                        tmp_path / "no-syslog", where))
    monkeypatch.setenv("NBDSNAP_CONFIG", str(path))
    monkeypatch.setattr(watchdog, "arm", lambda p, s: None)
    from nbdsnap.hooks import freeze, release
    monkeypatch.setattr(freeze, "Freezer", work)
    monkeypatch.setattr(release, "Releaser", work)


@pytest.mark.parametrize("main", [cli.prerun_main, cli.postrun_main])
def test_a_hook_writes_metrics_file_even_when_it_fails(monkeypatch, tmp_path,
                                                       main):
    prom = tmp_path / "nbdsnap.prom"
    _hooks_with_metrics_file(monkeypatch, tmp_path, prom, _Refusing)
    assert main(["/srv/x"]) == 1
    assert 'nbdsnap_sessions{verdict="live"} 0\n' in prom.read_text()
    assert os.stat(prom).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("where", ["relative.prom", "/nonexistent/x.prom"])
@pytest.mark.parametrize("main", [cli.prerun_main, cli.postrun_main])
def test_a_metrics_file_never_fails_a_hook(monkeypatch, tmp_path, capsys,
                                           main, where):
    class Fine(_Refusing):
        def prerun(self, export, **kw):
            pass

        postrun = prerun
    _hooks_with_metrics_file(monkeypatch, tmp_path, where, Fine)
    assert main(["/srv/x"]) == 0
    assert "cannot write the metrics to %s" % where in capsys.readouterr().err
