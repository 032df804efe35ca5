"""TLS through the hooks: nbdsnap export --tls, served by nbd-server with
[generic]'s certfile, keyfile and cacertfile (made by nbdsnap certs).

A client with the clone host's folder copies the base as it was frozen and
the commit brings the guest's writes back; every other client (no
certificate, one of another CA, plain text) is refused before prerun runs,
so nothing is frozen: no session, no overlay, nothing in history, not a
line from nbd-prerun.
"""

import hashlib
import json
import os
import shutil
import subprocess

import pytest

import lab
from lab.tls import Pki, uri
from test_freeze import MiB, assert_clean, export_domain
from test_export_lint import hooks, nbdsnap, write_config


def tls_export(virt, env, pki):
    """The domain, exported with --tls by nbdsnap export (includedir), and
    nbd-server serving it with pki's [generic] lines, on loopback."""
    dom, base = export_domain(virt, env, name="tls")
    confd = env.path("conf.d")
    os.mkdir(confd)
    proc = nbdsnap(env, "export", dom.name(), "--tls", "--allow",
                   "127.0.0.1", "-o", os.path.join(confd, "tls.conf"),
                   check=0)
    assert "--tls" not in proc.stderr        # no plain-text warning
    server = virt.nbd_server(env.folder, {}, env.vars,
                             generic=dict(pki.generic(), includedir=confd))
    assert nbdsnap(env, "lint", server.conf, check=0).stdout == ""
    return dom, base, server, dom.name() + "-vda"


def phases(env):
    folder = os.path.join(env.state_dir, "sessions")
    found = []
    for name in env.sessions():
        try:
            with open(os.path.join(folder, name)) as f:
                found.append(json.load(f)["phase"])
        except (OSError, ValueError):
            pass            # replaced as we read it: the next turn
    return found


def history(env):
    return json.loads(env.hook("nbdsnap", "history", "--json",
                               check=0).stdout)["sessions"]


def nbdinfo(target):
    return subprocess.run(["nbdinfo", "--size", target], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


def prerun_lines(records):
    return [r for r in records if "nbd-prerun" in r]


def test_the_clone_hosts_certificate_copies_the_frozen_base(virt, env,
                                                            syslog):
    pki = Pki(env.path("tls"))
    dom, base, server, name = tls_export(virt, env, pki)
    frozen = lab.sha256(base)
    source = uri(server, name, pki.client())
    # nbdcopy into a pipe nobody reads yet: its connection holds the freeze
    # while the guest writes and a second, 4-connection copy runs.
    held = subprocess.Popen(["nbdcopy", source, "-"], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        # Frozen, not merely begun: the intent is saved before the
        # snapshot, and a write before it lands in the base.
        lab.wait_until(lambda: phases(env) == ["frozen"], 30,
                       what="the freeze")
        lab.guest_write(dom, "vda", 0x5a, MiB, MiB)
        copy = env.path("copy.raw")
        lab.nbdcopy(source, copy, connections=4)
        assert lab.sha256(copy) == frozen
        digest = hashlib.sha256()
        for chunk in iter(lambda: held.stdout.read(MiB), b""):
            digest.update(chunk)
        assert held.wait(60) == 0
    finally:
        held.kill()
        held.wait()
    assert digest.hexdigest() == frozen
    assert_clean(env, dom, base)
    assert lab.read_range(base, MiB, MiB) == b"\x5a" * MiB
    (entry,) = history(env)
    assert entry["result"] == "online commit" and entry["disk"] == "vda"
    assert prerun_lines(syslog)         # the hooks did log, to this socket


def foreign_client(env, pki):
    """A folder that trusts pki's CA (so libnbd accepts the server) but
    holds a client certificate of another CA: the server must refuse."""
    other = Pki(env.path("other"))
    folder = env.path("foreign")
    os.mkdir(folder, 0o700)
    shutil.copy(os.path.join(pki.client(), "ca-cert.pem"), folder)
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy(os.path.join(other.client(), name), folder)
    return folder


def no_certificate(env, pki):
    """A folder with the CA only: libnbd checks the server, shows none."""
    folder = env.path("nocert")
    os.mkdir(folder, 0o700)
    shutil.copy(os.path.join(pki.client(), "ca-cert.pem"), folder)
    return folder


def test_other_clients_are_refused_before_any_freeze(virt, env, syslog):
    pki = Pki(env.path("tls"))
    dom, base, server, name = tls_export(virt, env, pki)
    refused = {
        "no certificate": nbdinfo(uri(server, name, no_certificate(env,
                                                                   pki))),
        "another CA's certificate": nbdinfo(uri(server, name,
                                                foreign_client(env, pki))),
        "another CA's folder": nbdinfo(uri(server, name, Pki(
            env.path("other2")).client())),
        "plain text": nbdinfo(server.uri(name)),
        "plain text, manifest": nbdinfo(server.uri(name + ".manifest")),
    }
    # Who refuses: nbd-server, which drops a client whose certificate is
    # missing or not of its CA and tells a plain one that TLS comes first;
    # libnbd, which does not trust a server of another CA.
    said = {"no certificate": "server disconnected",
            "another CA's certificate": "server disconnected",
            "another CA's folder": "certificate verification",
            "plain text": "server requires TLS",
            "plain text, manifest": "server requires TLS"}
    for what, proc in refused.items():
        assert proc.returncode != 0 and proc.stdout == "", what
        assert said[what] in proc.stderr, (what, proc.stderr)
    with pytest.raises(lab.RefusedError):
        lab.HeldConnection(server.port, name)
    # Nothing froze: no session, no overlay, no history, no prerun at all.
    assert env.sessions() == [] and env.overlays() == []
    assert history(env) == []
    assert prerun_lines(syslog) == []
    assert lab.disk_source(dom, "vda") == base
    # The server itself is fine: the clone host's folder still gets in.
    ok = nbdinfo(uri(server, name, pki.client()))
    assert ok.returncode == 0 and ok.stdout.strip() == str(32 * MiB)
    assert_clean(env, dom, base)
    assert len(history(env)) == 1 and prerun_lines(syslog)


def test_lint_names_what_breaks_tls(env):
    """The files nbdsnap certs made, spoilt as an administrator might: a
    key others can read, no cacertfile, tlsonly for force_tls, and
    nbd-server on every address."""
    pki = Pki(env.path("tls"))
    generic = pki.generic()
    os.chmod(generic["keyfile"], 0o644)
    disk = lab.make_image(env.path("disk.raw"), 1)
    section = dict(exportname=disk, readonly="true", authfile="/dev/null",
                   **hooks())
    path = write_config(env, {"forced": dict(section, force_tls="true"),
                              "plain": dict(section, tlsonly="true")},
                        generic="    certfile = %(certfile)s\n"
                                "    keyfile = %(keyfile)s\n" % generic)
    proc = nbdsnap(env, "lint", path, check=1)
    tls = [l for l in proc.stdout.splitlines()
           if "tls" in l.lower() or "key" in l]
    assert tls == [
        "plain: tlsonly is ignored by nbd-server 3.24: a plain-text client "
        "still connects and prerun freezes the domain; write force_tls = "
        "true",
        "plain: no force_tls and nbd-server listens on every address: the "
        "disk crosses the network in plain text, and any client the "
        "authfile lets in may freeze the domain; set force_tls = true "
        "(nbdsnap export --tls)",
        "generic: certfile without cacertfile: nbd-server 3.24 drops every "
        "TLS client in the handshake; set cacertfile to the CA of the clone "
        "hosts' certificates",
        "generic: keyfile %s is mode 644: group and others can read it and "
        "pose as this VM host; chmod 600" % generic["keyfile"]], \
        proc.stdout


def test_nbd_pull_and_nbd_verify_over_tls_freeze_and_commit(virt, env):
    """The clone host's own tools through the hooks: a pull and a refresh
    over nbds://, the check against the manifest export, each a freeze
    and a commit; with another CA's client folder, exit 2 and no freeze."""
    env.configure(digest="on", manifest_dir=env.path("manifests"))
    pki = Pki(env.path("tls"))
    dom, base, server, name = tls_export(virt, env, pki)
    source = uri(server, name, pki.client())
    copy = env.path("copy.raw")
    pull = [os.path.join(lab.VENV_BIN, "nbd-pull"), "--json",
            "--syslog-socket", env.path("syslog"), source, copy]

    def run(cmd):
        return subprocess.run(cmd, capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)
    first = run(pull)
    assert first.returncode == 0, first.stderr
    env.wait_clean()
    assert lab.sha256(copy) == lab.sha256(base)
    lab.guest_write(dom, "vda", 0x6c, 3 * MiB, 4096)
    again = run(pull)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["pulls"][0]["blocks_fetched"] == 1
    env.wait_clean()
    assert lab.sha256(copy) == lab.sha256(base)
    manifest = uri(server, name + ".manifest", pki.client())
    check = run([os.path.join(lab.VENV_BIN, "nbd-verify"), "check",
                 manifest, copy])
    assert check.returncode == 0, check.stderr
    assert [e["result"] for e in history(env)] == ["online commit"] * 2
    # Our client with a folder of another CA: refused, one line, no freeze.
    refused = run(pull[:-2] + [uri(server, name, Pki(
        env.path("other")).client()), env.path("other.raw")])
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "Traceback" not in refused.stderr
    assert env.sessions() == [] and len(history(env)) == 2
    assert_clean(env, dom, base)
