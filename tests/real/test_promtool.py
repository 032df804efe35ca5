"""Our metrics and alerting rules as Prometheus' own promtool reads them
(issue 14): the real text of `nbdsnap metrics`, of the hooks'
metrics_file and of `nbd-pull --metrics`, after real freezes, commits and
pulls, and contrib/nbdsnap-alerts.yml.

promtool is Debian's (package prometheus, tools/setup-host).  `promtool
check metrics` reads the text on stdin, prints each lint problem (a
counter without _total, a unit not in base units, no HELP...) on stderr
and exits 3 for problems, 1 for text it cannot parse, 0 when clean; it
also passes an empty text, so each test says which families it expects.
"""

import os
import re
import subprocess

import lab
from test_freeze import assert_clean, export_domain
from test_pull import configure, pull, serve

from nbdsnap.hooks import metrics as host_metrics
from nbdsnap.pull import metrics as pull_metrics
from nbdsnap.verify.textfile import PREFIX

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
ALERTS = os.path.join(ROOT, "contrib", "nbdsnap-alerts.yml")


def promtool(*args, text=None):
    return subprocess.run(["promtool", *args], input=text,
                          capture_output=True, text=True, timeout=60)


def assert_lint_clean(text):
    proc = promtool("check", "metrics", text=text)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, ""), text


def families(text):
    """{name: type} from the # TYPE lines."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def sampled(text):
    """The names that have at least one sample."""
    return set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M))


def host_text(env):
    proc = env.hook("nbdsnap", "metrics", check=0)
    return proc.stdout


def test_host_metrics_during_and_after_a_freeze(virt, env):
    """Every family of `nbdsnap metrics` with samples: a live session (its
    overlay, the oldest freeze) and the export's last commit (history)."""
    metrics_file = env.path("nbdsnap.prom")
    env.configure(metrics_file=metrics_file)
    dom, base = export_domain(virt, env)
    env.hook("nbd-prerun", base, check=0)
    lab.guest_write(dom, "vda", 0x2a, 0, 1 << 20)
    env.hook("nbd-postrun", base, check=0)
    env.wait_clean()
    env.hook("nbd-prerun", base, check=0)      # frozen again, history kept
    try:
        during = host_text(env)
        assert_lint_clean(during)
        with open(metrics_file) as f:
            assert_lint_clean(f.read())         # the prerun's
        names = {PREFIX + f.name for f in host_metrics.build([], [], 0)}
        assert set(families(during)) == names
        assert sampled(during) == names, during
    finally:
        env.hook("nbd-postrun", base, check=0)
        env.wait_clean()
    assert_clean(env, dom, base)
    after = host_text(env)
    assert_lint_clean(after)
    assert 'nbdsnap_last_session_result{export="%s",result="online commit"} 1' \
        % base in after
    with open(metrics_file) as f:
        written = f.read()
    assert_lint_clean(written)                  # the postrun's
    assert without_time(written) == without_time(after)


def without_time(text):
    return [line for line in text.splitlines()
            if not line.startswith("nbdsnap_metrics_timestamp_seconds ")]


def test_pull_metrics_after_a_real_pull(virt, env):
    configure(env)
    dom, base = export_domain(virt, env)
    server = serve(virt, env, dom, base)
    copy = env.path("copy.raw")
    metrics_file = env.path("pull.prom")
    pull(env, server, copy, "--metrics", metrics_file)
    lab.guest_write(dom, "vda", 0x3b, 5 << 20, 4096)
    pull(env, server, copy, "--metrics", metrics_file)
    assert_clean(env, dom, base)
    with open(metrics_file) as f:
        text = f.read()
    assert_lint_clean(text)
    names = {PREFIX + f.name for f in pull_metrics.build([], {}, 0)}
    assert set(families(text)) == names
    assert sampled(text) == names, text
    assert 'nbdsnap_pull_last_result{copy="%s",source="%s"} 0' \
        % (copy, server.uri("vm")) in text


def test_alert_rules_check_and_name_only_our_metrics():
    proc = promtool("check", "rules", ALERTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
    with open(ALERTS) as f:
        used = set(re.findall(r"\b%s[a-z_]+" % PREFIX, f.read()))
    ours = {PREFIX + f.name for f in host_metrics.build([], [], 0)
            + pull_metrics.build([], {}, 0)}
    assert used and used <= ours, used - ours
