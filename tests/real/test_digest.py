"""The freeze-time manifest (digest = on) against real parts."""

import json
import os
import subprocess

import lab
from test_freeze import MiB, assert_clean, export_domain


def verify(*args):
    return subprocess.run([os.path.join(lab.VENV_BIN, "nbd-verify")]
                          + list(args), capture_output=True, text=True,
                          timeout=120)


def manifest_of(env, dom):
    return os.path.join(env.path("manifests"), "%s-vda.manifest" % dom.name())


def serve_with_manifest(virt, env, dom, base):
    return virt.nbd_server(env.folder, {
        "vm": (base, None),
        "vm.manifest": (manifest_of(env, dom), {"prerun": "", "postrun": ""}),
    }, env.vars)


def test_manifest_of_the_frozen_base_checks_the_copy(virt, env):
    env.configure(digest="on", manifest_dir=env.path("manifests"))
    dom, base = export_domain(virt, env)
    server = serve_with_manifest(virt, env, dom, base)
    held = lab.HeldConnection(server.port, "vm")
    path = manifest_of(env, dom)
    assert os.path.exists(path)          # before prerun returned
    lab.guest_write(dom, "vda", 0x5a, 0, 4 * MiB)   # after the freeze
    copy = env.path("copy.raw")
    lab.nbdcopy(server.uri("vm"), copy)
    lab.wait_until(lambda: json.load(open(path))["complete"], 60,
                   what="the digest to complete")
    # Checked over NBD, from the manifest export, as a clone host would.
    proc = verify("check", server.uri("vm.manifest"), copy)
    assert proc.returncode == 0, proc.stderr
    held.close()
    assert_clean(env, dom, base)
    # The base now holds the guest's write: the old manifest tells it apart.
    proc = verify("check", path, base)
    assert proc.returncode == 1 and proc.stdout


def test_last_postrun_waits_for_the_digest_before_the_commit(virt, env):
    env.configure(digest="on", manifest_dir=env.path("manifests"))
    dom, base = export_domain(virt, env)
    server = serve_with_manifest(virt, env, dom, base)
    copy = env.path("copy.raw")
    lab.nbdcopy(server.uri("vm"), copy)      # connect, copy, leave at once
    env.wait_clean()
    manifest = json.load(open(manifest_of(env, dom)))
    assert manifest["complete"] is True
    assert verify("check", manifest_of(env, dom), copy).returncode == 0


def test_digest_past_its_timeout_is_stopped_and_refused(virt, env):
    env.configure(digest="on", manifest_dir=env.path("manifests"),
                  digest_timeout=0.001)
    dom, base = export_domain(virt, env)
    held = lab.HeldConnection(
        serve_with_manifest(virt, env, dom, base).port, "vm")
    held.close()
    env.wait_clean()
    assert_clean(env, dom, base)
    manifest = json.load(open(manifest_of(env, dom)))
    if manifest["complete"]:
        return      # the digest beat even this timeout: nothing to refuse
    proc = verify("check", manifest_of(env, dom), base)
    assert proc.returncode == 2 and "incomplete" in proc.stderr
