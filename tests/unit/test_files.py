"""verify/files.py: the one atomic file write."""

import os
import stat

import pytest

from nbdsnap.verify import files


def fsynced(monkeypatch):
    """Record what each os.fsync call was given: 'dir' or 'file'."""
    seen, real = [], os.fsync

    def spy(fd):
        seen.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)
    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_writes_the_data_with_the_mode_and_fsyncs_file_then_folder(
        tmp_path, monkeypatch):
    seen = fsynced(monkeypatch)
    path = tmp_path / "a.conf"
    files.write_atomic(str(path), "é\n")
    assert path.read_bytes() == "é\n".encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert seen == ["file", "dir"]
    files.write_atomic(str(path), b"new", mode=0o644)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["a.conf"]


def test_the_temporary_file_is_exclusive_and_private(tmp_path, monkeypatch):
    made = []
    real_open = os.open

    def spy(path, flags, mode=0o777, **kw):
        made.append((path, flags, mode))
        return real_open(path, flags, mode, **kw)
    monkeypatch.setattr(os, "open", spy)
    files.write_atomic(str(tmp_path / "x"), "x", mode=0o644)
    tmp, flags, mode = made[0]
    assert os.path.dirname(tmp) == str(tmp_path)
    assert os.path.basename(tmp).startswith(".x.") and tmp.endswith(".tmp")
    assert flags & os.O_EXCL and flags & os.O_NOFOLLOW and mode == 0o600


@pytest.mark.parametrize("fail", ["write", "fsync", "replace"])
def test_a_failure_keeps_the_old_file_and_leaves_no_temporary(
        tmp_path, monkeypatch, fail):
    path = tmp_path / "state.json"
    path.write_text("old")

    def boom(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, fail, boom)
    with pytest.raises(OSError, match="No space"):
        files.write_atomic(str(path), "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_the_folder_fsync_failing_is_reported_after_the_rename(
        tmp_path, monkeypatch):
    real = os.fsync

    def no_dir_sync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, "Input/output error")
        real(fd)
    monkeypatch.setattr(os, "fsync", no_dir_sync)
    with pytest.raises(OSError, match="Input/output"):
        files.write_atomic(str(tmp_path / "m"), "new")
    assert os.listdir(tmp_path) == ["m"]


def test_a_missing_folder_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        files.write_atomic(str(tmp_path / "no" / "f"), "x")


def _session(tmp_path):
    from nbdsnap.hooks import config, sessions
    cfg = config.Config(state_dir=str(tmp_path))
    os.makedirs(cfg.sessions_dir)
    sessions.SessionStore(cfg).save({"key": "f-1-2", "phase": "frozen"})
    return cfg.sessions_dir


def _history(tmp_path):
    from nbdsnap.hooks import history
    path = tmp_path / "history.jsonl"
    path.write_text("{}\n" * 4)
    history._trim(str(path))
    return str(tmp_path)


def _manifest(tmp_path):
    from nbdsnap.verify import manifest
    m = manifest.Manifest(size=0, algorithm="sha256", block_size=65536,
                          chunk_size=manifest.DEFAULT_CHUNK_SIZE,
                          digest="0" * 64, chunks=[], complete=False,
                          source="x", created=manifest.now())
    manifest.write(str(tmp_path / "d.manifest"), m)
    assert stat.S_IMODE((tmp_path / "d.manifest").stat().st_mode) == 0o644
    return str(tmp_path)


def _export(tmp_path):
    from nbdsnap.hooks import export
    export.write_file(str(tmp_path / "d.conf"), export.MARK + "\n")
    return str(tmp_path)


@pytest.mark.parametrize("write", [_session, _history, _manifest, _export])
def test_every_atomic_write_fsyncs_its_folder(tmp_path, monkeypatch, write):
    seen = fsynced(monkeypatch)
    folder = write(tmp_path)
    assert seen[-2:] == ["file", "dir"]
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")
                or n.startswith((".tmp-", ".history-", ".manifest-"))]
