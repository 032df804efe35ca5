"""Fixtures on real parts: libvirtd, QEMU domains, nbd-server, clients."""

import os
import socket
import subprocess
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
import lab  # noqa: E402


class Env:
    """One test's configuration, state and overlay folders."""

    def __init__(self, folder, **settings):
        self.folder = folder
        self.state_dir = os.path.join(folder, "state")
        self.snapshot_dir = os.path.join(folder, "overlays")
        self.config = os.path.join(folder, "nbdsnap.conf")
        self.settings = {"quiesce": "off", "lock_timeout": 60,
                         "commit_timeout": 120}
        self.configure(**settings)
        self.vars = {"NBDSNAP_CONFIG": self.config,
                     "LIBVIRT_DEFAULT_URI": lab.URI}

    def configure(self, **settings):
        self.settings.update(settings)
        lab.write_config(self.config, self.state_dir, self.snapshot_dir,
                         **self.settings)

    def name(self, prefix):
        """A domain name that no other test's can be: prefix-<folder>."""
        return prefix + "-" + os.path.basename(self.folder)[-6:]

    def path(self, *names):
        return os.path.join(self.folder, *names)

    def hook(self, name, *args, check=None):
        """Run an entry point by hand, as nbd-server would (no terminal)."""
        cmd = [os.path.join(lab.VENV_BIN, name)] + list(args)
        proc = subprocess.run(cmd, env=dict(os.environ, **self.vars),
                              capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
        if check is not None:
            assert proc.returncode == check, proc.stderr
        return proc

    def sessions(self):
        folder = os.path.join(self.state_dir, "sessions")
        if not os.path.isdir(folder):
            return []
        return [n for n in os.listdir(folder) if n.endswith(".json")]

    def overlays(self):
        if not os.path.isdir(self.snapshot_dir):
            return []
        return os.listdir(self.snapshot_dir)

    def wait_clean(self, timeout=60):
        """Wait for every postrun to finish: no session left."""
        try:
            lab.wait_until(lambda: not self.sessions(), timeout,
                           what="the last postrun to end the session")
        except TimeoutError as e:
            # nbd-server throws the hooks' stderr away: show what the
            # session says instead (its phase and error).
            folder = os.path.join(self.state_dir, "sessions")
            states = [open(os.path.join(folder, n)).read()
                      for n in self.sessions()]
            raise TimeoutError("%s; sessions: %s" % (e, states)) from None


@pytest.fixture(scope="session")
def host():
    lab.ensure_host()


@pytest.fixture
def env(host):
    folder = lab.workdir()
    yield Env(folder)
    lab.cleanup_folder(folder)


@pytest.fixture
def virt(host):
    the_lab = lab.Lab()
    yield the_lab
    the_lab.close()


@pytest.fixture
def syslog(env):
    """A syslog socket of the test's own, named in its configuration
    (syslog_socket), and what reaches it: no test ever needs /dev/log,
    which a syslog daemon or journald owns on most hosts.
    """
    path = env.path("syslog")
    env.configure(syslog_socket=path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    records = []
    stop = threading.Event()

    def collect():
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                records.append(sock.recv(65536).decode(errors="replace"))
            except socket.timeout:
                pass

    t = threading.Thread(target=collect, daemon=True)
    t.start()
    yield records
    stop.set()
    t.join()
    sock.close()
    os.unlink(path)
