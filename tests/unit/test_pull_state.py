"""COPY's state folder: where it is, its lock, when its record is trusted."""

import os

import pytest

from nbdsnap.pull import state

FP = {"dev": 1, "ino": 2, "rdev": 0, "size": 10, "mtime_ns": 3,
      "ctime_ns": 4}


def test_folders_beside_files_and_escaped_for_devices():
    assert state.folder_for("/srv/c/vm-1.raw", "file", None) == \
        "/srv/c/.vm-1.raw.nbd-pull"
    assert state.folder_for("/srv/c/vm-1.raw", "missing", None) == \
        "/srv/c/.vm-1.raw.nbd-pull"
    assert state.folder_for("/dev/vg/vm1-vda", "block", None) == \
        "/var/lib/nbd-pull/dev-vg-vm1\\x2dvda"
    assert state.folder_for("/dev/vg/vm1-vda", "block", "/s") == \
        "/s/dev-vg-vm1\\x2dvda"
    # Different paths never share a folder.
    assert state.folder_for("/a-b/c", "block", "/s") != \
        state.folder_for("/a/b-c", "block", "/s")
    assert state.folder_for("/a-/b", "block", "/s") != \
        state.folder_for("/a/-b", "block", "/s")


def test_a_mistyped_copys_folder_is_not_created(tmp_path):
    with pytest.raises(state.StateError, match="cannot create"):
        state.Folder(str(tmp_path / "no-such" / ".c.nbd-pull"))
    assert not (tmp_path / "no-such").exists()
    state.Folder(str(tmp_path / "sd" / "x"), make_parent=True).close()


def meta(**more):
    m = {"source": "nbd://h/e", "digest": "aa", "fingerprint": FP,
         "trusted": True}
    m.update(more)
    return m


@pytest.mark.parametrize("m, digest, source, fp, why", [
    (meta(), bytes.fromhex("aa"), "nbd://h/e", FP, None),
    (meta(), None, "nbd://h/e", FP, "no record"),
    (None, bytes.fromhex("aa"), "nbd://h/e", FP, "no record.json"),
    (meta(digest="bb"), bytes.fromhex("aa"), "nbd://h/e", FP, "not its"),
    (meta(trusted=False), bytes.fromhex("aa"), "nbd://h/e", FP,
     "interrupted"),
    (meta(), bytes.fromhex("aa"), "nbd://h/other", FP, "another source"),
    (meta(), bytes.fromhex("aa"), "nbd://h/e", dict(FP, mtime_ns=9),
     "changed"),
])
def test_trust(m, digest, source, fp, why):
    got = state.trust(m, digest, source, fp)
    if why is None:
        assert got is None
    else:
        assert why in got


def test_one_pull_per_copy(tmp_path):
    path = str(tmp_path / ".c.nbd-pull")
    first = state.Folder(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o700"
    with pytest.raises(state.Busy, match="pid %d" % os.getpid()):
        state.Folder(path)
    first.close()
    state.Folder(path).close()


def test_a_planted_symlink_or_open_folder_is_refused(tmp_path):
    os.symlink(tmp_path, tmp_path / "link")
    with pytest.raises(state.StateError, match="symlink"):
        state.Folder(str(tmp_path / "link"))
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o777)
    os.chmod(open_folder, 0o777)
    with pytest.raises(state.StateError, match="writable by others"):
        state.Folder(str(open_folder))


def test_meta_round_trip_and_unreadable_meta(tmp_path):
    f = state.Folder(str(tmp_path / "s"))
    assert f.read_meta() is None
    f.write_meta(meta())
    assert f.read_meta() == meta()
    with open(f.meta, "w") as out:
        out.write("{broken")
    assert f.read_meta() is None
    f.close()
