"""nbdsnap.pull.metrics and nbd-pull --metrics: the clone host's metrics."""

import json
import os
import stat

from nbdsnap.pull import cli, metrics, report, state

NOW = 1_700_000_000.0
SRC = "nbd://vmhost/dom1-vda"


def samples(families):
    return {f.name: {tuple(sorted(labels.items())): value
                     for labels, value in f.samples if value is not None}
            for f in families}


def test_pulled_time_is_utc():
    assert metrics.pulled_time({"pulled": "2023-11-14T22:13:20Z"}) == NOW
    assert metrics.pulled_time({"pulled": None, "scanned": "x"}) is None
    assert metrics.pulled_time({"pulled": "yesterday"}) is None
    assert metrics.pulled_time(None) is None


def test_a_completed_pull_and_a_failed_one():
    done = {"source": SRC, "copy": "/c/a.raw", "status": 0,
            "bytes_read": 1 << 20, "seconds": 2.5}
    failed = {"source": SRC + "x", "copy": "/c/b.raw", "status": 1,
              "error": "the VM host went away"}
    got = samples(metrics.build(
        [done, failed, {"standby": "s", "status": 0}],
        {"/c/a.raw": {"pulled": "2023-11-14T22:13:20Z"},
         "/c/b.raw": {"pulled": "2023-11-14T21:13:20Z"}}, NOW + 30))
    a = (("copy", "/c/a.raw"), ("source", SRC))
    b = (("copy", "/c/b.raw"), ("source", SRC + "x"))
    assert got["pull_last_complete_timestamp_seconds"] == {a: NOW,
                                                           b: NOW - 3600}
    assert got["pull_last_complete_age_seconds"] == {a: 30, b: 3630}
    assert got["pull_last_bytes_read"] == {a: 1 << 20}
    assert got["pull_last_seconds"] == {a: 2.5}
    assert got["pull_last_result"] == {a: 0, b: 1}
    assert got["pull_last_run_timestamp_seconds"] == {a: NOW + 30,
                                                      b: NOW + 30}


def test_a_copy_never_pulled_whole_has_no_complete_time():
    got = samples(metrics.build(
        [{"source": SRC, "copy": "/c/new.raw", "status": 2, "error": "e"}],
        {"/c/new.raw": None}, NOW))
    assert got["pull_last_complete_timestamp_seconds"] == {}
    assert got["pull_last_complete_age_seconds"] == {}
    assert got["pull_last_result"] == {
        (("copy", "/c/new.raw"), ("source", SRC)): 2}


def test_text_reads_record_json_beside_a_file_copy(tmp_path):
    copy = str(tmp_path / "a.raw")
    open(copy, "wb").close()
    folder = state.folder_for(copy, "file", None)
    os.mkdir(folder, 0o700)
    with open(os.path.join(folder, "record.json"), "w") as f:
        json.dump({"pulled": "2023-11-14T22:13:20Z"}, f)
    text = metrics.text([{"source": SRC, "copy": copy, "status": 1}], None,
                        now=NOW + 60)
    assert ('nbdsnap_pull_last_complete_age_seconds{copy="%s",'
            'source="%s"} 60.0\n' % (copy, SRC)) in text


def test_nbd_pull_writes_the_metrics_of_a_failed_run(tmp_path,
                                                     monkeypatch):
    # main() would take over the package's loggers for the other tests.
    monkeypatch.setattr(report, "setup_logging", lambda log, socket_path: None)
    prom = tmp_path / "nbd-pull.prom"
    status = cli.main(["--metrics", str(prom), "--wait", "0",
                       "nbd://127.0.0.1:1/none", str(tmp_path / "a.raw")])
    assert status != 0
    text = prom.read_text()
    assert ('nbdsnap_pull_last_result{copy="%s",source="nbd://127.0.0.1:1/'
            'none"} %d\n' % (tmp_path / "a.raw", status)) in text
    assert stat.S_IMODE(os.stat(prom).st_mode) == 0o644


def test_metrics_that_cannot_be_written_are_a_warning(tmp_path,
                                                      monkeypatch):
    said = []
    monkeypatch.setattr(cli.log, "warning",
                        lambda *a: said.append(a[0] % a[1:]))
    cli._write_metrics(str(tmp_path / "no" / "such.prom"), [], None)
    assert said == ["cannot write the metrics to %s: No such file or "
                    "directory" % (tmp_path / "no" / "such.prom")]
