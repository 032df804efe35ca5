"""commit.run with qemu-img and libvirt faked: which lock is held when, and
what bounds the offline commit (the real commits are in tests/real)."""

import os
import threading
import time

import pytest

from nbdsnap.hooks import commit, locate, plan, sessions
from nbdsnap.hooks.domxml import Layer


def offline_freeze(tmp_path, disk):
    """A freeze of an undefined domain's disk: base and overlay files."""
    base = tmp_path / ("%s.raw" % disk)
    overlay = tmp_path / ("nbdsnap-U-%s-S.qcow2" % disk)
    base.write_bytes(b"\0" * 4096)
    overlay.write_bytes(b"qcow2")
    return plan.Freeze(key=locate.key_of(str(base)), uuid="U",
                       domain="dom1", disk=disk, overlay=str(overlay),
                       base=Layer("file", str(base), "raw"))


@pytest.fixture
def fake_qemu_img(monkeypatch):
    """qemu-img: the overlay's backing is its base; a commit takes 2 s."""
    bases = {}

    def backing(path):
        return bases[path], "raw"

    def slow_commit(path, *args, **kw):
        time.sleep(2)
    monkeypatch.setattr(commit.qemu_img, "backing", backing)
    monkeypatch.setattr(commit.qemu_img, "commit", slow_commit)
    return bases


def test_two_offline_commits_of_one_domain_do_not_wait_for_each_other(
        tmp_path, fake_qemu_img):
    """Two disks of one shut-off domain: the domain lock is held for the
    definition, not across the 2 s qemu-img commit, so a lock_timeout of
    1 s is enough for both."""
    freezes = [offline_freeze(tmp_path, d) for d in ("vda", "vdb")]
    for f in freezes:
        fake_qemu_img[f.overlay] = f.base.path
    domain_lock = str(tmp_path / "domain-U.lock")
    errors = {}

    def one(freeze):
        step = plan.Step(plan.OFFLINE, "for the test", None)
        try:
            commit.run(None, freeze, step, 600, domain_lock=lambda:
                       sessions.DiskLock(domain_lock, timeout=1))
        except Exception as e:    # noqa: BLE001 -- reported below
            errors[freeze.disk] = e
    threads = [threading.Thread(target=one, args=(f,)) for f in freezes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == {}
    assert [plan.overlay_kind(f.overlay) for f in freezes] == [
        plan.MISSING, plan.MISSING]


@pytest.fixture
def hanging_qemu_img(tmp_path, monkeypatch):
    """A qemu-img first on PATH that writes its pid and sleeps for 20 s."""
    folder = tmp_path / "bin"
    folder.mkdir()
    pidfile = tmp_path / "qemu-img.pid"
    script = folder / "qemu-img"
    script.write_text("#!/bin/sh\necho $$ > %s\nexec sleep 20\n" % pidfile)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (folder, os.environ["PATH"]))
    return pidfile


def test_an_offline_commit_past_commit_timeout_is_killed_and_kept(
        tmp_path, monkeypatch, hanging_qemu_img):
    """The hook's watchdog counts commit_timeout for the commit: a qemu-img
    that outlasts it is stopped and waited for, never left writing into
    the base after the disk's lock is let go."""
    freeze = offline_freeze(tmp_path, "vda")
    monkeypatch.setattr(commit.qemu_img, "backing",
                        lambda path: (freeze.base.path, "raw"))
    merged, merging = [], []
    started = time.monotonic()
    with pytest.raises(commit.qemu_img.QemuImgError,
                       match="commit took more than 1 s; stopped"):
        commit.run(None, freeze, plan.Step(plan.OFFLINE, "test", None), 1,
                   merged=lambda: merged.append(True),
                   merging=lambda: merging.append(True))
    assert time.monotonic() - started < 10
    pid = int(hanging_qemu_img.read_text())
    assert not os.path.exists("/proc/%d" % pid), "qemu-img left running"
    assert merged == [] and plan.overlay_kind(freeze.overlay) == plan.REGULAR
    # Recorded before qemu-img wrote anything: the next run finishes it.
    assert merging == [True]
