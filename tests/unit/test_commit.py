"""commit.run with qemu-img and libvirt faked: which lock is held when, and
what bounds the offline commit (the real commits are in tests/real)."""

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
