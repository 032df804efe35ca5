"""nbd-pull's command line: rates, statuses, progress, usage errors."""

import os

import pytest

from nbdsnap.pull import cli, disk, fetch, report, source, state
from nbdsnap.verify.errors import NbdError, UnknownExport


@pytest.mark.parametrize("text, rate", [
    ("100M", 100 << 20), ("1.5g", 1.5 * (1 << 30)), ("800K", 800 << 10),
    ("5000000", 5000000)])
def test_rates(text, rate):
    assert cli._rate(text) == rate


@pytest.mark.parametrize("text", ["0", "-1M", "fast", "1T", ""])
def test_bad_rates(text):
    with pytest.raises(ValueError):
        cli._rate(text)


@pytest.mark.parametrize("error, status", [
    (NbdError("gone"), 1), (source.Incomplete("x"), 1),
    (fetch.Corrupt("x"), 1), (state.Busy("x"), 1),
    (cli.Interrupted(15), 1), (disk.InUse("x"), 1),
    (UnknownExport("x"), 2), (source.NoManifest("x"), 2),
    (state.StateError("x"), 2), (OSError(28, "No space left"), 2)])
def test_statuses(error, status):
    assert cli._status(error) == status


def test_progress_is_a_true_percentage_with_the_time_left(capsys):
    now = [0.0]
    bar = report.Progress("copy.img", clock=lambda: now[0])
    now[0] = 2.0
    bar(50 << 20, 200 << 20)
    err = capsys.readouterr().err
    assert "50.0 MiB of 200.0 MiB (25%), ETA 6 s, 25.0 MiB/s" in err
    assert err.startswith("\r")


def test_source_and_copy_come_in_pairs(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["nbd://h/e"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pairs" in err[0]


def test_the_manifest_is_the_export_beside():
    assert source.manifest_uri("nbd://h:10809/vm-vda") == \
        "nbd://h:10809/vm-vda.manifest"
    assert source.manifest_uri("nbd+unix:///e?socket=/run/s") == \
        "nbd+unix:///e.manifest?socket=/run/s"
    assert source.manifest_uri("nbds://h/e?tls-certificates=/etc/c") == \
        "nbds://h/e.manifest?tls-certificates=/etc/c"


def define_jobs(monkeypatch, records, kinds=None):
    """_define over jobs whose records hold these (xml, base), the copies
    of kinds (a DiskError instance raises); standby.define recorded."""
    from types import SimpleNamespace

    from nbdsnap.pull import standby
    monkeypatch.setattr(standby, "frozen_definition", lambda r: records[r])
    kinds = kinds or {}

    def kind(path):
        if isinstance(kinds.get(path), Exception):
            raise kinds[path]
        return kinds.get(path, "file")
    monkeypatch.setattr(disk, "kind", kind)
    defined = []
    monkeypatch.setattr(standby, "define",
                        lambda *a: defined.append(a) or [])
    jobs = {("nbd://h/" + r, "/c/" + r): SimpleNamespace(
        folder=SimpleNamespace(record=r), copy="/c/" + r) for r in records}
    return jobs, defined


DOM = "<domain><name>%s</name><uuid>%s</uuid><devices/></domain>"


def test_define_refuses_disks_of_two_domains(monkeypatch):
    jobs, defined = define_jobs(monkeypatch, {
        "a": (DOM % ("db1", "u1"), "/b/a"), "b": (DOM % ("web1", "u2"),
                                                  "/b/b")})
    out = cli._define("s", "test:///", jobs, [{"status": 0}] * 2)
    assert out["status"] == 2 and "different domains: db1, web1" in \
        out["error"]
    assert defined == []


def test_define_waits_for_every_pull(monkeypatch):
    jobs, defined = define_jobs(monkeypatch, {"a": (DOM % ("d", "u"), "/b")})
    out = cli._define("s", "test:///", jobs, [{"status": 0}, {"status": 2}])
    assert out["status"] == 1 and defined == []


def test_define_says_a_copy_it_cannot_use_in_one_line(monkeypatch):
    jobs, defined = define_jobs(
        monkeypatch, {"a": (DOM % ("d", "u"), "/b")},
        {"/c/a": disk.DiskError("/c/a: not a file or block device")})
    out = cli._define("s", "test:///", jobs, [{"status": 0}])
    assert out["status"] == 2 and "not a file" in out["error"]


def test_an_args_file_is_one_argument_a_line(tmp_path):
    """What nbd-pull@NAME.service runs: @FILE, comments and blank lines
    skipped, a path with spaces whole, other arguments beside it."""
    path = tmp_path / "web1.args"
    path.write_text("# web1\n\n  --bwlimit\n50M\n"
                    "nbd://vmhost/web1-vda\n/srv/my clones/web1 vda.img\n")
    args = cli.build_parser().parse_args(["--json", "@%s" % path])
    assert args.json and args.bwlimit == 50 << 20
    assert args.pairs == ["nbd://vmhost/web1-vda",
                          "/srv/my clones/web1 vda.img"]


def test_a_missing_args_file_is_a_one_line_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["@%s" % (tmp_path / "gone.args")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gone.args" in err


@pytest.mark.parametrize("line, args", [
    ("--define web1-standby", ["--define", "web1-standby"]),
    ("  --metrics   /srv/m m.prom  ", ["--metrics", "/srv/m m.prom"]),
    ("--rescan", ["--rescan"]), ("--bwlimit=50M", ["--bwlimit=50M"]),
    ("/srv/my clones/a.img", ["/srv/my clones/a.img"]),
    ("# --define x", []), ("   ", [])])
def test_an_args_files_line(line, args):
    assert cli.args_of_line(line) == args


def test_a_units_stderr_is_the_journal_and_gets_no_syslog_copy(
        tmp_path, monkeypatch):
    with open(tmp_path / "stream", "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", "%d:%d" % (st.st_dev,
                                                        st.st_ino))
        assert report.journal(stream)
        monkeypatch.setenv("JOURNAL_STREAM", "%d:%d" % (st.st_dev,
                                                        st.st_ino + 1))
        assert not report.journal(stream)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not report.journal(stream)
