"""nbdsnap.hooks.sessions: the session state machine and its store."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from nbdsnap.hooks import sessions
from nbdsnap.hooks.config import Config
from nbdsnap.hooks.errors import (ConfigError, CorruptState, LockError,
                                  LockTimeout)
from nbdsnap.hooks.procs import Holder
from nbdsnap.hooks.sessions import (BROKEN, COMMITTING, FAILED, FROZEN,
                                    INTENT, LIVE, OFFLINE, ONLINE, STALE)

KEY = "b-253-3"
A = Holder(pid=1001, start=500, boot="boot-1")
B = Holder(pid=1002, start=600, boot="boot-1")
C = Holder(pid=1003, start=700, boot="boot-1")


def alive_only(*live):
    return lambda h: h in live


nobody = alive_only()


def session(mode=ONLINE, holder=A, now=1700000000.0):
    return sessions.new_session(
        KEY, "/dev/vg0/dom1", "dom1", "6f1c0a52-3e8b-4d0a-9b8e-2c1d4a5e7f10",
        "vda", "/dev/vg0/dom1", mode, holder, now=now)


def in_phase(phase, *holders):
    state = session()
    for h in holders[1:]:
        state = sessions.join(state, h)
    return sessions.with_phase(state, phase)


# -- disk_key ----------------------------------------------------------------

def fake_stat(mode, dev=0, ino=0, rdev=0):
    # st_rdev is not in the 10-field tuple; it comes from the dict part.
    return os.stat_result((mode, ino, dev, 1, 0, 0, 0, 0, 0, 0),
                          {"st_rdev": rdev})


def test_block_device_key_is_its_device_number():
    st = fake_stat(stat.S_IFBLK | 0o660, dev=5, ino=321,
                   rdev=os.makedev(253, 3))
    assert sessions.disk_key(st) == "b-253-3"


def test_two_nodes_of_one_block_device_share_a_key():
    lv = fake_stat(stat.S_IFBLK | 0o660, dev=5, ino=100,
                   rdev=os.makedev(253, 3))
    dm = fake_stat(stat.S_IFBLK | 0o660, dev=5, ino=200,
                   rdev=os.makedev(253, 3))
    assert sessions.disk_key(lv) == sessions.disk_key(dm)


def test_file_key_is_device_and_inode(tmp_path):
    f = tmp_path / "disk.raw"
    f.write_bytes(b"x")
    st = os.stat(f)
    assert sessions.disk_key(st) == "f-%x-%d" % (st.st_dev, st.st_ino)


def test_hard_link_and_symlink_of_a_file_share_its_key(tmp_path):
    f = tmp_path / "disk.raw"
    f.write_bytes(b"x")
    os.link(f, tmp_path / "hard")
    os.symlink(f, tmp_path / "soft")
    keys = {sessions.disk_key(os.stat(tmp_path / n))
            for n in ("disk.raw", "hard", "soft")}
    assert len(keys) == 1


def test_copy_of_a_file_has_another_key(tmp_path):
    (tmp_path / "a").write_bytes(b"x")
    (tmp_path / "b").write_bytes(b"x")
    assert (sessions.disk_key(os.stat(tmp_path / "a"))
            != sessions.disk_key(os.stat(tmp_path / "b")))


# -- new_session ---------------------------------------------------------------

def test_online_session_starts_with_intent():
    s = session(ONLINE)
    assert s["phase"] == INTENT
    assert s["holders"] == [A.to_json()]
    assert s["consistency"] is None
    assert s["version"] == sessions.VERSION
    assert s["created"] == s["updated"] == 1700000000.0


def test_offline_session_is_frozen_at_once():
    s = session(OFFLINE)
    assert s["phase"] == FROZEN
    assert s["consistency"] == "offline"


def test_session_id_carries_the_time_and_differs_each_time():
    a, b = session(), session()
    assert a["id"].startswith("20231114T221320-")
    assert a["id"] != b["id"]


def test_new_session_survives_json():
    s = session()
    assert json.loads(json.dumps(s)) == s


# -- assess ----------------------------------------------------------------------

def test_frozen_with_a_live_holder_is_live():
    assert sessions.assess(in_phase(FROZEN, A, B), alive_only(B)) == LIVE


def test_frozen_with_only_dead_holders_is_stale():
    assert sessions.assess(in_phase(FROZEN, A, B), nobody) == STALE


def test_frozen_with_no_holders_is_stale():
    s = sessions.with_phase(session(), FROZEN, holders=[])
    assert sessions.assess(s, lambda h: True) == STALE


@pytest.mark.parametrize("phase", [INTENT, COMMITTING])
@pytest.mark.parametrize("alive", [True, False])
def test_half_done_phase_seen_under_the_lock_is_stale(phase, alive):
    # Only a hook that died half way leaves intent or committing behind.
    assert sessions.assess(in_phase(phase, A), lambda h: alive) == STALE


@pytest.mark.parametrize("alive", [True, False])
def test_failed_commit_is_broken_whoever_is_alive(alive):
    assert sessions.assess(in_phase(FAILED, A), lambda h: alive) == BROKEN


# -- join and leave -------------------------------------------------------------

def test_join_adds_a_holder():
    s = sessions.join(in_phase(FROZEN, A), B, now=1700000100.0)
    assert s["holders"] == [A.to_json(), B.to_json()]
    assert s["phase"] == FROZEN
    assert s["updated"] == 1700000100.0


def test_join_twice_is_a_no_op():
    once = sessions.join(in_phase(FROZEN, A), B)
    twice = sessions.join(once, B)
    assert twice["holders"] == once["holders"]


def test_join_does_not_change_the_state_it_was_given():
    s = in_phase(FROZEN, A)
    before = json.dumps(s, sort_keys=True)
    sessions.join(s, B)
    assert json.dumps(s, sort_keys=True) == before


def test_same_pid_with_another_start_is_another_holder():
    reused = Holder(A.pid, A.start + 1, A.boot)
    s = sessions.join(in_phase(FROZEN, A), reused)
    assert len(s["holders"]) == 2


def test_leave_removes_the_holder_and_counts_live_ones():
    s = in_phase(FROZEN, A, B, C)
    new, was, left = sessions.leave(s, B, alive_only(A, B))
    assert new["holders"] == [A.to_json(), C.to_json()]
    assert was is True
    assert left == [A]


def test_last_live_holder_leaving_leaves_none_alive():
    s = in_phase(FROZEN, A, B)
    new, was, left = sessions.leave(s, B, alive_only(B))
    assert was and left == []
    assert new["holders"] == [A.to_json()]   # the dead one stays on record


def test_leave_by_a_stranger_says_so():
    s = in_phase(FROZEN, A)
    new, was, left = sessions.leave(s, B, alive_only(A))
    assert was is False
    assert new["holders"] == [A.to_json()]
    assert left == [A]


def test_leave_does_not_change_the_state_it_was_given():
    s = in_phase(FROZEN, A, B)
    before = json.dumps(s, sort_keys=True)
    sessions.leave(s, A, nobody)
    assert json.dumps(s, sort_keys=True) == before


def test_holders_come_back_as_holders():
    assert sessions.holders(in_phase(FROZEN, A, B)) == [A, B]
    assert sessions.live_holders(in_phase(FROZEN, A, B), alive_only(B)) == [B]


def test_with_phase_keeps_everything_else():
    s = session()
    new = sessions.with_phase(s, FROZEN, now=1700000200.0, overlay="/o.qcow2")
    assert new["phase"] == FROZEN and new["overlay"] == "/o.qcow2"
    assert new["updated"] == 1700000200.0
    assert {k: v for k, v in new.items()
            if k not in ("phase", "overlay", "updated")} == \
        {k: v for k, v in s.items() if k not in ("phase", "overlay", "updated")}


# -- SessionStore: folders --------------------------------------------------------

@pytest.fixture
def cfg(tmp_path):
    return Config(state_dir=str(tmp_path / "state"),
                  snapshot_dir=str(tmp_path / "state" / "overlays"),
                  lock_timeout=0.3)


@pytest.fixture
def store(cfg):
    s = sessions.SessionStore(cfg)
    s.prepare()
    return s


def mode_of(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_prepare_creates_the_folders_with_their_modes(cfg):
    sessions.SessionStore(cfg).prepare()
    assert mode_of(cfg.state_dir) == 0o711
    assert mode_of(cfg.snapshot_dir) == 0o711
    assert mode_of(cfg.sessions_dir) == 0o700
    assert mode_of(cfg.locks_dir) == 0o700


def test_prepare_twice_is_fine(store):
    store.prepare()


@pytest.fixture
def strict_umask():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_prepare_modes_do_not_depend_on_the_umask(cfg, strict_umask):
    sessions.SessionStore(cfg).prepare()
    assert mode_of(cfg.state_dir) == 0o711
    assert mode_of(cfg.snapshot_dir) == 0o711


def test_prepare_refuses_a_symlink_in_place_of_a_folder(cfg, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.symlink(elsewhere, cfg.state_dir)
    with pytest.raises(ConfigError, match="state.*not a directory"):
        sessions.SessionStore(cfg).prepare()


def test_prepare_refuses_a_symlinked_sessions_folder(cfg, tmp_path):
    os.makedirs(cfg.state_dir, mode=0o711)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.symlink(elsewhere, cfg.sessions_dir)
    with pytest.raises(ConfigError, match="sessions"):
        sessions.SessionStore(cfg).prepare()


def test_prepare_refuses_a_dangling_symlink(cfg, tmp_path):
    os.symlink(tmp_path / "nowhere", cfg.state_dir)
    with pytest.raises(ConfigError, match="state"):
        sessions.SessionStore(cfg).prepare()
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o1777])
def test_prepare_refuses_a_folder_others_can_write(cfg, mode):
    os.makedirs(cfg.state_dir)
    os.chmod(cfg.state_dir, mode)
    with pytest.raises(ConfigError, match="writable by group or others"):
        sessions.SessionStore(cfg).prepare()


def test_prepare_refuses_a_file_in_place_of_a_folder(cfg):
    os.makedirs(cfg.state_dir, mode=0o711)
    with open(cfg.sessions_dir, "w"):
        pass
    with pytest.raises(ConfigError, match="sessions"):
        sessions.SessionStore(cfg).prepare()


# -- SessionStore: state files ----------------------------------------------------

def test_saved_session_loads_back(store):
    s = session()
    store.save(s)
    assert store.load(KEY) == s


def test_save_replaces_the_previous_state(store):
    store.save(session())
    store.save(sessions.with_phase(session(), FROZEN))
    assert store.load(KEY)["phase"] == FROZEN


def test_saved_state_is_private_and_leaves_no_temp_file(store, cfg):
    store.save(session())
    store.save(session())
    assert os.listdir(cfg.sessions_dir) == [KEY + ".json"]
    assert mode_of(os.path.join(cfg.sessions_dir, KEY + ".json")) == 0o600


def test_saved_state_is_private_even_under_a_loose_umask(store, cfg):
    old = os.umask(0)
    try:
        store.save(session())
    finally:
        os.umask(old)
    assert mode_of(os.path.join(cfg.sessions_dir, KEY + ".json")) == 0o600


def test_failed_save_leaves_the_old_state_and_no_temp_file(store, cfg):
    store.save(session())
    bad = dict(session(), phase=FROZEN, oops=object())   # not JSON
    with pytest.raises(TypeError):
        store.save(bad)
    assert os.listdir(cfg.sessions_dir) == [KEY + ".json"]
    assert store.load(KEY)["phase"] == INTENT


def test_load_of_an_unknown_disk_is_none(store):
    assert store.load("b-7-99") is None


def test_delete_removes_the_session(store):
    store.save(session())
    store.delete(KEY)
    assert store.load(KEY) is None
    store.delete(KEY)   # twice is fine


def test_keys_lists_saved_sessions_only(store, cfg):
    store.save(session())
    with open(os.path.join(cfg.sessions_dir, ".tmp-abc"), "w"):
        pass
    assert store.keys() == [KEY]


def test_keys_before_prepare_is_empty(cfg):
    assert sessions.SessionStore(cfg).keys() == []


def write_state(cfg, key, data):
    path = os.path.join(cfg.sessions_dir, key + ".json")
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.mark.parametrize("data", [
    pytest.param(b"", id="empty"),
    pytest.param(json.dumps(session()).encode()[:40], id="truncated"),
    pytest.param(b"\xff\xfe\x00garbage", id="garbage"),
    pytest.param(b"[1, 2, 3]", id="not-an-object"),
    pytest.param(json.dumps(dict(session(), version=99)).encode(),
                 id="foreign-version"),
    pytest.param(json.dumps(dict(session(), phase="thawed")).encode(),
                 id="unknown-phase"),
    pytest.param(json.dumps(dict(session(), key="b-7-3")).encode(),
                 id="wrong-key"),
])
def test_unreadable_state_is_corrupt_and_names_the_file(store, cfg, data):
    path = write_state(cfg, KEY, data)
    with pytest.raises(CorruptState) as e:
        store.load(KEY)
    assert path in str(e.value)


def holder_entry(**changes):
    return dict(A.to_json(), **changes)


@pytest.mark.parametrize("holder", [
    pytest.param("1001", id="a-string"),
    pytest.param(None, id="null"),
    pytest.param({"pid": 1001, "start": 500}, id="no-boot"),
    pytest.param(holder_entry(pid="abc"), id="pid-not-a-number"),
    pytest.param(holder_entry(pid=1.5), id="pid-a-float"),
    pytest.param(holder_entry(pid=0), id="pid-zero"),
    pytest.param(holder_entry(pid=True), id="pid-a-boolean"),
    pytest.param(holder_entry(start=[1]), id="start-a-list"),
    pytest.param(holder_entry(boot=7), id="boot-a-number"),
])
def test_malformed_holder_is_corrupt_state(store, cfg, holder):
    data = dict(session(), holders=[A.to_json(), holder])
    path = write_state(cfg, KEY, json.dumps(data).encode())
    with pytest.raises(CorruptState, match="malformed holder") as e:
        store.load(KEY)
    assert path in str(e.value)


@pytest.mark.parametrize("changes", [
    pytest.param({"holders": {"pid": 1}}, id="holders-not-a-list"),
    pytest.param({"mode": "sideways"}, id="unknown-mode"),
    pytest.param({"uuid": None}, id="uuid-null"),
    pytest.param({"export": 42}, id="export-a-number"),
    pytest.param({"overlay": ["/o"]}, id="overlay-a-list"),
    pytest.param({"created": "yesterday"}, id="created-a-string"),
    # Each of these went into the history, status, qemu-img or lxml as it
    # was and ended the command there in a traceback.
    pytest.param({"created": 1e300}, id="created-past-time_t"),
    pytest.param({"updated": -5.0}, id="updated-before-1970"),
    pytest.param({"consistency": 1}, id="consistency-a-number"),
    pytest.param({"base_type": ["file"]}, id="base_type-a-list"),
    pytest.param({"base_format": 7}, id="base_format-a-number"),
    pytest.param({"warning": {"w": 1}}, id="warning-an-object"),
    pytest.param({"error": 3}, id="error-a-number"),
])
def test_mistyped_field_is_corrupt_state(store, cfg, changes):
    write_state(cfg, KEY, json.dumps(dict(session(), **changes)).encode())
    with pytest.raises(CorruptState):
        store.load(KEY)


@pytest.mark.parametrize("text", [
    pytest.param('"created": NaN', id="created-nan"),
    pytest.param('"created": Infinity', id="created-infinity"),
    pytest.param('"updated": -Infinity', id="updated-minus-infinity"),
])
def test_no_finite_time_is_corrupt_state(store, cfg, text):
    # json.load reads NaN and Infinity, which no status can print.
    data = json.dumps(session()).replace(
        '"%s": 1700000000.0' % text.split('"')[1], text)
    assert text in data
    write_state(cfg, KEY, data.encode())
    with pytest.raises(CorruptState, match="is no time"):
        store.load(KEY)


@pytest.mark.parametrize("count", [
    pytest.param("3", id="a-string"),
    pytest.param(-1, id="negative"),
    pytest.param(2.5, id="a-float"),
    pytest.param(True, id="a-boolean"),
    pytest.param(None, id="null"),
])
def test_malformed_connections_is_corrupt_state(store, cfg, count):
    write_state(cfg, KEY, json.dumps(dict(session(), connections=count))
                .encode())
    with pytest.raises(CorruptState, match="connections"):
        store.load(KEY)


def digest_info(**changes):
    return dict(A.to_json(), manifest="/m/dom1-vda.manifest") | changes


@pytest.mark.parametrize("info", [
    pytest.param("/m/dom1-vda.manifest", id="a-string"),
    pytest.param({}, id="empty"),
    pytest.param({"pid": 1001, "start": 500, "boot": "b"}, id="no-manifest"),
    pytest.param(digest_info(manifest=7), id="manifest-a-number"),
    pytest.param({"manifest": "/m", "pid": 1001}, id="pid-without-start"),
    pytest.param(digest_info(pid="1001"), id="pid-a-string"),
    pytest.param(digest_info(start=None), id="start-null"),
    pytest.param(digest_info(boot=1), id="boot-a-number"),
])
def test_malformed_digest_is_corrupt_state(store, cfg, info):
    write_state(cfg, KEY, json.dumps(dict(session(), digest=info)).encode())
    with pytest.raises(CorruptState, match="malformed digest"):
        store.load(KEY)


@pytest.mark.parametrize("info", [
    pytest.param(None, id="none"),
    pytest.param({"manifest": "/m/dom1-vda.manifest"}, id="no-process"),
    pytest.param(digest_info(), id="with-its-process"),
])
def test_digest_as_digest_start_stores_it_loads(store, info):
    s = dict(session(), digest=info)
    store.save(s)
    assert store.load(KEY) == s


def test_extra_fields_are_no_corruption(store):
    s = dict(session(), later_field={"x": 1},
             holders=[holder_entry(note="kept")])
    store.save(s)
    assert store.load(KEY) == s


def test_folder_in_place_of_the_state_file_is_corrupt_state(store, cfg):
    path = os.path.join(cfg.sessions_dir, KEY + ".json")
    os.mkdir(path)
    with pytest.raises(CorruptState, match="not a regular file") as e:
        store.load(KEY)
    assert path in str(e.value)


def test_fifo_in_place_of_the_state_file_does_not_hang(store, cfg):
    os.mkfifo(os.path.join(cfg.sessions_dir, KEY + ".json"))
    with pytest.raises(CorruptState, match="not a regular file"):
        store.load(KEY)


def test_symlinked_state_file_is_not_followed(store, cfg, tmp_path):
    target = tmp_path / "planted.json"
    target.write_text(json.dumps(session()))
    path = os.path.join(cfg.sessions_dir, KEY + ".json")
    os.symlink(target, path)
    with pytest.raises(CorruptState, match=path):
        store.load(KEY)


# -- DiskLock ---------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()
""")


@pytest.fixture
def holder_process():
    """hold(path) -> a child process that holds the flock on path."""
    children = []

    def hold(path):
        p = subprocess.Popen([sys.executable, "-c", HOLD, path],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
        children.append(p)
        assert p.stdout.readline() == "locked\n"
        return p

    yield hold
    for p in children:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=5)


def test_lock_is_free_when_nobody_holds_it(store):
    with store.lock(KEY) as lock:
        assert lock.fd is not None
    assert lock.fd is None


def test_lock_file_is_private(store, cfg):
    with store.lock(KEY):
        pass
    assert mode_of(os.path.join(cfg.locks_dir, KEY + ".lock")) == 0o600


def test_lock_held_by_another_process_times_out(store, cfg, holder_process):
    holder_process(os.path.join(cfg.locks_dir, KEY + ".lock"))
    started = time.monotonic()
    with pytest.raises(LockTimeout, match=KEY + r"\.lock.*0\.3 s"):
        with store.lock(KEY):
            pytest.fail("got a lock another process holds")
    waited = time.monotonic() - started
    assert 0.3 <= waited < 1.5


def test_lock_is_taken_once_the_other_process_lets_go(cfg, store,
                                                       holder_process):
    path = os.path.join(cfg.locks_dir, KEY + ".lock")
    p = holder_process(path)
    lock = sessions.DiskLock(path, timeout=5, poll=0.01)
    p.stdin.close()       # the holder exits and the kernel drops its flock
    with lock:
        pass


def test_lock_of_a_killed_holder_is_free(store, cfg, holder_process):
    p = holder_process(os.path.join(cfg.locks_dir, KEY + ".lock"))
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=5)
    with store.lock(KEY):
        pass


def test_locks_of_two_disks_are_independent(store, cfg, holder_process):
    holder_process(os.path.join(cfg.locks_dir, "b-7-3.lock"))
    with store.lock(KEY):
        pass


def test_symlink_planted_at_the_lock_path_is_not_followed(store, cfg,
                                                          tmp_path):
    target = tmp_path / "victim"
    target.write_text("precious")
    os.symlink(target, os.path.join(cfg.locks_dir, KEY + ".lock"))
    with pytest.raises(LockError, match="cannot open lock file"):
        with store.lock(KEY):
            pytest.fail("locked through a symlink")
    assert target.read_text() == "precious"


def test_dangling_symlink_at_the_lock_path_creates_nothing(store, cfg,
                                                           tmp_path):
    target = tmp_path / "created-by-lock"
    os.symlink(target, os.path.join(cfg.locks_dir, KEY + ".lock"))
    with pytest.raises(LockError, match="cannot open lock file"):
        with store.lock(KEY):
            pass
    assert not target.exists()


HOLD_DISK_LOCK = textwrap.dedent("""
    import sys
    from nbdsnap.hooks.sessions import DiskLock
    with DiskLock(sys.argv[1], timeout=5):
        print("locked", flush=True)
        sys.stdin.read()
""")


def test_timeout_names_the_process_that_holds_the_lock(store, cfg):
    path = os.path.join(cfg.locks_dir, KEY + ".lock")
    p = subprocess.Popen([sys.executable, "-c", HOLD_DISK_LOCK, path],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline() == "locked\n"
        with pytest.raises(LockTimeout, match=r"^pid %d \(\S*python\S* -c "
                           % p.pid):
            with store.lock(KEY):
                pytest.fail("got a lock another process holds")
    finally:
        p.stdin.close()
        p.wait(timeout=10)


def test_lock_in_a_missing_folder_creates_no_folder(cfg):
    lock = sessions.DiskLock(os.path.join(cfg.locks_dir, KEY + ".lock"),
                             timeout=0.3)
    with pytest.raises(LockError, match="cannot open lock file"):
        with lock:
            pass
    assert not os.path.exists(cfg.state_dir)


def test_lock_can_be_taken_again_after_release(store):
    with store.lock(KEY):
        pass
    with store.lock(KEY) as lock:
        assert lock.fd is not None


def test_disk_lock_of_a_holder_killed_by_sigkill_is_free(store, cfg):
    path = os.path.join(cfg.locks_dir, KEY + ".lock")
    p = subprocess.Popen([sys.executable, "-c", HOLD_DISK_LOCK, path],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline() == "locked\n"
    p.kill()
    p.wait(timeout=10)
    with store.lock(KEY):
        pass


# -- groups: disks frozen at one instant -----------------------------------

KEY2 = "b-253-4"
GROUP = {"id": "g1", "members": [
    {"key": KEY, "disk": "vda", "export": "/dev/vg0/dom1"},
    {"key": KEY2, "disk": "vdb", "export": "/dev/vg0/dom1-b"}]}


def member(key, disk, holder, group=GROUP):
    return sessions.with_phase(sessions.new_session(
        key, "/dev/vg0/" + disk, "dom1", "U", disk, "/dev/vg0/" + disk,
        ONLINE, holder, group=group), FROZEN)


def test_a_disk_frozen_with_others_starts_with_no_holder():
    state = member(KEY2, "vdb", None)
    assert state["holders"] == [] and state["connections"] == 0
    assert state["group"] == GROUP
    assert sessions.malformed(json.loads(json.dumps(state)), KEY2) is None


def test_a_member_is_live_while_another_disk_of_its_group_is_held():
    vda, vdb = member(KEY, "vda", A), member(KEY2, "vdb", None)
    assert vdb.assess(alive_only(A)) == STALE          # alone: no holder
    assert vdb.assess(alive_only(A), [vda]) == LIVE
    assert vdb.assess(nobody, [vda]) == STALE
    assert vda.assess(nobody, [vdb]) == STALE


def test_only_a_frozen_session_of_the_same_group_holds_a_member():
    vdb = member(KEY2, "vdb", None)
    other_group = member(KEY, "vda", A, dict(GROUP, id="g2"))
    alone = member(KEY, "vda", A, None)
    failed = sessions.with_phase(member(KEY, "vda", A), FAILED)
    for peer in (other_group, alone, failed):
        assert vdb.assess(alive_only(A), [peer]) == STALE


def test_a_failed_member_stays_broken_even_while_its_group_is_held():
    vda = member(KEY, "vda", A)
    vdb = sessions.with_phase(member(KEY2, "vdb", None), FAILED)
    assert vdb.assess(alive_only(A), [vda]) == BROKEN


def test_group_keys_and_disks_name_every_member():
    vdb = member(KEY2, "vdb", None)
    assert vdb.group_keys() == [KEY, KEY2]
    assert vdb.group_disks() == ["vda", "vdb"]
    assert session().group_keys() == [KEY]
    assert "frozen with vda)" in vdb.describe()
    assert "frozen with" not in session().describe()


@pytest.mark.parametrize("group", [
    "g1", {"id": 1, "members": []}, {"id": "g1", "members": "vda"},
    {"id": "g1", "members": [{"key": KEY2, "disk": "vdb", "export": "/x"}]},
    {"id": "g1", "members": [{"key": KEY, "disk": 3, "export": "/x"}]},
])
def test_a_malformed_group_is_no_session(group):
    state = json.loads(json.dumps(session()))
    state["group"] = group
    assert "malformed group" in sessions.malformed(state, KEY)


def test_peers_are_read_from_the_store_and_assessed_with_them(store):
    vda, vdb = member(KEY, "vda", A), member(KEY2, "vdb", None)
    store.save(vda)
    store.save(vdb)
    assert [p["key"] for p in store.peers(vdb)] == [KEY]
    with open(os.path.join(store.config.sessions_dir, KEY + ".json"),
              "w") as f:
        f.write("{")                         # a corrupt peer holds nothing
    assert store.peers(vdb) == []
    assert store.assess(vdb, alive_only(A)) == STALE


def test_group_lock_takes_every_member_s_lock_and_yields_the_session(store):
    store.save(member(KEY2, "vdb", None))
    with store.group_lock(KEY2) as state:
        assert state["key"] == KEY2
        assert sorted(store.held_keys()) == [KEY, KEY2]
        with pytest.raises(LockTimeout):
            with store.lock(KEY):
                pass
    assert store.held_keys() == []
    with store.lock(KEY):           # released
        pass


def test_group_lock_of_a_disk_with_no_session_takes_the_extra_keys(store):
    with store.group_lock(KEY, ["b-1-1"]) as state:
        assert state is None
        assert sorted(store.held_keys()) == ["b-1-1", KEY]


def test_group_lock_takes_another_turn_when_the_group_grew(store,
                                                           monkeypatch):
    """Read before the locks, the session had no group; under them it has
    one: the locks are taken again, with the group's."""
    store.save(member(KEY2, "vdb", None))
    monkeypatch.setattr(store, "_peek_group", lambda key: [])
    turns = []
    real = store.locks

    def counting(keys):
        turns.append(sorted(set(keys)))
        return real(keys)
    monkeypatch.setattr(store, "locks", counting)
    with store.group_lock(KEY2) as state:
        assert state["key"] == KEY2
    assert turns == [[KEY2], [KEY, KEY2]]
