"""plan.decide(): what postrun and recover do, for every row of the table
in plan's docstring, from observations made up here (no libvirt)."""

import os
import stat

import pytest

from nbdsnap.hooks import plan
from nbdsnap.hooks.plan import (DISCARD, END, KEEP, MISSING, OFFLINE,
                                  ONLINE, REGULAR, Observation)
from nbdsnap.hooks.domxml import Disk, Layer

OVERLAY = "/var/lib/nbdsnap/overlays/nbdsnap-U-vda-S.qcow2"
BASE = "/srv/vm/base.raw"
MINE = "/srv/vm/operator-snap.qcow2"

FREEZE = plan.Freeze(key="f-1-2", uuid="U", domain="dom1", disk="vda",
                     overlay=OVERLAY, base=Layer("file", BASE, "raw"))
MERGED = plan.Freeze(**dict(vars(FREEZE), merged=True))


def disk(*paths):
    layers = [Layer("file", p, "qcow2") for p in paths]
    return Disk(target="vda", device="disk", top=layers[0],
                chain=tuple(layers[1:]))


ON_OVERLAY = disk(OVERLAY, BASE)
ON_BASE = disk(BASE)
ABOVE = disk(MINE, OVERLAY, BASE)


def seen(**kw):
    kw.setdefault("overlay", REGULAR)
    kw.setdefault("state", "running")
    return Observation(**kw)


@pytest.mark.parametrize("state", ["running", "paused"])
def test_active_on_the_overlay_is_committed_online(state):
    assert plan.decide(seen(state=state, disk=ON_OVERLAY),
                       FREEZE)[0] == ONLINE


def test_shut_off_on_the_overlay_is_committed_offline():
    assert plan.decide(seen(state="shut off", disk=ON_OVERLAY),
                       FREEZE)[0] == OFFLINE


def test_shut_off_with_a_managed_save_image_is_kept():
    action, why = plan.decide(seen(state="shut off", disk=ON_OVERLAY,
                                   managed_save=True), FREEZE)
    assert action == KEEP and "virsh start" in why


@pytest.mark.parametrize("state", ["crashed", "suspended", "shutting down"])
@pytest.mark.parametrize("where", [ON_OVERLAY, ON_BASE])
def test_a_passing_state_is_kept(state, where):
    action, why = plan.decide(seen(state=state, disk=where, adds=True),
                              FREEZE)
    assert action == KEEP and state in why and "run recover again" in why


def test_on_its_base_with_no_overlay_ends():
    assert plan.decide(seen(disk=ON_BASE, overlay=MISSING),
                       FREEZE)[0] == END


def test_disk_gone_and_no_overlay_ends():
    assert plan.decide(seen(disk=None, overlay=MISSING), FREEZE)[0] == END


def test_on_its_base_after_the_pivot_discards_without_a_comparison():
    # adds=True: the guest wrote on after the pivot; no comparison counts.
    action, why = plan.decide(seen(disk=ON_BASE, adds=True), MERGED)
    assert action == DISCARD and "pivoted" in why


@pytest.mark.parametrize("state", ["running", "shut off"])
def test_on_its_base_with_an_overlay_that_adds_nothing_discards(state):
    assert plan.decide(seen(state=state, disk=ON_BASE, adds=False),
                       FREEZE)[0] == DISCARD


@pytest.mark.parametrize("state", ["running", "shut off"])
def test_on_its_base_with_an_overlay_that_adds_data_is_kept(state):
    """The domain was created again on its base (a transient one, say): its
    guest wrote on without the overlay, which must not be merged under it."""
    action, why = plan.decide(seen(state=state, disk=ON_BASE, adds=True),
                              FREEZE)
    assert action == KEEP
    assert "rm %s" % OVERLAY in why and "qemu-img compare" in why


@pytest.mark.parametrize("state", ["running", "paused", "shut off"])
def test_an_image_above_the_overlay_is_kept_and_says_how(state):
    action, why = plan.decide(seen(state=state, disk=ABOVE, adds=True),
                              FREEZE)
    assert action == KEEP
    assert MINE in why and "above overlay" in why
    assert "virsh blockcommit dom1 vda --active --shallow --pivot" in why


def test_an_image_above_a_merged_overlay_is_kept_too():
    assert plan.decide(seen(disk=ABOVE), MERGED)[0] == KEEP


def test_a_libvirt_job_that_outlives_the_wait_is_kept():
    action, why = plan.decide(seen(job=60.0), FREEZE)
    assert action == KEEP and "libvirt job after 60 s" in why


@pytest.mark.parametrize("kind", ["symlink to /etc/shadow",
                                  "a file with 2 hard links",
                                  "not a regular file (mode 40700)"])
@pytest.mark.parametrize("where", [ON_OVERLAY, ON_BASE])
def test_an_overlay_that_is_not_our_file_is_never_handed_on(kind, where):
    action, why = plan.decide(seen(disk=where, overlay=kind, adds=False),
                              FREEZE)
    assert action == KEEP and kind in why and "nothing changed" in why


def test_undefined_with_a_symlinked_overlay_is_kept():
    action, _ = plan.decide(Observation(overlay="symlink to /x",
                                        defined=False), FREEZE)
    assert action == KEEP


def test_undefined_with_no_overlay_ends():
    assert plan.decide(Observation(overlay=MISSING, defined=False),
                       FREEZE)[0] == END


def test_undefined_and_base_unused_is_committed_offline():
    action, why = plan.decide(Observation(overlay=REGULAR, defined=False),
                              FREEZE)
    assert action == OFFLINE and "undefined" in why


def test_undefined_with_its_base_in_use_is_kept_and_says_who():
    action, why = plan.decide(
        Observation(overlay=REGULAR, defined=False,
                    base_users=((4242, "qemu-system-x86"),)), FREEZE)
    assert action == KEEP and "pid 4242 (qemu-system-x86)" in why


def test_undefined_with_a_base_written_since_is_kept_and_says_how():
    action, why = plan.decide(
        Observation(overlay=REGULAR, defined=False, base_newer=True), FREEZE)
    assert action == KEEP and "older branch" in why
    assert "qemu-img commit %s" % OVERLAY in why


def test_undefined_after_a_commit_cut_short_finishes_that_commit():
    """qemu-img commit stopped at commit_timeout wrote part of the overlay
    into the base, so the base is newer than its overlay: by our own
    commit, not a guest's writes.  The next run finishes it; keeping the
    overlay would leave the base half merged for good."""
    begun = plan.Freeze(**dict(vars(FREEZE), merging=True))
    assert plan.decide(Observation(overlay=REGULAR, defined=False,
                                   base_newer=True), begun)[0] == OFFLINE
    assert plan.decide(Observation(overlay=REGULAR, defined=False,
                                   base_newer=None), begun)[0] == OFFLINE
    assert plan.decide(Observation(
        overlay=REGULAR, defined=False, base_newer=True,
        base_users=((4242, "qemu-system-x86"),)), begun)[0] == KEEP


def test_a_session_that_began_an_offline_commit_says_so():
    state = {"key": "f-1-2", "uuid": "U", "domain": "dom1", "disk": "vda",
             "overlay": OVERLAY, "base": "/srv/vm/base.raw",
             "phase": "failed", "merging": True}
    assert plan.Freeze.from_session(state).merging
    assert not plan.Freeze.from_session(dict(state, merging=False)).merging


def test_undefined_with_a_block_base_is_kept_and_says_how():
    """A block device keeps no time of its last write: the domain may have
    been created again on the LV, have written and been destroyed again,
    and the overlay would go in over newer data."""
    lv = plan.Freeze(**dict(vars(FREEZE),
                            base=Layer("block", "/dev/vg/lv", "raw")))
    action, why = plan.decide(
        Observation(overlay=REGULAR, defined=False, base_newer=None), lv)
    assert action == KEEP
    assert "nothing tells whether its base /dev/vg/lv" in why
    assert "qemu-img commit %s, then rm %s" % (OVERLAY, OVERLAY) in why


def block_node(path):
    """A block device node (7, 0) at path; a FIFO where mknod is refused:
    for plan, both are bases that are not regular files."""
    try:
        os.mknod(path, 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    except PermissionError:
        os.mkfifo(path, 0o600)


def test_a_base_that_is_no_file_has_no_known_write_time(tmp_path):
    base, overlay = tmp_path / "lv", tmp_path / "o.qcow2"
    overlay.write_bytes(b"x")
    block_node(base)
    freeze = plan.Freeze(**dict(vars(FREEZE), overlay=str(overlay),
                                base=Layer("block", str(base), "raw")))
    assert plan._base_newer(freeze) is None
    gone = plan.Freeze(**dict(vars(freeze),
                              base=Layer("file", str(tmp_path / "no"), "raw")))
    assert plan._base_newer(gone) is None


def test_plan_keeps_an_undefined_domains_overlay_on_a_block_base(
        tmp_path, monkeypatch):
    """observe() then decide(), libvirt faked: the domain is gone and
    nothing on this host has the base open."""
    base, overlay = tmp_path / "lv", tmp_path / "o.qcow2"
    overlay.write_bytes(b"x")
    block_node(base)
    freeze = plan.Freeze(**dict(vars(FREEZE), overlay=str(overlay),
                                base=Layer("block", str(base), "raw")))
    monkeypatch.setattr(plan.virt, "lookup", lambda *a, **kw: None)
    monkeypatch.setattr(plan.procs, "users_of", lambda *a, **kw: [])
    assert plan.plan(None, freeze).action == KEEP


def test_plan_leaves_out_the_processes_it_is_told_to(tmp_path,
                                                     monkeypatch):
    """A dry run's digest, still running, is no user of the base."""
    overlay = tmp_path / "o.qcow2"
    overlay.write_bytes(b"x")
    freeze = plan.Freeze(**dict(vars(FREEZE), overlay=str(overlay)))
    asked = []
    monkeypatch.setattr(plan.virt, "lookup", lambda *a, **kw: None)
    monkeypatch.setattr(plan.procs, "users_of", lambda key, key_of, exclude:
                        asked.append(exclude) or [])
    plan.plan(None, freeze, exclude=(4242,))
    assert 4242 in asked[0] and os.getpid() in asked[0]


def test_from_session_reads_merged():
    state = {"key": "k", "uuid": "U", "domain": "d", "disk": "vda",
             "overlay": OVERLAY, "base": BASE, "merged": True}
    assert plan.Freeze.from_session(state).merged
    del state["merged"]
    assert not plan.Freeze.from_session(state).merged


# -- overlay_kind: lstat, never followed ------------------------------------

def test_overlay_kind(tmp_path):
    regular = tmp_path / "o.qcow2"
    regular.write_bytes(b"x")
    assert plan.overlay_kind(str(regular)) == REGULAR
    assert plan.overlay_kind(str(tmp_path / "none")) == MISSING
    assert plan.overlay_kind(None) == MISSING
    link = tmp_path / "l.qcow2"
    link.symlink_to(regular)
    assert plan.overlay_kind(str(link)) == "symlink to %s" % regular
    os.link(regular, tmp_path / "hard")
    assert plan.overlay_kind(str(regular)) == "a file with 2 hard links"
    assert plan.overlay_kind(str(tmp_path)).startswith("not a regular")


# -- observe: which sessions wait for a libvirt job ---------------------------

@pytest.fixture
def job_held(monkeypatch, golden):
    """A running domain on its base, with a libvirt job that never ends;
    returns the list of waits made for it."""
    waits = []

    def wait_no_job(dom, timeout):
        waits.append(timeout)
        return False
    parsed = golden("file_raw")
    monkeypatch.setattr(plan.virt, "lookup", lambda *a, **kw: ("dom",
                                                               parsed))
    monkeypatch.setattr(plan.virt, "wait_no_job", wait_no_job)
    monkeypatch.setattr(plan.virt, "reread", lambda dom: parsed)
    monkeypatch.setattr(plan.virt, "state", lambda dom: "running")
    return waits


def session(phase):
    return {"key": "k", "uuid": "U", "domain": "dom1", "disk": "vda",
            "overlay": "/nonexistent/o.qcow2", "base": BASE, "phase": phase}


@pytest.mark.parametrize("phase", ["frozen", "committing"])
def test_a_frozen_sessions_commit_does_not_wait_for_an_unrelated_job(
        job_held, phase):
    """A pull-mode backup or a migration (hours) on the domain: the postrun
    goes ahead instead of waiting JOB_WAIT, then failing."""
    freeze = plan.Freeze.from_session(session(phase))
    step = plan.plan(None, freeze, job_wait=60)
    assert job_held == [] and step.action == END


@pytest.mark.parametrize("phase", ["intent", "failed"])
def test_an_intent_waits_for_the_snapshot_job(job_held, phase):
    freeze = plan.Freeze.from_session(session(phase))
    step = plan.plan(None, freeze, job_wait=60)
    assert job_held == [60] and step.action == KEEP
    assert "libvirt job" in step.why


def test_an_overlay_with_no_session_waits_for_a_job(job_held):
    freeze = plan.Freeze(**dict(vars(FREEZE),
                                overlay="/nonexistent/o.qcow2"))
    assert plan.plan(None, freeze, job_wait=60).action == KEEP
    assert job_held == [60]
