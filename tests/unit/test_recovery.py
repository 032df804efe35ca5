"""recover.Recovery with its outside parts faked: what it waits for and in
which order, without libvirt (the real cases are tests/real/test_recover)."""

import subprocess
import time

import pytest

from nbdsnap.hooks import config, freeze, procs, recover, sessions


@pytest.fixture
def freezer(tmp_path):
    conf = config.Config(state_dir=str(tmp_path / "state"),
                         snapshot_dir=str(tmp_path / "overlays"),
                         manifest_dir=str(tmp_path / "manifests"),
                         digest_timeout=30, lock_timeout=5)
    f = freeze.Freezer(conf)
    f.store.prepare()
    return f


def stale_session(freezer, mode, **extra):
    """A session whose only holder is long gone (pid 1's start, reused)."""
    gone = procs.Holder(pid=1, start=-1, boot=procs.boot_id())
    state = sessions.new_session("k-1-2", "/srv/vm/base.raw", "dom1", "U",
                                 "vda", "/srv/vm/base.raw", mode, gone,
                                 **extra)
    freezer.store.save(state)
    return state


@pytest.fixture
def digest_running():
    """A process that stands for a session's background digest."""
    proc = subprocess.Popen(["sleep", "1.5"])
    yield proc
    proc.kill()
    proc.wait()


def test_an_offline_session_waits_for_its_digest(freezer, digest_running):
    """Ending the session without the wait would let the next freeze (and
    its digest) start while the old digest still writes the manifest."""
    holder = procs.holder_of(digest_running.pid)
    state = stale_session(freezer, sessions.OFFLINE)
    state["digest"] = dict(holder.to_json(), manifest="/nonexistent")
    freezer.store.save(state)
    out = []
    recovery = recover.Recovery(freezer.config, out=out.append)
    case = recover.Case(state["key"], state["export"], None, state)
    started = time.monotonic()
    assert recovery.locked(None, case, state)
    assert digest_running.poll() is not None, "recover did not wait"
    assert time.monotonic() - started >= 1
    assert freezer.store.load(state["key"]) is None
    assert out == ["/srv/vm/base.raw: recovered (nothing was snapshotted)"]


def test_an_online_session_waits_for_its_digest_before_it_plans(
        freezer, digest_running, monkeypatch):
    """plan() lists the base's users: a running digest would be one, and
    what it observes must be what the commit finds."""
    holder = procs.holder_of(digest_running.pid)
    state = stale_session(freezer, sessions.ONLINE,
                          overlay="/nonexistent/o.qcow2")
    state["digest"] = dict(holder.to_json(), manifest="/nonexistent")
    freezer.store.save(state)
    planned = []

    def plan(conn, freeze_, **kw):
        planned.append(digest_running.poll())
        return recover.plan.Step(recover.plan.KEEP, "kept for the test")
    monkeypatch.setattr(recover.plan, "plan", plan)
    monkeypatch.setattr(recover.procs, "servers_with_open",
                        lambda *a, **kw: [])
    recovery = recover.Recovery(freezer.config, out=lambda line: None)
    case = recover.Case(state["key"], state["export"], None, state)
    assert not recovery.locked(None, case, state)
    assert planned and planned[0] is not None, "planned before the digest"


def test_a_dry_run_does_not_wait_for_the_digest(freezer, digest_running):
    holder = procs.holder_of(digest_running.pid)
    state = stale_session(freezer, sessions.OFFLINE)
    state["digest"] = dict(holder.to_json(), manifest="/nonexistent")
    out = []
    recovery = recover.Recovery(freezer.config, out=out.append, dry_run=True)
    case = recover.Case(state["key"], state["export"], None, state)
    assert recovery.locked(None, case, state)
    assert digest_running.poll() is None
    assert "would end the session" in out[0]


def test_a_dry_run_decides_as_if_the_digest_had_ended(
        freezer, digest_running, monkeypatch):
    """The real run waits for the digest, then looks at who has the base
    open: the dry run must not count the digest as a user of the base, or
    it promises a 'keep' where the run commits."""
    holder = procs.holder_of(digest_running.pid)
    state = stale_session(freezer, sessions.ONLINE,
                          overlay="/nonexistent/o.qcow2")
    state["digest"] = dict(holder.to_json(), manifest="/nonexistent")
    excluded = []

    def plan(conn, freeze_, exclude=()):
        excluded.extend(exclude)
        return recover.plan.Step(recover.plan.OFFLINE, "as the run will")
    monkeypatch.setattr(recover.plan, "plan", plan)
    monkeypatch.setattr(recover.procs, "servers_with_open",
                        lambda *a, **kw: [])
    out = []
    recovery = recover.Recovery(freezer.config, out=out.append, dry_run=True)
    case = recover.Case(state["key"], state["export"], None, state)
    assert recovery.locked(None, case, state)
    assert digest_running.poll() is None          # not waited for
    assert excluded == [digest_running.pid]
    assert out == ["/srv/vm/base.raw: would wait for the digest, pid %d, "
                   "to end" % digest_running.pid,
                   "/srv/vm/base.raw: would offline commit: as the run will"]


# -- a group: recovering one disk recovers the disks frozen with it -----------

def grouped(key, disk, members):
    """A stale case of disk, frozen with members [(key, disk)]."""
    group = sessions.new_group([(k, d, "/srv/vm/%s.raw" % d)
                                for k, d in members])
    state = sessions.new_session(key, "/srv/vm/%s.raw" % disk, "dom1", "U",
                                 disk, "/srv/vm/%s.raw" % disk,
                                 sessions.ONLINE, None, group=group)
    return recover.Case(key, state["export"], None, state)


def test_a_disk_asked_for_brings_the_disks_frozen_with_it(freezer):
    lines = []
    r = recover.Recovery(freezer.config, out=lines.append)
    members = [("k-1", "vda"), ("k-2", "vdb")]
    wanted = {"k-1": "/srv/vm/vda.raw"}
    r._with_groups([grouped("k-1", "vda", members),
                    grouped("k-2", "vdb", members)], wanted)
    assert wanted == {"k-1": "/srv/vm/vda.raw", "k-2": "/srv/vm/vdb.raw"}
    assert lines == ["/srv/vm/vdb.raw: frozen at one instant with "
                     "/srv/vm/vda.raw, recovered with it"]


def test_a_disk_whose_session_ended_still_brings_its_group(freezer):
    """A postrun killed between the commits of vda and vdb: vda's session
    is gone, vdb's names it; recover of vda recovers vdb."""
    lines = []
    r = recover.Recovery(freezer.config, out=lines.append)
    wanted = {"k-1": "/srv/vm/vda.raw"}
    other = grouped("k-3", "vdc", [("k-3", "vdc"), ("k-4", "vdd")])
    r._with_groups([grouped("k-2", "vdb", [("k-1", "vda"), ("k-2", "vdb")]),
                    other], wanted)
    assert sorted(wanted) == ["k-1", "k-2"]
    assert len(lines) == 1 and "recovered with it" in lines[0]
