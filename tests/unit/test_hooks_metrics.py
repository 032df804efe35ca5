"""nbdsnap.hooks.metrics: the VM host's metrics from status and history."""

import json
import os
import re

from nbdsnap.hooks import history, metrics, sessions
from nbdsnap.hooks.config import Config
from nbdsnap.verify.textfile import render

NOW = 1_700_000_000.0


def session(export, verdict, created, overlay_bytes=None, phase="frozen"):
    return {"key": "k-" + export, "export": export, "verdict": verdict,
            "phase": phase, "created": created,
            "overlay": "/var/lib/nbdsnap/overlays/nbdsnap-" + export[-3:],
            "overlay_bytes": overlay_bytes}


def past(export, end, result="online commit", commit_seconds=1.25):
    return {"export": export, "end": end, "result": result,
            "commit_seconds": commit_seconds}


def samples(families):
    return {f.name: {tuple(sorted(labels.items())): value
                     for labels, value in f.samples if value is not None}
            for f in families}


def test_sessions_by_verdict_every_verdict_shown():
    got = samples(metrics.build(
        [session("/dev/vg/a", "live", NOW - 10),
         session("/dev/vg/b", "live", NOW - 20),
         session("/dev/vg/c", "failed", NOW - 30, phase="failed"),
         {"key": "k", "phase": "corrupt", "verdict": "corrupt",
          "error": "x"}], [], NOW))["sessions"]
    assert got == {(("verdict", "live"),): 2, (("verdict", "stale"),): 0,
                   (("verdict", "failed"),): 1, (("verdict", "corrupt"),): 1,
                   (("verdict", "orphan"),): 0}


def test_the_oldest_freeze_as_age_and_start():
    got = samples(metrics.build(
        [session("/dev/vg/a", "live", NOW - 10),
         session("/dev/vg/b", "stale", NOW - 4000)], [], NOW))
    assert got["freeze_oldest_age_seconds"] == {(): 4000.0}
    assert got["freeze_oldest_start_timestamp_seconds"] == {(): NOW - 4000}


def test_no_freeze_is_age_zero_and_no_start():
    orphan = {"key": None, "phase": "orphan", "verdict": "orphan",
              "overlay": "/o/nbdsnap-x", "overlay_bytes": 4096}
    got = samples(metrics.build([orphan], [], NOW))
    assert got["freeze_oldest_age_seconds"] == {(): 0}
    assert got["freeze_oldest_start_timestamp_seconds"] == {}
    assert got["overlay_bytes"] == {
        (("export", ""), ("overlay", "/o/nbdsnap-x")): 4096}


def test_overlay_bytes_per_session_a_missing_overlay_left_out():
    got = samples(metrics.build(
        [session("/dev/vg/a", "live", NOW, overlay_bytes=1 << 20),
         session("/dev/vg/b", "live", NOW, overlay_bytes=None)], [], NOW))
    assert got["overlay_bytes"] == {
        (("export", "/dev/vg/a"),
         ("overlay", "/var/lib/nbdsnap/overlays/nbdsnap-g/a")): 1 << 20}


def test_the_last_session_of_each_export_and_a_failed_commit():
    got = samples(metrics.build(
        [session("/dev/vg/b", "failed", NOW - 5, phase="failed")],
        [past("/dev/vg/a", NOW - 100, commit_seconds=3.5),
         past("/dev/vg/b", NOW - 90, "offline commit", 0.5),
         past("/dev/vg/a", NOW - 50, "ended: shut off, nothing to commit",
              None)], NOW))
    assert got["last_commit_seconds"] == {(("export", "/dev/vg/b"),): 0.5}
    assert got["last_session_end_timestamp_seconds"] == {
        (("export", "/dev/vg/a"),): NOW - 50,
        (("export", "/dev/vg/b"),): NOW - 90}
    assert got["last_session_result"] == {
        (("export", "/dev/vg/a"),
         ("result", "ended: shut off, nothing to commit")): 1,
        (("export", "/dev/vg/b"), ("result", "offline commit")): 1}
    assert got["last_commit_ok"] == {(("export", "/dev/vg/a"),): 1,
                                     (("export", "/dev/vg/b"),): 0}
    assert got["metrics_timestamp_seconds"] == {(): NOW}


def test_text_of_a_host_from_its_state_and_history(tmp_path):
    cfg = Config(state_dir=str(tmp_path / "state"),
                 snapshot_dir=str(tmp_path / "overlays"),
                 manifest_dir=str(tmp_path / "manifests"),
                 path=str(tmp_path / "nbdsnap.conf"))
    sessions.SessionStore(cfg).prepare()
    (tmp_path / "overlays" / "nbdsnap-left").write_bytes(b"x" * 8192)
    with open(os.path.join(cfg.state_dir, "history.jsonl"), "w") as f:
        f.write(json.dumps(past("/dev/vg/a", NOW - 60)) + "\n")
    assert history.read(cfg)
    text = metrics.text(cfg, now=NOW)
    assert text == render(metrics.build(
        [{"key": None, "phase": "orphan", "verdict": "orphan",
          "overlay": str(tmp_path / "overlays" / "nbdsnap-left"),
          "overlay_bytes": os.stat(tmp_path / "overlays" / "nbdsnap-left")
          .st_blocks * 512}], history.read(cfg), NOW))
    assert 'nbdsnap_sessions{verdict="orphan"} 1\n' in text
    assert ('nbdsnap_last_session_result{export="/dev/vg/a",'
            'result="online commit"} 1\n') in text


def test_the_example_alerts_name_only_metrics_that_exist():
    from nbdsnap.pull import metrics as pull_metrics
    rules = os.path.join(os.path.dirname(__file__), "..", "..", "contrib",
                         "nbdsnap-alerts.yml")
    with open(rules, encoding="utf-8") as f:
        named = set(re.findall(r"\bnbdsnap_[a-z_]+", f.read()))
    made = {"nbdsnap_" + f.name for f in metrics.build([], [], NOW)
            + pull_metrics.build([], {}, NOW)}
    assert named and named <= made, named - made
