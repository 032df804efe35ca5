"""The hooks' detached children (digest, agent watcher) run as root: they
must never import a module planted in the directory they were started from."""

import json
import os
import subprocess
import sys
import time

import pytest

from nbdsnap.hooks import agent, config, digest, procs
from nbdsnap.verify import manifest2

PLANTED = "open(%r, 'w').write('imported')\n"


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A cwd holding a fake nbdsnap package; returns its marker file."""
    cwd = tmp_path / "cwd"
    (cwd / "nbdsnap").mkdir(parents=True)
    marker = tmp_path / "planted-was-imported"
    (cwd / "nbdsnap" / "__init__.py").write_text(PLANTED % str(marker))
    monkeypatch.chdir(cwd)
    return marker


def wait_gone(holder, timeout=30):
    deadline = time.monotonic() + timeout
    while procs.is_alive(holder):
        assert time.monotonic() < deadline, "child did not end"
        time.sleep(0.05)


def test_digest_child_ignores_a_module_planted_in_the_cwd(tmp_path, planted):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x11" * (1 << 20))
    conf = config.Config(manifest_dir=str(tmp_path / "manifests"))
    state = {"id": "s1", "domain": "d", "disk": "vda"}
    info = digest.start(conf, state, str(base))
    wait_gone(procs.Holder.from_json(info))
    assert not planted.exists()
    with manifest2.FileReader(info["manifest"]) as reader:
        assert manifest2.read_header(reader).complete is True


class NoDomain:
    """A domain no libvirt connection knows: the watcher ends at once."""

    def UUIDString(self):
        return "00000000-0000-4000-8000-00000000dead"

    def name(self):
        return "nodomain"


def test_agent_watcher_ignores_a_module_planted_in_the_cwd(planted,
                                                           monkeypatch):
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "test:///default")
    watcher = agent.start_watcher(NoDomain(), 5)
    wait_gone(watcher)
    assert not planted.exists()


IGNORES_SIGTERM = ("import signal, sys, time\n"
                   "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                   "print('ready', flush=True)\n"
                   "time.sleep(60)\n")


@pytest.fixture
def stubborn():
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    yield proc
    proc.kill()
    proc.wait()


def test_digest_stop_escalates_to_sigkill_and_waits(stubborn):
    holder = procs.holder_of(stubborn.pid)
    assert digest.stop(holder, grace=0.5) == "ended on SIGKILL"
    assert stubborn.wait(5) == -9


def test_digest_stop_never_signals_a_reused_pid(stubborn):
    holder = procs.holder_of(stubborn.pid)
    other = procs.Holder(holder.pid, holder.start + 1, holder.boot)
    assert digest.stop(other, grace=0.5) == "it had ended"
    assert stubborn.poll() is None


def test_a_digest_its_prerun_never_released_reads_nothing(tmp_path):
    """A prerun that dies between starting the digest and saving its pid
    in the session: recover would not know to wait for that digest, so
    it must never read the base (or write a complete manifest)."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x11" * (1 << 20))
    folder = tmp_path / "manifests"
    code = (
        "import json, sys\n"
        "from nbdsnap.hooks import config, digest\n"
        "conf = config.Config(manifest_dir=%r)\n"
        "state = {'id': 's1', 'domain': 'd', 'disk': 'vda'}\n"
        "info, release = digest.start(conf, state, %r, hold=True)\n"
        "print(json.dumps(info))\n"
        "import os; os._exit(0)    # dies before release()\n"
        % (str(folder), str(base)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    info = json.loads(out)
    wait_gone(procs.Holder.from_json(info))
    with manifest2.FileReader(info["manifest"]) as reader:
        assert manifest2.read_header(reader).complete is False
    assert sorted(os.listdir(folder)) == ["d-vda.manifest"]
