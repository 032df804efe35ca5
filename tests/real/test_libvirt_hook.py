"""The libvirt hook, installed as `make install` does, against libvirtd."""

import contextlib
import json
import os
import subprocess

import libvirt
import pytest

import lab
from test_freeze import export_domain, serve


@contextlib.contextmanager
def installed_hook(env):
    """The hook script as `make install` writes it, for this test's config."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    with open(os.path.join(root, "contrib", "libvirt-hook-qemu.in")) as f:
        text = f.read().replace("@BINDIR@", lab.VENV_BIN).replace(
            "@CONFIG@", env.config)
    path = os.path.join(lab.HOOKS_DIR,
                        "nbdsnap-test-" + os.path.basename(env.folder))
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        os.unlink(path)


def test_domain_copied_shut_off_cannot_start_until_the_copy_ends(virt, env):
    dom, base = export_domain(virt, env, start=False)
    server = serve(virt, env, {"vm": base})
    with installed_hook(env):
        held = lab.HeldConnection(server.port, "vm")
        with pytest.raises(libvirt.libvirtError, match="being copied"):
            dom.create()
        assert not dom.isActive()
        held.close()
        env.wait_clean()
        dom.create()                     # the copy has ended: it starts
        assert dom.isActive()


def test_hook_lets_every_other_domain_start(virt, env):
    dom, base = export_domain(virt, env, start=False)
    other, _ = export_domain(virt, env, name="other", start=False)
    server = serve(virt, env, {"vm": base})
    with installed_hook(env):
        held = lab.HeldConnection(server.port, "vm")
        other.create()
        assert other.isActive()
        held.close()


def test_domain_started_anyway_is_shown_by_status(virt, env):
    # No hook installed: the start goes through, and status says so.
    dom, base = export_domain(virt, env, start=False)
    server = serve(virt, env, {"vm": base})
    held = lab.HeldConnection(server.port, "vm")
    dom.create()
    out = env.hook("nbdsnap", "status", check=0).stdout
    assert "started during the copy" in out
    (entry,) = json.loads(env.hook("nbdsnap", "status", "--json",
                                   check=0).stdout)["sessions"]
    assert entry["domain_state"] == "running" and entry["warning"]
    held.close()
    env.wait_clean()


def test_broken_configuration_never_stops_a_start(virt, env):
    dom, base = export_domain(virt, env, start=False)
    with installed_hook(env):
        with open(env.config, "w") as f:
            f.write("[nbdsnap]\nquiesce = sometimes\n")
        dom.create()
        assert dom.isActive()
    proc = subprocess.run([os.path.join(lab.VENV_BIN, "nbdsnap"),
                           "libvirt-hook", "d", "prepare", "begin", "-"],
                          input="<domain><name>d</name></domain>", text=True,
                          capture_output=True,
                          env=dict(os.environ, NBDSNAP_CONFIG=env.config))
    assert proc.returncode == 0 and "letting it start" in proc.stderr
