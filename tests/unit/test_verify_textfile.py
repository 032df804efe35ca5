"""nbdsnap.verify.textfile: Prometheus' text exposition format."""

import os
import stat

import pytest

from nbdsnap.verify import textfile
from nbdsnap.verify.textfile import Family


def test_help_type_and_samples_in_order():
    text = textfile.render([
        Family("sessions", "gauge", "Sessions by verdict.",
               [({"verdict": "live"}, 1), ({"verdict": "stale"}, 0)]),
        Family("metrics_timestamp_seconds", "gauge", "When.",
               [({}, 1700000000.5)]),
    ])
    assert text == (
        "# HELP nbdsnap_sessions Sessions by verdict.\n"
        "# TYPE nbdsnap_sessions gauge\n"
        'nbdsnap_sessions{verdict="live"} 1\n'
        'nbdsnap_sessions{verdict="stale"} 0\n'
        "# HELP nbdsnap_metrics_timestamp_seconds When.\n"
        "# TYPE nbdsnap_metrics_timestamp_seconds gauge\n"
        "nbdsnap_metrics_timestamp_seconds 1700000000.5\n")


def test_label_values_are_escaped_and_labels_sorted():
    text = textfile.render([Family("x", "gauge", "h", [
        ({"b": 'a "quoted"\\path\nnext', "a": "é"}, 2)])])
    assert text.splitlines()[-1] == \
        'nbdsnap_x{a="é",b="a \\"quoted\\"\\\\path\\nnext"} 2'


def test_help_escapes_backslash_and_newline_only():
    text = textfile.render([Family("x", "gauge", 'a\\b\n"c"', [])])
    assert text.splitlines()[0] == '# HELP nbdsnap_x a\\\\b\\n"c"'


@pytest.mark.parametrize("value, text", [
    (0, "0"), (12345678901234, "12345678901234"), (True, "1"),
    (False, "0"), (0.25, "0.25"), (float("nan"), "NaN"),
    (float("inf"), "+Inf"), (float("-inf"), "-Inf")])
def test_values(value, text):
    assert textfile.format_value(value) == text


def test_a_sample_without_value_is_left_out():
    text = textfile.render([Family("x", "gauge", "h", [({"a": "1"}, None)])])
    assert "nbdsnap_x{" not in text and "# TYPE nbdsnap_x gauge" in text


@pytest.mark.parametrize("family", [
    Family("bad-name", "gauge", "h", []),
    Family("x", "histogram", "h", []),
    Family("x", "gauge", "h", [({"bad-label": "v"}, 1)]),
    Family("x", "gauge", "h", [({"__name__": "v"}, 1)]),
])
def test_what_the_format_forbids_is_a_bug(family):
    with pytest.raises(ValueError):
        textfile.render([family])


def test_write_replaces_whole_readable_by_all(tmp_path):
    path = tmp_path / "nbdsnap.prom"
    path.write_text("old\n")
    textfile.write(str(path), "new\n")
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert os.listdir(tmp_path) == ["nbdsnap.prom"]
