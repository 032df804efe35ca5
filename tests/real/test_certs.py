"""nbdsnap certs with the real openssl, and nbd-server and libnbd reading
what it made: the set-up an administrator follows, end to end."""

import os
import stat
import subprocess

import pytest

import lab
from lab.tls import Pki, uri


def nbdinfo_size(target):
    return subprocess.run(["nbdinfo", "--size", target], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


def tls_server(virt, env, pki):
    disk = lab.make_image(env.path("disk.raw"), 4, fill=0x42)
    return virt.nbd_server(env.folder, {"e": (disk, {
        "prerun": "", "postrun": "", "force_tls": "true"})}, env.vars,
        generic=pki.generic())


def test_what_certs_makes_serves_tls_to_its_clients_only(virt, env):
    pki = Pki(env.path("tls"), clients=("clone1",))
    server = tls_server(virt, env, pki)
    ok = nbdinfo_size(uri(server, "e", pki.client("clone1")))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(4 << 20)
    # Plain text, and a client of another CA: refused.
    plain = nbdinfo_size("nbd://127.0.0.1:%d/e" % server.port)
    assert plain.returncode != 0 and "TLS" in plain.stderr
    other = Pki(env.path("other"), clients=("clone1",))
    refused = nbdinfo_size(uri(server, "e", other.client("clone1")))
    assert refused.returncode != 0
    # A name the server's certificate does not hold (the same server):
    # libnbd refuses it.
    named = Pki(env.path("named"), clients=("clone1",), names=("vm.example",))
    server.stop()
    server.generic = named.generic()
    server.start()
    wrong = nbdinfo_size(uri(server, "e", named.client("clone1")))
    assert wrong.returncode != 0
    assert "certificate" in wrong.stderr.lower(), wrong.stderr


def test_a_rerun_adds_a_client_and_keeps_everything_else(virt, env):
    folder = env.path("tls")
    pki = Pki(folder, clients=("clone1",))
    before = {n: open(os.path.join(folder, n), "rb").read()
              for n in ("ca-cert.pem", "server-cert.pem", "server-key.pem")}
    out = pki.add(["clone2"])
    assert "clients/clone2/client-cert.pem" in out and "ca-key" not in out
    for name, data in before.items():
        assert open(os.path.join(folder, name), "rb").read() == data
    server = tls_server(virt, env, pki)
    for name in ("clone1", "clone2"):
        proc = nbdinfo_size(uri(server, "e", pki.client(name)))
        assert proc.returncode == 0, proc.stderr
    assert "nothing to make" in pki.add([])


def test_keys_and_folders_are_closed_to_others(env):
    old = os.umask(0o022)
    try:
        pki = Pki(env.path("tls"), clients=("clone1",))
    finally:
        os.umask(old)
    for root, dirs, files in os.walk(pki.folder):
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700, root
        for name in files:
            mode = stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)
            assert mode == 0o600, name
        assert not [n for n in dirs if n.startswith(".")]   # no leftovers
    assert sorted(os.listdir(pki.client("clone1"))) == [
        "ca-cert.pem", "client-cert.pem", "client-key.pem"]


@pytest.mark.parametrize("planted", ["symlink", "open folder"])
def test_an_unsafe_folder_is_refused(env, planted):
    folder = env.path("tls")
    if planted == "symlink":
        os.makedirs(env.path("elsewhere"))
        os.symlink(env.path("elsewhere"), folder)
    else:
        os.makedirs(folder)
        os.chmod(folder, 0o755)
    proc = subprocess.run([os.path.join(lab.VENV_BIN, "nbdsnap"), "certs",
                           "--dir", folder, "--server-name", "vm"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(folder, "ca-key.pem"))


def test_only_the_ca_can_sign(env):
    """The leaves are no CAs (whatever the system's openssl.cnf adds),
    the CA signs leaves only, and each leaf is for its side only."""
    pki = Pki(env.path("tls"), clients=("clone1",))

    def ext(path):
        return subprocess.run(
            ["openssl", "x509", "-in", path, "-noout", "-ext",
             "basicConstraints,extendedKeyUsage"], capture_output=True,
            text=True, check=True).stdout
    ca = ext(os.path.join(pki.folder, "ca-cert.pem"))
    assert "CA:TRUE, pathlen:0" in ca
    server = ext(os.path.join(pki.folder, "server-cert.pem"))
    client = ext(os.path.join(pki.client("clone1"), "client-cert.pem"))
    for leaf, usage in ((server, "Server"), (client, "Client")):
        assert "CA:FALSE" in leaf and "TLS Web %s Authentication" % usage \
            in leaf, leaf


def test_lint_warns_before_the_server_certificate_ends_and_renewal_works(
        virt, env):
    """nbdsnap certs --days 5: lint says when every handshake will fail;
    the renewal nbdsnap(8) describes (move the pair aside, run certs again
    with the same names) gives a certificate clients still accept, and
    lint says nothing more."""
    folder = env.path("tls")
    cmd = [os.path.join(lab.VENV_BIN, "nbdsnap"), "certs", "--dir", folder,
           "--server-name", "localhost", "--server-name", "127.0.0.1"]
    subprocess.run(cmd + ["--days", "5", "--client", "clone"], check=True,
                   capture_output=True, timeout=120)
    pki = Pki(folder, clients=("clone",), names=())   # made: nothing new
    conf = env.path("nbd.conf")
    with open(conf, "w") as f:
        f.write("[generic]\n    listenaddr = 127.0.0.1\n" + "".join(
            "    %s = %s\n" % kv for kv in pki.generic().items())
            + "[e]\n    exportname = /dev/null\n    force_tls = true\n")

    def certfile_findings():
        out = subprocess.run([os.path.join(lab.VENV_BIN, "nbdsnap"), "lint",
                              conf], capture_output=True, text=True,
                             env=dict(os.environ, **env.vars), timeout=120)
        return [line for line in out.stdout.splitlines()
                if "certfile" in line]

    (line,) = certfile_findings()
    assert "server-cert.pem expires on " in line
    assert ", in 4 days: then every TLS handshake fails; renew it" in line
    for name in ("server-cert.pem", "server-key.pem"):
        os.rename(os.path.join(folder, name),
                  os.path.join(folder, name + ".old"))
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert certfile_findings() == []
    server = tls_server(virt, env, pki)
    proc = nbdinfo_size(uri(server, "e", pki.client("clone")))
    assert proc.returncode == 0, proc.stderr
