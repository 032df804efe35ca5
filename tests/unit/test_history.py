"""The session history: appended, bounded, tolerant of a damaged line."""

import json
import os

from nbdsnap.hooks import history, sessions
from nbdsnap.hooks.config import Config
from nbdsnap.hooks.procs import Holder


def config(tmp_path):
    cfg = Config(state_dir=str(tmp_path / "state"),
                 snapshot_dir=str(tmp_path / "state" / "overlays"))
    sessions.SessionStore(cfg).prepare()
    return cfg


def state(n=0):
    s = sessions.new_session("f-1-%d" % n, "/e%d" % n, "dom", "u", "vda",
                             "/e%d" % n, sessions.ONLINE, Holder(1, 2, "b"),
                             now=1000.0)
    return sessions.join(s, Holder(3, 4, "b"))


def test_entry_counts_every_connection_and_keeps_the_commit():
    e = history.entry(state(), "online commit", overlay_bytes=5,
                      commit_seconds=0.12345, now=1010.0)
    assert e["connections"] == 2 and e["overlay_bytes"] == 5
    assert e["commit_seconds"] == 0.123 and e["end"] - e["start"] == 10


def test_record_appends_lines_readable_back(tmp_path):
    cfg = config(tmp_path)
    for i in range(3):
        history.record(cfg, history.entry(state(i), "online commit"))
    assert [e["export"] for e in history.read(cfg)] == ["/e0", "/e1", "/e2"]
    mode = os.stat(os.path.join(cfg.state_dir, "history.jsonl")).st_mode
    assert mode & 0o777 == 0o600


def test_history_is_bounded_keeping_the_newest(tmp_path):
    cfg = config(tmp_path)
    for i in range(200):
        history.record(cfg, history.entry(state(i), "ok"), max_bytes=20000)
    path = os.path.join(cfg.state_dir, "history.jsonl")
    assert os.path.getsize(path) <= 20000 + 1000
    exports = [e["export"] for e in history.read(cfg)]
    assert exports[-1] == "/e199" and len(exports) < 200


def test_a_damaged_line_is_skipped(tmp_path):
    cfg = config(tmp_path)
    history.record(cfg, history.entry(state(1), "ok"))
    with open(os.path.join(cfg.state_dir, "history.jsonl"), "a") as f:
        f.write('{"truncated\n')
    history.record(cfg, history.entry(state(2), "ok"))
    assert [e["export"] for e in history.read(cfg)] == ["/e1", "/e2"]


def test_text_lists_one_row_per_session(tmp_path):
    text = history.format_text([history.entry(state(), "online commit",
                                              overlay_bytes=3 << 20,
                                              commit_seconds=0.5)])
    header, row = text.splitlines()
    assert "RESULT" in header and "3 MiB" in row and "online commit" in row
    assert json.dumps(history.format_text([])) == '"no sessions recorded yet"'
