"""Our NBD client over TLS (nbds://, libnbd's form) against the real
nbd-server 3.24, with certificates made by the real `nbdsnap certs`; no
libvirt, no hooks.

One server serves an image and its v2 manifest twice: as "d" and
"d.manifest" with force_tls, and as "p" and "p.manifest" in plain text,
so that every answer over TLS is checked against the same answer in
plain text.  Refusals are one line each, no traceback.  nbd-server 3.24
spins at full CPU behind a TLS client that leaves with TLS's
close_notify and no NBD_CMD_DISC (fixed upstream in 3.27): after every
exit of ours, its children must be gone, or at least not burning CPU.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

import lab
from lab.tls import Pki

from nbdsnap.verify import nbd

MiB = 1 << 20
SIZE = 24 * MiB
TLS = {"prerun": "", "postrun": "", "force_tls": "true"}
PLAIN = {"prerun": "", "postrun": ""}


def image(seed, old=None):
    rng = random.Random(seed)
    buf = bytearray(old) if old is not None else bytearray(SIZE)
    for _ in range(12):
        n = rng.choice([4096, 65536, MiB])
        off = rng.randrange(0, SIZE - n) // 4096 * 4096
        buf[off:off + n] = rng.randbytes(n)
    return buf


def tool(name, *args, timeout=120):
    return subprocess.run([os.path.join(lab.VENV_BIN, name), *args],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def one_line(proc, prog):
    """proc failed with exactly one line, ours, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prog + ": "), proc.stderr
    return lines[0]


class Vmhost:
    """The image, its manifest, and nbd-server serving both, TLS and plain."""

    def __init__(self, folder, pki):
        self.folder = folder
        self.pki = pki
        self.image = os.path.join(folder, "d.img")
        self.manifest = os.path.join(folder, "d.manifest")
        # All random: a pull of it at 512 KiB/s lasts 48 s.
        self.big = os.path.join(folder, "big.img")
        with open(self.big, "wb") as f:
            f.write(random.Random(3).randbytes(SIZE))
        tool("nbd-verify", "digest", "--manifest-version", "2",
             "--manifest", self.big + ".manifest", self.big)
        self.server = lab.NbdServer(folder, {
            "d": (self.image, TLS), "d.manifest": (self.manifest, TLS),
            "p": (self.image, PLAIN), "p.manifest": (self.manifest, PLAIN),
            "big": (self.big, TLS),
            "big.manifest": (self.big + ".manifest", TLS),
        }, {}, generic=pki.generic())

    def publish(self, buf):
        tmp = self.image + ".tmp"
        with open(tmp, "wb") as f:
            f.write(buf)
        os.replace(tmp, self.image)
        proc = tool("nbd-verify", "digest", "--manifest-version", "2",
                    "--manifest", self.manifest + ".tmp", self.image)
        assert proc.returncode == 0, proc.stderr
        os.replace(self.manifest + ".tmp", self.manifest)

    def tls(self, export="d", certificates=None, host="127.0.0.1"):
        folder = certificates or self.pki.client("clone")
        return "nbds://%s:%d/%s?tls-certificates=%s" % (
            host, self.server.port, export, folder)

    def plain(self, export="p"):
        return self.server.uri(export)


@pytest.fixture(scope="module")
def vmhost(host):
    folder = lab.workdir()
    vm = Vmhost(folder, Pki(os.path.join(folder, "tls"), clients=("clone",)))
    vm.publish(image(1))
    vm.server.start()
    yield vm
    for pid in vm.server.children():
        _kill(pid)
    vm.server.stop(signal.SIGKILL)
    lab.cleanup_folder(folder)


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def cpu_ticks(pid):
    """utime + stime of pid (clock ticks); None once it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[11]) + int(fields[12])


def spinning(server, seconds=2.0):
    """nbd-server's children that burnt more than a tenth of the time
    over seconds: {pid: ticks}."""
    before = {pid: cpu_ticks(pid) for pid in server.children()}
    time.sleep(seconds)
    hz = os.sysconf("SC_CLK_TCK")
    burnt = {}
    for pid, ticks in before.items():
        after = cpu_ticks(pid)
        if ticks is not None and after is not None and \
                after - ticks > hz * seconds / 10:
            burnt[pid] = after - ticks
    return burnt


def test_verify_over_tls_answers_as_plain_text(vmhost, tmp_path):
    tls = tool("nbd-verify", "digest", vmhost.tls())
    plain = tool("nbd-verify", "digest", vmhost.plain())
    assert tls.returncode == 0 and plain.returncode == 0, tls.stderr
    assert tls.stdout.split()[0] == plain.stdout.split()[0]
    copy = str(tmp_path / "copy.img")
    shutil.copyfile(vmhost.image, copy)
    assert tool("nbd-verify", "compare", vmhost.tls(), copy).returncode == 0
    with open(copy, "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\xff" * 4096)
    tls = tool("nbd-verify", "compare", vmhost.tls(), copy)
    plain = tool("nbd-verify", "compare", vmhost.plain(), copy)
    assert tls.returncode == plain.returncode == 1
    ranges = [[line for line in p.stdout.splitlines()
               if line.startswith("differ:")] for p in (tls, plain)]
    assert ranges[0] == ranges[1] == [
        "differ: offset %d length 65536" % (5 * MiB)]
    assert spinning(vmhost.server) == {}


def pull(uri, copy, state):
    proc = tool("nbd-pull", "--json", "--state-dir", state,
                "--syslog-socket", os.path.join(state, "no-syslog"),
                uri, copy)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)["pulls"][0]


def test_pull_and_refresh_over_tls_as_plain_text(vmhost, tmp_path):
    old = bytearray(open(vmhost.image, "rb").read())
    copies = {kind: (str(tmp_path / kind), str(tmp_path / (kind + ".state")))
              for kind in ("tls", "plain")}
    uris = {"tls": vmhost.tls(), "plain": vmhost.plain()}
    firsts = {k: pull(uris[k], *copies[k]) for k in uris}
    for k, (copy, _) in copies.items():
        assert lab.sha256(copy) == lab.sha256(vmhost.image), k
    assert firsts["tls"]["blocks_fetched"] == \
        firsts["plain"]["blocks_fetched"] > 0
    try:
        vmhost.publish(image(2, old))
        again = {k: pull(uris[k], *copies[k]) for k in uris}
        for k, (copy, _) in copies.items():
            assert lab.sha256(copy) == lab.sha256(vmhost.image), k
        assert again["tls"]["kind"] == again["plain"]["kind"] == \
            "incremental"
        assert again["tls"]["blocks_fetched"] == \
            again["plain"]["blocks_fetched"] > 0
    finally:
        vmhost.publish(old)
    assert spinning(vmhost.server) == {}


@pytest.fixture(scope="module")
def elsewhere(host):
    """A second CA, with a server certificate for vmhost.example only."""
    folder = lab.workdir()
    yield Pki(os.path.join(folder, "tls"), clients=("clone",),
              names=("vmhost.example",))
    lab.cleanup_folder(folder)


def test_refusals_are_one_line(vmhost, elsewhere, tmp_path):
    ours = vmhost.pki.client("clone")
    line = one_line(tool("nbd-verify", "digest", vmhost.plain("d")),
                    "nbd-verify")
    assert "requires TLS" in line and "nbds://" in line
    # nbd-pull: refused at its probe of the manifest, before any freeze;
    # a configuration to change, not a network to retry (exit 2, not 1).
    line = one_line(tool("nbd-pull", "--state-dir", str(tmp_path / "s"),
                         "--syslog-socket", str(tmp_path / "no-syslog"),
                         vmhost.plain("d"), str(tmp_path / "c")), "nbd-pull")
    assert "requires TLS" in line and "d.manifest" in line
    # A clone host of another CA: the server's certificate is refused.
    line = one_line(tool("nbd-verify", "digest", vmhost.tls(
        certificates=elsewhere.client("clone"))), "nbd-verify")
    assert "server's certificate was refused" in line
    # Our CA, but a client certificate of another: the server refuses it.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(os.path.join(ours, "ca-cert.pem"), mixed)
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy(os.path.join(elsewhere.client("clone"), name), mixed)
    line = one_line(tool("nbd-verify", "digest", vmhost.tls(
        certificates=str(mixed))), "nbd-verify")
    assert "refused the TLS session" in line and "client-cert.pem" in line
    # A folder with no key, and one whose key is not a key.
    nokey = tmp_path / "nokey"
    shutil.copytree(ours, nokey)
    os.unlink(nokey / "client-key.pem")
    line = one_line(tool("nbd-verify", "digest", vmhost.tls(
        certificates=str(nokey))), "nbd-verify")
    assert "client-key.pem: no such file" in line
    (nokey / "client-key.pem").write_text("garbage\n")
    line = one_line(tool("nbd-verify", "digest", vmhost.tls(
        certificates=str(nokey))), "nbd-verify")
    assert "client-key.pem: not the client certificate" in line
    assert spinning(vmhost.server) == {}


def test_a_name_not_in_the_servers_certificate_is_refused(elsewhere,
                                                          tmp_path):
    folder = str(tmp_path)
    img = lab.make_image(os.path.join(folder, "e.img"), 4, fill=0x42)
    server = lab.NbdServer(folder, {"e": (img, TLS)}, {},
                           generic=elsewhere.generic())
    server.start()
    try:
        uri = "nbds://127.0.0.1:%d/e?tls-certificates=%s" % (
            server.port, elsewhere.client("clone"))
        line = one_line(tool("nbd-verify", "digest", uri), "nbd-verify")
        assert "not valid for 127.0.0.1" in line
        # Checked by chain and name only, tls-verify-peer=false passes,
        # with a warning.
        proc = tool("nbd-verify", "digest", uri + "&tls-verify-peer=false")
        assert proc.returncode == 0 and "tls-verify-peer=false" in \
            proc.stderr
    finally:
        for pid in server.children():
            _kill(pid)
        server.stop(signal.SIGKILL)


def test_close_notify_without_disc_spins_and_we_never_send_it(vmhost):
    """What the probe sees: the client nbd-server 3.24 mishandles (TLS's
    close_notify, no NBD_CMD_DISC) leaves a child spinning; ours, closed
    cleanly or bare after a failure, leaves none."""
    client = nbd.Client(vmhost.tls())
    client.close()
    bare = nbd.Client(vmhost.tls())
    bare._conn._sock.close()        # a failed connection: no goodbye
    assert spinning(vmhost.server) == {}

    bad = nbd.Client(vmhost.tls())
    sock = bad._conn._sock
    sock.settimeout(1)
    try:
        sock.unwrap()               # close_notify; nbd-server never answers
    except OSError:
        pass
    try:
        assert spinning(vmhost.server, 1.0), "3.24 no longer spins?"
    finally:
        sock.close()
        for pid in vmhost.server.children():
            _kill(pid)


def test_nbd_pull_killed_mid_transfer_over_tls(vmhost, tmp_path):
    """kill -9 closes the TCP connection with no TLS close_notify:
    nbd-server's child fails its read and ends (measured: it never
    spins)."""
    proc = subprocess.Popen(
        [os.path.join(lab.VENV_BIN, "nbd-pull"), "--bwlimit", "512K",
         "-c", "1", "--state-dir", str(tmp_path / "s"),
         "--syslog-socket", str(tmp_path / "no-syslog"),
         vmhost.tls("big"), str(tmp_path / "copy")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        lab.wait_until(lambda: len(vmhost.server.children()) >= 1, 20,
                       what="nbd-pull's connections")
        time.sleep(1.5)             # mid-transfer: 24 MiB at 512 KiB/s
        assert proc.poll() is None
        children = vmhost.server.children()
    finally:
        proc.kill()
        proc.wait(30)
    assert spinning(vmhost.server) == {}
    lab.wait_until(lambda: not set(children) & set(
        vmhost.server.children()), 10, what="the children to end")
