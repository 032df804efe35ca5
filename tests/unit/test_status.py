"""nbdsnap.hooks.status: sessions, orphans and host problems, as printed."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from nbdsnap.hooks import health, sessions, status
from nbdsnap.hooks.config import Config
from nbdsnap.hooks.procs import Holder

KEY = "b-253-3"
DEAD = Holder(pid=1001, start=500, boot="another-boot")
GiB = 1 << 30


@pytest.fixture
def cfg(tmp_path):
    return Config(state_dir=str(tmp_path / "state"),
                  snapshot_dir=str(tmp_path / "state" / "overlays"),
                  manifest_dir=str(tmp_path / "state" / "manifests"),
                  path=str(tmp_path / "nbdsnap.conf"))


@pytest.fixture
def store(cfg):
    s = sessions.SessionStore(cfg)
    s.prepare()
    return s


@pytest.fixture
def roomy(monkeypatch):
    """snapshot_dir's file system has room, whatever this machine's has."""
    monkeypatch.setattr(health, "low_space", lambda free, size: False)


def frozen(cfg, key=KEY, **changes):
    overlay = os.path.join(cfg.snapshot_dir, "nbdsnap-dom1-vda-1.qcow2")
    state = sessions.new_session(
        key, "/dev/vg0/dom1", "dom1", "6f1c0a52-3e8b-4d0a-9b8e-2c1d4a5e7f10",
        "vda", "/dev/vg0/dom1", sessions.ONLINE, DEAD, overlay=overlay)
    return sessions.with_phase(state, sessions.FROZEN, **changes)


def plant_overlay(state):
    with open(state["overlay"], "wb") as f:
        f.write(b"QFI\xfb")
    return state["overlay"]


def report(cfg, domain_states=None):
    return status.report(cfg, domain_states=domain_states)


def json_report(cfg, domain_states=None):
    return json.loads(status.report(cfg, as_json=True,
                                    domain_states=domain_states))


# -- corrupt sessions never hide the overlays --------------------------------

def test_folder_in_place_of_a_session_is_corrupt_and_overlays_show(
        cfg, store, roomy):
    os.mkdir(os.path.join(cfg.sessions_dir, KEY + ".json"))
    overlay = plant_overlay(frozen(cfg))
    out = json_report(cfg)["sessions"]
    assert [(e["phase"], e.get("overlay")) for e in out] == [
        ("corrupt", None), ("orphan", overlay)]
    text = report(cfg)
    assert "%s: CORRUPT: " % KEY in text and "not a regular file" in text
    assert "recover --all" in text
    assert overlay + "  ORPHAN" in text


def test_malformed_holder_is_corrupt_and_its_overlay_shows(cfg, store,
                                                           roomy):
    state = frozen(cfg)
    state["holders"] = [{"pid": "not-a-pid", "start": 1, "boot": "x"}]
    with open(os.path.join(cfg.sessions_dir, KEY + ".json"), "w") as f:
        json.dump(state, f)
    overlay = plant_overlay(state)
    text = report(cfg)
    assert "CORRUPT" in text and "malformed holder" in text
    assert overlay + "  ORPHAN" in text


def test_session_created_at_nan_is_corrupt_in_nbdsnap_status(cfg, store):
    # json.load reads NaN: status once ended in "internal error" on it.
    state = frozen(cfg, created=float("nan"))
    with open(os.path.join(cfg.sessions_dir, KEY + ".json"), "w") as f:
        json.dump(state, f)
    overlay = plant_overlay(state)
    with open(cfg.path, "w") as f:
        f.write("[nbdsnap]\nstate_dir = %s\nsnapshot_dir = %s\n"
                % (cfg.state_dir, cfg.snapshot_dir))
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "nbdsnap"), "status"],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, NBDSNAP_CONFIG=cfg.path))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "CORRUPT" in proc.stdout and "created nan is no time" in proc.stdout
    assert overlay + "  ORPHAN" in proc.stdout


def test_nothing_at_all_is_clean(cfg, store, roomy):
    assert report(cfg) == ("no sessions and no overlays: every exported "
                           "disk is clean")
    assert json_report(cfg) == {"sessions": [], "problems": [],
                                "manifests": []}


def test_planted_lock_symlink_is_a_problem(cfg, store, roomy, tmp_path):
    lock = os.path.join(cfg.locks_dir, KEY + ".lock")
    os.symlink(tmp_path / "victim", lock)
    text = report(cfg)
    assert "clean" not in text
    (line,) = text.splitlines()[:1]
    assert line.startswith("PROBLEM  %s is a symlink" % lock)
    assert "every prerun" in line and "rm -r %s" % lock in line
    (problem,) = json_report(cfg)["problems"]
    assert problem["kind"] == "lock" and problem["path"] == lock


def test_lock_problem_names_the_export_of_a_session(cfg, store, roomy):
    store.save(frozen(cfg))
    os.mkdir(os.path.join(cfg.locks_dir, KEY + ".lock"))
    assert "is a folder, not a lock file: every prerun, postrun and " \
           "recover of export /dev/vg0/dom1" in report(cfg)


def test_domain_lock_problem_names_the_domain(cfg, store, roomy, tmp_path):
    os.symlink(tmp_path, os.path.join(cfg.locks_dir, "domain-u-1.lock"))
    assert "of domain u-1 (its snapshots and commits)" in report(cfg)


def test_regular_lock_files_are_no_problem(cfg, store, roomy):
    with store.lock(KEY):
        pass
    assert json_report(cfg)["problems"] == []


@pytest.mark.parametrize("folder", ["state_dir", "sessions_dir", "locks_dir",
                                    "snapshot_dir"])
def test_folder_the_hooks_refuse_is_a_problem(cfg, store, roomy, folder):
    path = getattr(cfg, folder)
    os.chmod(path, 0o777)
    (problem,) = json_report(cfg)["problems"]
    assert problem["kind"] == "folder" and problem["path"] == path
    assert "writable by group or others" in problem["message"]
    assert "chmod go-w %s" % path in problem["message"]


def digest_cfg(cfg, tmp_path):
    return dataclasses.replace(cfg, digest=True,
                               manifest_dir=str(tmp_path / "manifests"))


@pytest.mark.parametrize("plant", ["writable", "symlink", "file"])
def test_manifest_dir_the_digest_refuses_is_a_problem(cfg, store, roomy,
                                                      tmp_path, plant):
    cfg = digest_cfg(cfg, tmp_path)
    if plant == "writable":
        os.mkdir(cfg.manifest_dir)
        os.chmod(cfg.manifest_dir, 0o777)
    elif plant == "symlink":
        os.symlink(tmp_path, cfg.manifest_dir)
    else:
        open(cfg.manifest_dir, "w").close()
    (problem,) = json_report(cfg)["problems"]
    assert problem["kind"] == "folder"
    assert problem["path"] == cfg.manifest_dir
    assert "every session gets no manifest (digest = on)" in \
        problem["message"]
    assert "PROBLEM  %s" % cfg.manifest_dir in report(cfg)


def test_manifest_dir_is_no_problem_without_the_digest(cfg, store, roomy,
                                                       tmp_path):
    cfg = dataclasses.replace(digest_cfg(cfg, tmp_path), digest=False)
    os.mkdir(cfg.manifest_dir)
    os.chmod(cfg.manifest_dir, 0o777)
    assert json_report(cfg)["problems"] == []


def test_sound_manifest_dir_is_no_problem(cfg, store, roomy, tmp_path):
    cfg = digest_cfg(cfg, tmp_path)
    os.mkdir(cfg.manifest_dir, 0o700)
    assert json_report(cfg)["problems"] == []


def test_symlinked_state_folder_is_a_problem(cfg, roomy, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o711)
    os.symlink(elsewhere, cfg.state_dir)
    assert "PROBLEM  %s is not a directory" % cfg.state_dir in report(cfg)


def test_missing_folders_are_no_problem(cfg, roomy):
    assert json_report(cfg)["problems"] == []


# -- snapshot_dir's free space -------------------------------------------------

@pytest.mark.parametrize("free, size, low", [
    (GiB - 1, 10 * GiB, True),          # under 1 GiB
    (GiB, 10 * GiB, False),
    (40 * GiB, 1000 * GiB, True),       # under 5 %
    (50 * GiB, 1000 * GiB, False),
])
def test_low_space_threshold(free, size, low):
    assert health.low_space(free, size) is low


class FakeStatvfs:
    def __init__(self, free, size):
        self.f_frsize = 4096
        self.f_bavail = free // 4096
        self.f_blocks = size // 4096


def test_low_space_in_snapshot_dir_is_a_problem(cfg, store, monkeypatch):
    monkeypatch.setattr(health.os, "statvfs",
                        lambda path: FakeStatvfs(3 << 20, 64 << 20))
    (problem,) = json_report(cfg)["problems"]
    assert problem["kind"] == "space"
    assert problem["message"].startswith(
        "snapshot_dir %s: 3.0 MiB free of 64.0 MiB (less than 1.0 GiB or "
        "5 %%)" % cfg.snapshot_dir)


def test_space_of_a_snapshot_dir_not_made_yet_is_its_parents(cfg,
                                                             monkeypatch):
    asked = []
    monkeypatch.setattr(health.os, "statvfs", lambda path: asked.append(path)
                        or FakeStatvfs(100 * GiB, 200 * GiB))
    assert json_report(cfg)["problems"] == []
    assert asked == [os.path.dirname(os.path.dirname(cfg.snapshot_dir))]


# -- a frozen domain paused on an I/O error -----------------------------------

def test_domain_paused_on_enospc_says_where_to_free_space(cfg, store, roomy):
    state = frozen(cfg)
    store.save(state)
    plant_overlay(state)
    asked = []

    def domain_states():
        return lambda uuid: asked.append(uuid) or ("paused",
                                                   "vda: no space left")
    (entry,) = json_report(cfg, domain_states)["sessions"]
    assert entry["domain_state"] == "paused"
    assert entry["io_error"] == "vda: no space left"
    assert asked == [state["uuid"]]
    assert ("    PAUSED       on an I/O error (vda: no space left): free "
            "space in %s, where its overlay grows, then 'virsh resume dom1'"
            % cfg.snapshot_dir) in report(cfg, domain_states)


def test_domain_paused_on_another_io_error_points_at_the_log(cfg, store,
                                                             roomy):
    store.save(frozen(cfg))
    text = report(cfg, lambda: lambda uuid: ("paused", "vda: I/O error"))
    assert ("PAUSED       on an I/O error (vda: I/O error): see the host's "
            "log") in text


def test_running_domain_has_no_paused_line(cfg, store, roomy):
    store.save(frozen(cfg))
    text = report(cfg, lambda: lambda uuid: ("running", None))
    assert "domain now   running" in text and "PAUSED" not in text


# -- nbdsnap status | head -1 --------------------------------------------------

@pytest.mark.parametrize("command", [["status"], ["status", "--json"],
                                     ["history"], ["history", "--json"]])
def test_report_into_a_closed_pipe_ends_quietly(cfg, store, command):
    with open(cfg.path, "w") as f:
        f.write("[nbdsnap]\nstate_dir = %s\nsnapshot_dir = %s\n"
                % (cfg.state_dir, cfg.snapshot_dir))
    read_end, write_end = os.pipe()
    os.close(read_end)               # the reader has gone, as head -1 does
    try:
        proc = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "nbdsnap")]
            + command, stdout=write_end, stderr=subprocess.PIPE,
            env=dict(os.environ, NBDSNAP_CONFIG=cfg.path), timeout=60)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (0, b"")


def test_manifests_show_their_chain_and_the_last_full_digests_age(cfg,
                                                                  store,
                                                                  roomy):
    from nbdsnap.hooks import chain
    from nbdsnap.verify import blkhash, manifest2_pack
    os.makedirs(cfg.manifest_dir, mode=0o700)
    started = chain.format_time(1_000_000_000 - 3 * 86400)
    data = manifest2_pack.build(
        blkhash.block_digests(bytes(65536)), 65536, generation=5,
        chain_id="c0ffee", kind="incremental", domain_xml="",
        chain_started=started, created=started)
    with open(os.path.join(cfg.manifest_dir, "dom1-vda.manifest"), "wb") as f:
        f.write(data)
    with open(os.path.join(cfg.manifest_dir, "dom1-vdb.manifest"), "wb") as f:
        f.write(b"garbage")
    # The digest's own hidden files are not manifests.
    open(os.path.join(cfg.manifest_dir, ".dom1-vda.manifest.job"), "w").close()
    (good, bad) = status.manifests(cfg, now=1_000_000_000)
    assert (good["generation"], good["kind"], good["chain_id"],
            good["complete"], good["full_age"]) == (
        5, "incremental", "c0ffee", True, 3 * 86400)
    assert "dom1-vdb.manifest" in bad["manifest"] and bad["error"]
    text = report(cfg)
    assert "dom1-vda.manifest  generation 5, incremental, chain c0ffee, " \
        "last full digest" in text
    assert "dom1-vdb.manifest  UNREADABLE" in text
    assert len(json_report(cfg)["manifests"]) == 2
