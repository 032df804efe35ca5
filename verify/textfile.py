"""Metrics in Prometheus' text exposition format, for node_exporter's
textfile collector (its --collector.textfile.directory reads *.prom).

Pure: render() turns plain data into the text; write() puts it in place
whole (files.write_atomic: a hidden .NAME.*.tmp beside it, which the
collector ignores, renamed over NAME, mode 0644 so that node_exporter,
which runs as its own user, reads it)::

    # HELP nbdsnap_sessions Sessions by verdict.
    # TYPE nbdsnap_sessions gauge
    nbdsnap_sessions{verdict="live"} 1

It lives in verify/ because hooks/ (the VM host) and pull/ (the clone
host) both render metrics, and pull/ must never import hooks/.
"""

import math
import re
from typing import NamedTuple

from .files import write_atomic

PREFIX = "nbdsnap_"
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


class Family(NamedTuple):
    """One metric: its name (PREFIX added), type, help and samples, each
    (labels dict, value); a sample whose value is None is left out."""
    name: str
    kind: str           # "gauge" or "counter"
    help: str
    samples: list


def escape_label(value):
    """A label value as the format quotes it: \\ " and newline escaped."""
    return (str(value).replace("\\", "\\\\").replace('"', '\\"')
            .replace("\n", "\\n"))


def escape_help(text):
    """HELP text: only \\ and newline are escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value):
    """An int exactly, a float in full, the format's NaN and +Inf/-Inf;
    a bool as 1 or 0."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def render(families):
    """The text of families, in order; ValueError for a name the format
    does not allow (a bug, not an operator's mistake)."""
    lines = []
    for f in families:
        name = PREFIX + f.name
        if not _NAME.match(name) or f.kind not in ("gauge", "counter"):
            raise ValueError("bad metric %r (%s)" % (name, f.kind))
        lines.append("# HELP %s %s" % (name, escape_help(f.help)))
        lines.append("# TYPE %s %s" % (name, f.kind))
        for labels, value in f.samples:
            if value is None:
                continue
            for key in labels:
                if not _LABEL.match(key) or key.startswith("__"):
                    raise ValueError("bad label %r of %s" % (key, name))
            text = ",".join('%s="%s"' % (k, escape_label(v))
                            for k, v in sorted(labels.items()))
            lines.append("%s%s %s" % (name, "{%s}" % text if text else "",
                                      format_value(value)))
    return "\n".join(lines) + "\n"


def write(path, text):
    """Replace path with text, atomically, readable by all (0644)."""
    write_atomic(path, text, mode=0o644)
