"""nbdsnap.hooks.config: the INI settings, their defaults and their checks."""

import os
import re
import sys

import pytest

from nbdsnap.hooks import config
from nbdsnap.hooks.errors import ConfigError


@pytest.fixture(autouse=True)
def no_system_config(tmp_path, monkeypatch):
    """Never read the machine's /etc/nbdsnap.conf or the caller's variable."""
    monkeypatch.delenv("NBDSNAP_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.conf"))


@pytest.fixture
def conf(tmp_path, monkeypatch):
    """conf(text) writes a config file and names it in NBDSNAP_CONFIG."""
    def write(text):
        path = tmp_path / "nbdsnap.conf"
        path.write_text(text)
        monkeypatch.setenv("NBDSNAP_CONFIG", str(path))
        return str(path)
    return write


def test_no_file_means_all_defaults():
    c = config.load()
    assert c.state_dir == "/var/lib/nbdsnap"
    assert c.snapshot_dir == "/var/lib/nbdsnap/overlays"
    assert c.quiesce == "try"
    assert c.lock_timeout > 0 and c.commit_timeout > 0
    assert c.path == "(defaults)"


def test_lock_and_session_folders_live_in_state_dir():
    c = config.Config(state_dir="/srv/nbdsnap")
    assert c.locks_dir == "/srv/nbdsnap/locks"
    assert c.sessions_dir == "/srv/nbdsnap/sessions"


def test_missing_file_named_by_nbdsnap_config_is_an_error(tmp_path,
                                                          monkeypatch):
    missing = str(tmp_path / "nope.conf")
    monkeypatch.setenv("NBDSNAP_CONFIG", missing)
    with pytest.raises(ConfigError, match="nope.conf does not exist"):
        config.load()


def test_missing_file_passed_explicitly_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(str(tmp_path / "nope.conf"))


def test_usage_error_exit_status():
    assert ConfigError("x").status == 2


def test_settings_are_read_from_nbdsnap_config(conf):
    path = conf("[nbdsnap]\n"
                "state_dir = /srv/state/\n"
                "snapshot_dir = /srv/overlays\n"
                "quiesce = require\n"
                "lock_timeout = 2.5\n"
                "commit_timeout = 30\n")
    c = config.load()
    assert c == config.Config(state_dir="/srv/state",
                              snapshot_dir="/srv/overlays", quiesce="require",
                              lock_timeout=2.5, commit_timeout=30.0, path=path)


def test_explicit_path_beats_the_environment(conf, tmp_path):
    conf("[nbdsnap]\nquiesce = off\n")
    other = tmp_path / "other.conf"
    other.write_text("[nbdsnap]\nquiesce = require\n")
    assert config.load(str(other)).quiesce == "require"


def test_unset_settings_keep_their_defaults(conf):
    conf("[nbdsnap]\nquiesce = off\n")
    c = config.load()
    assert c.state_dir == "/var/lib/nbdsnap"
    assert c.lock_timeout == config.Config().lock_timeout


def test_unknown_setting_is_named(conf):
    conf("[nbdsnap]\nstate_dir = /srv/s\nsnapshot_directory = /srv/o\n")
    with pytest.raises(ConfigError, match="unknown setting "
                                          "snapshot_directory"):
        config.load()


def test_settings_in_a_misspelled_section_are_not_ignored(conf):
    conf("[nbdsnp]\nstate_dir = /srv/state\n")
    with pytest.raises(ConfigError, match="nbdsnp"):
        config.load()


def test_setting_outside_any_section_is_an_error(conf):
    conf("state_dir = /srv/state\n")
    with pytest.raises(ConfigError, match="cannot read configuration"):
        config.load()


@pytest.mark.parametrize("name", ["state_dir", "snapshot_dir"])
@pytest.mark.parametrize("value", ["var/lib/nbdsnap", "./overlays", ""])
def test_relative_folder_is_an_error(conf, name, value):
    conf("[nbdsnap]\n%s = %s\n" % (name, value))
    with pytest.raises(ConfigError, match="%s must be an absolute path" % name):
        config.load()


@pytest.mark.parametrize("value,expected", [
    ("require", "require"), ("try", "try"), ("off", "off"),
    ("Require", "require"), ("  OFF ", "off"),
])
def test_quiesce_policies(value, expected):
    assert config.parse_quiesce(value) == expected


@pytest.mark.parametrize("value", ["yes", "", "required", "no"])
def test_unknown_quiesce_policy_is_refused_listing_the_choices(conf, value):
    conf("[nbdsnap]\nquiesce = %s\n" % value)
    with pytest.raises(ConfigError, match="require, try, off"):
        config.load()


def test_quiesce_error_names_where_it_came_from():
    with pytest.raises(ConfigError, match="^--quiesce: "):
        config.parse_quiesce("always")


@pytest.mark.parametrize("name", ["lock_timeout", "commit_timeout"])
@pytest.mark.parametrize("value", ["0", "-1", "-0.5", "soon", ""])
def test_timeout_must_be_positive_seconds(conf, name, value):
    conf("[nbdsnap]\n%s = %s\n" % (name, value))
    with pytest.raises(ConfigError, match="%s must be a positive" % name):
        config.load()


@pytest.mark.parametrize("name", ["lock_timeout", "commit_timeout"])
def test_nan_timeout_is_refused(conf, name):
    conf("[nbdsnap]\n%s = nan\n" % name)
    with pytest.raises(ConfigError, match="positive"):
        config.load()


def test_duplicate_setting_is_an_error(conf):
    conf("[nbdsnap]\nquiesce = off\nquiesce = try\n")
    with pytest.raises(ConfigError, match="cannot read configuration"):
        config.load()


# -- the samples people copy ---------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def readme_sample():
    """The README's sample /etc/nbdsnap.conf, as a reader would copy it."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    found = re.search(r"`/etc/nbdsnap\.conf` \(optional.*?```ini\n(.*?)```",
                      text, re.S)
    assert found, "the README's sample /etc/nbdsnap.conf is gone"
    return found.group(1)


def test_the_readmes_sample_loads_as_it_reads(conf):
    sample = readme_sample()
    assert "#" in sample          # it does show inline comments
    c = config.load(conf(sample))
    assert c == config.Config(path=c.path)      # every value its default


def test_the_installed_sample_loads_with_every_default():
    path = os.path.join(ROOT, "contrib", "nbdsnap.conf")
    c = config.load(path)
    assert c == config.Config(path=path)


@pytest.mark.parametrize("line,name,value", [
    ("quiesce = off   # never ask the agent", "quiesce", "off"),
    ("quiesce = off\t; never ask the agent", "quiesce", "off"),
    ("state_dir = /srv/a#b", "state_dir", "/srv/a#b"),
    ("state_dir = /srv/a;b", "state_dir", "/srv/a;b"),
    ("state_dir = /srv/a#b # a comment", "state_dir", "/srv/a#b"),
])
def test_an_inline_comment_needs_a_blank_before_it(conf, line, name, value):
    c = config.load(conf("[nbdsnap]\n%s\n" % line))
    assert getattr(c, name) == value


# -- digest_algorithm ------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    ("sha256", "sha256"), ("SHA512", "sha512"), ("sha3_256", "sha3_256"),
])
def test_digest_algorithm_nbd_verify_takes(conf, value, expected):
    conf("[nbdsnap]\ndigest_algorithm = %s\n" % value)
    assert config.load().digest_algorithm == expected


@pytest.mark.parametrize("value,why", [
    ("md55", "unknown digest algorithm"),
    ("shake_128", "no fixed digest size"),
    ("", "unknown digest algorithm"),
])
def test_digest_algorithm_is_checked_at_load(conf, value, why):
    conf("[nbdsnap]\ndigest_algorithm = %s\n" % value)
    with pytest.raises(ConfigError, match="digest_algorithm: .*%s" % why):
        config.load()


def test_blake3_is_refused_where_its_module_is_missing(conf, monkeypatch):
    from nbdsnap.verify import blkhash
    monkeypatch.setitem(sys.modules, "blake3", None)    # import fails
    blkhash._constructor.cache_clear()
    conf("[nbdsnap]\ndigest_algorithm = blake3\n")
    try:
        with pytest.raises(ConfigError, match="module blake3"):
            config.load()
    finally:
        blkhash._constructor.cache_clear()


def test_blake3_is_taken_where_its_module_is_installed(conf):
    pytest.importorskip("blake3")
    conf("[nbdsnap]\ndigest_algorithm = blake3\n")
    assert config.load().digest_algorithm == "blake3"


# -- files that are no INI text: one line each -------------------------------------

def one_line_error(path):
    with pytest.raises(ConfigError) as e:
        config.load(path)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_a_binary_file_is_one_line_error(tmp_path):
    path = tmp_path / "nbdsnap.conf"
    path.write_bytes(b"[nbdsnap]\nstate_dir = /srv/\xff\xfe\n")
    message = one_line_error(str(path))
    assert message == ("cannot read configuration %s: line 2: not UTF-8 text "
                       "(byte 0xff)" % path)


@pytest.mark.parametrize("text,why", [
    ("# settings\nstate_dir = /srv/state\n",
     "line 2: a setting before any section header; the file must start "
     "with [nbdsnap]"),
    ("[nbdsnap]\nquiesce = off\njust words\nmore words\n",
     "line 3: not a setting: 'just words'"),
    ("[nbdsnap]\nquiesce = off\nquiesce = try\n",
     "line 3: quiesce is set twice in [nbdsnap]"),
    ("[nbdsnap]\nquiesce = off\n[nbdsnap]\n",
     "line 3: section [nbdsnap] is there twice"),
], ids=["no section header", "no setting", "setting twice", "section twice"])
def test_a_file_configparser_refuses_is_one_line_error(conf, text, why):
    path = conf(text)
    assert one_line_error(path) == ("cannot read configuration %s: %s"
                                    % (path, why))


def test_a_folder_is_one_line_error(tmp_path):
    message = one_line_error(str(tmp_path))
    assert message == ("cannot read configuration %s: Is a directory"
                       % tmp_path)


def test_syslog_socket_is_a_path(conf):
    conf("[nbdsnap]\nsyslog_socket = /run/rsyslog//log\n")
    assert config.load().syslog_socket == "/run/rsyslog/log"
    assert config.Config().syslog_socket == "/dev/log"


def test_relative_syslog_socket_is_an_error(conf):
    conf("[nbdsnap]\nsyslog_socket = dev/log\n")
    with pytest.raises(ConfigError, match="syslog_socket must be an "
                                          "absolute path"):
        config.load()


# -- digest_full_days ------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [("7", 7.0), ("0", 0.0),
                                             ("0.5", 0.5)])
def test_digest_full_days(conf, value, expected):
    conf("[nbdsnap]\ndigest_full_days = %s\n" % value)
    assert config.load().digest_full_days == expected


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "weekly", ""])
def test_digest_full_days_refused(conf, value):
    conf("[nbdsnap]\ndigest_full_days = %s\n" % value)
    with pytest.raises(ConfigError, match="digest_full_days must be"):
        config.load()


def test_metrics_file_is_empty_unless_set(conf):
    assert config.Config().metrics_file == ""
    conf("[nbdsnap]\nmetrics_file = /var/lib/node/nbdsnap.prom\n")
    assert config.load().metrics_file == "/var/lib/node/nbdsnap.prom"
