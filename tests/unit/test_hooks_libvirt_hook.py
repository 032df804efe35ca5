"""libvirt_hook.blocking_sessions on session files and locks, no libvirt."""

import os
import time

import pytest

from nbdsnap.hooks import config, libvirt_hook, procs, sessions


@pytest.fixture
def conf(tmp_path):
    c = config.Config(state_dir=str(tmp_path / "state"),
                      snapshot_dir=str(tmp_path / "overlays"),
                      manifest_dir=str(tmp_path / "manifests"),
                      lock_timeout=0.5)
    sessions.SessionStore(c).prepare()
    return c


def offline_group(store, holder):
    members = [("k-1", "vda", "/srv/vda.raw"), ("k-2", "vdb", "/srv/vdb.raw")]
    group = sessions.new_group(members)
    for i, (key, disk, export) in enumerate(members):
        store.save(sessions.new_session(
            key, export, "dom1", "U", disk, export, sessions.OFFLINE,
            holder if i == 0 else None, group=group))


def test_a_group_held_by_one_connection_blocks_the_start(conf):
    store = sessions.SessionStore(conf)
    offline_group(store, procs.holder_of(os.getpid()))
    (state,) = libvirt_hook.blocking_sessions("U", conf)
    assert state["disk"] == "vda"
    assert libvirt_hook.blocking_sessions("other-uuid", conf) == []


def test_the_locks_of_a_group_cost_the_start_one_wait_not_one_each(conf):
    """A hook holding the group's locks (a prerun checking the domain, which
    waits for this very hook): the start is refused after one lock_timeout,
    not after one per disk."""
    store = sessions.SessionStore(conf)
    offline_group(store, procs.holder_of(os.getpid()))
    with store.locks(["k-1", "k-2"]):
        began = time.monotonic()
        found = libvirt_hook.blocking_sessions("U", conf)
        took = time.monotonic() - began
    assert len(found) == 1
    assert 0.5 <= took < 0.9, took
