"""The freeze-time digest's folder: manifest_dir gets the state folders'
checks (hooks run as root; a planted symlink or a folder others can write
would let them redirect a manifest)."""

import os
import stat

import pytest

from nbdsnap.hooks import config, digest
from nbdsnap.hooks.errors import ConfigError

STATE = {"id": "s1", "domain": "dom1", "disk": "vda"}


def settings(folder):
    return config.Config(manifest_dir=str(folder), digest=True)


def test_created_root_only(tmp_path):
    folder = tmp_path / "state" / "manifests"
    digest.prepare_dir(settings(folder))
    st = os.lstat(folder)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    digest.prepare_dir(settings(folder))            # and found again


@pytest.mark.parametrize("plant, words", [
    ("symlink", "not a directory"),
    ("group-writable", "writable by group or others"),
    ("file", "not a directory"),
])
def test_start_refuses_an_unsafe_folder_and_writes_nothing(tmp_path, plant,
                                                           words):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = tmp_path / "manifests"
    if plant == "symlink":
        folder.symlink_to(elsewhere)
    elif plant == "file":
        folder.write_text("")
    else:
        folder.mkdir()
        folder.chmod(0o775)
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 65536)
    with pytest.raises(ConfigError, match=words):
        digest.start(settings(folder), STATE, str(base))
    assert os.listdir(elsewhere) == []
    if plant == "group-writable":
        assert os.listdir(folder) == []


def test_upgraded_folder_others_can_read_is_tightened_once(tmp_path,
                                                           caplog):
    # What versions before 0700 made, with a manifest they left in it.
    folder = tmp_path / "manifests"
    folder.mkdir()
    folder.chmod(0o755)
    old = folder / "dom1-vda.manifest"
    old.write_text("{}")
    old.chmod(0o644)
    with caplog.at_level("WARNING", logger="nbdsnap.hooks.digest"):
        digest.prepare_dir(settings(folder))
        digest.prepare_dir(settings(folder))
    assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700
    (record,) = caplog.records
    assert "%s was mode 755" % folder in record.getMessage()
    assert "now 0700" in record.getMessage()


def test_start_writes_into_a_tightened_folder(tmp_path):
    folder = tmp_path / "manifests"
    folder.mkdir()
    folder.chmod(0o711)
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 65536)
    info = digest.start(settings(folder), STATE, str(base))
    assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700
    assert os.path.dirname(info["manifest"]) == str(folder)


def test_folder_of_another_user_is_refused_not_tightened(tmp_path,
                                                        monkeypatch):
    folder = tmp_path / "manifests"
    folder.mkdir()
    folder.chmod(0o755)
    # As if another user owned it (no chown: the test need not be root).
    owner = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    with pytest.raises(ConfigError, match="belongs to uid %d" % owner):
        digest.prepare_dir(settings(folder))
    assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o755
