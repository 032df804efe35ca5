"""nbdsnap.hooks.log: syslog at the configured socket, stderr always."""

import logging
import os
import shutil
import socket
import tempfile

import pytest

from nbdsnap.hooks import cli, config, log as log_mod

DAEMON = 3
ERR, INFO = 3, 6


@pytest.fixture(autouse=True)
def root_logger(monkeypatch, tmp_path):
    """Give the root logger back as it was; never read /etc/nbdsnap.conf."""
    monkeypatch.delenv("NBDSNAP_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent"))
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in saved[0]:
            handler.close()
    root.handlers[:], root.level = saved


@pytest.fixture
def folder():
    # A short path: a unix socket's name has room for 107 bytes.
    path = tempfile.mkdtemp(prefix="nbdsnap-log-")
    yield path
    shutil.rmtree(path)


class Listener:
    """A syslog daemon of our own: a datagram socket that collects."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(5)

    def record(self):
        return self.sock.recv(65536).decode()

    def nothing(self):
        self.sock.settimeout(0.2)
        with pytest.raises(socket.timeout):
            self.sock.recv(65536)

    def close(self):
        self.sock.close()


@pytest.fixture
def listen(folder):
    listeners = []

    def bind(name):
        listener = Listener(os.path.join(folder, name))
        listeners.append(listener)
        return listener
    yield bind
    for listener in listeners:
        listener.close()


def write_config(folder, monkeypatch, text):
    path = os.path.join(folder, "nbdsnap.conf")
    with open(path, "w") as f:
        f.write(text)
    monkeypatch.setenv("NBDSNAP_CONFIG", path)
    return path


def test_the_default_socket_is_the_configurations_default():
    assert config.Config().syslog_socket == log_mod.SYSLOG_SOCKET == \
        "/dev/log"


def test_records_go_to_the_configured_socket(folder, listen, monkeypatch):
    default = listen("default")
    monkeypatch.setattr(log_mod, "SYSLOG_SOCKET", default.path)
    ours = listen("ours")
    write_config(folder, monkeypatch,
                 "[nbdsnap]\nsyslog_socket = %s\n" % ours.path)
    log_mod.setup("nbd-prerun")
    logging.getLogger("nbdsnap").info("frozen")
    assert ours.record() == "<%d>nbd-prerun[%d]: frozen\x00" % (
        DAEMON * 8 + INFO, os.getpid())
    default.nothing()


def test_an_unreadable_configuration_is_logged_to_the_default_socket(
        folder, listen, monkeypatch, capsys):
    default = listen("default")
    monkeypatch.setattr(log_mod, "SYSLOG_SOCKET", default.path)
    path = write_config(folder, monkeypatch, "syslog_socket = /x\n")
    status = cli._run("nbd-prerun", cli._load_config)
    assert status == 2
    line = "cannot read configuration %s: line 1: a setting before any " \
           "section header; the file must start with [nbdsnap]" % path
    assert default.record() == "<%d>nbd-prerun[%d]: %s\x00" % (
        DAEMON * 8 + ERR, os.getpid(), line)
    assert capsys.readouterr().err == "nbd-prerun: %s\n" % line


def test_a_missing_socket_leaves_stderr(folder, monkeypatch, capsys):
    write_config(folder, monkeypatch, "[nbdsnap]\nsyslog_socket = %s\n"
                 % os.path.join(folder, "nobody-listens"))
    log_mod.setup("nbd-postrun")
    logging.getLogger("nbdsnap").warning("left for recovery")
    assert capsys.readouterr().err == "nbd-postrun: left for recovery\n"


# -- argument errors of the hooks ------------------------------------------------
# nbd-server throws the hooks' stderr away: a client refused for a bad
# hook string must leave its reason in syslog.

@pytest.mark.parametrize("main,prog,argv,why", [
    (cli.prerun_main, "nbd-prerun", ["--bogus", "/srv/a b"],
     "unrecognized arguments: --bogus"),
    (cli.prerun_main, "nbd-prerun", ["--domain", "d", "/srv/x"],
     "--domain and --disk go together"),
    (cli.prerun_main, "nbd-prerun", ["--quiesce", "never", "/srv/x"],
     "argument --quiesce: invalid choice: 'never'"),
    (cli.postrun_main, "nbd-postrun", [],
     "the following arguments are required: EXPORT"),
])
def test_an_argument_error_of_a_hook_reaches_syslog(
        folder, listen, monkeypatch, capsys, main, prog, argv, why):
    ours = listen("ours")
    write_config(folder, monkeypatch,
                 "[nbdsnap]\nsyslog_socket = %s\n" % ours.path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    record = ours.record()
    assert record.startswith("<%d>%s[%d]: bad arguments " % (
        DAEMON * 8 + ERR, prog, os.getpid())), record
    assert why in record and "\n" not in record
    err = capsys.readouterr().err
    assert err.startswith("usage: %s " % prog)
    message = record[record.index("]: ") + 3:-1]
    assert err.splitlines()[-1] == "%s: %s" % (prog, message)


def test_the_arguments_are_in_the_record(folder, listen, monkeypatch):
    ours = listen("ours")
    write_config(folder, monkeypatch,
                 "[nbdsnap]\nsyslog_socket = %s\n" % ours.path)
    with pytest.raises(SystemExit):
        cli.prerun_main(["--bogus", "/srv/a b"])
    assert "bad arguments (--bogus '/srv/a b'): " in ours.record()
