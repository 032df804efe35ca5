"""The freeze-time manifest (digest = on) against real parts."""

import contextlib
import ctypes
import json
import os
import signal
import subprocess

import lab
from test_freeze import MiB, assert_clean, export_domain

from nbdsnap.verify import manifest2


def verify(*args):
    return subprocess.run([os.path.join(lab.VENV_BIN, "nbd-verify")]
                          + list(args), capture_output=True, text=True,
                          timeout=120)


def complete(path):
    """Whether the (version 2) manifest at path is complete."""
    with manifest2.FileReader(path) as reader:
        return manifest2.read_header(reader).complete


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
    lab.wait_until(lambda: complete(path), 60,
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
    assert complete(manifest_of(env, dom))
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
    if complete(manifest_of(env, dom)):
        return      # the digest beat even this timeout: nothing to refuse
    proc = verify("check", manifest_of(env, dom), base)
    assert proc.returncode == 2 and "incomplete" in proc.stderr


PTRACE_SEIZE = 0x4206


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def deaf_to_sigterm(pid):
    """Keep a stopped pid alive through SIGTERM; SIGKILL still ends it.

    A traced process hands every signal but SIGKILL to its tracer first;
    this test is its tracer and never looks, so SIGTERM waits, as it would
    for a digest in the middle of something that does not end at once.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                            ctypes.c_void_p]
    if libc.ptrace(PTRACE_SEIZE, pid, None, None) != 0:
        raise OSError(ctypes.get_errno(), "PTRACE_SEIZE %d" % pid)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_commit_waits_until_a_stopped_digest_has_ended(virt, env):
    env.configure(digest="on", manifest_dir=env.path("manifests"),
                  digest_timeout=1)
    base = lab.make_image(env.path("big.raw"), 96, fill=0x11)
    dom = virt.define(env.name("d"), [lab.disk_xml(base, "vda")])
    env.hook("nbd-prerun", base, check=0)
    (name,) = env.sessions()
    with open(os.path.join(env.state_dir, "sessions", name)) as f:
        pid = json.load(f)["digest"]["pid"]
    os.kill(pid, signal.SIGSTOP)        # the known point: mid-digest
    manifest = manifest_of(env, dom)
    assert complete(manifest) is False, "digest too fast"
    lab.guest_write(dom, "vda", 0x5a, 0, MiB)     # into the overlay
    with deaf_to_sigterm(pid):
        proc = env.hook("nbd-postrun", base, check=0)
        # The commit wrote into the base: the digest must be gone by then.
        assert not alive(pid), proc.stderr
    assert_clean(env, dom, base)
    assert lab.read_range(base, 0, MiB) == b"\x5a" * MiB
    assert complete(manifest) is False
    log = proc.stderr
    assert log.index("digest") < log.index("last holder gone")
