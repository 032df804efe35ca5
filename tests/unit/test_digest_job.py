"""The digest child's job (hooks/digest.py _run): it builds only on the
previous manifest prerun decided on, and says why a manifest was full."""

import json

from nbdsnap.hooks import digest
from nbdsnap.verify import manifest2, manifest2_write, sources


def make(tmp_path, generation, chain_id):
    image = tmp_path / "base.raw"
    image.write_bytes(b"\x11" * (1 << 20))
    previous = tmp_path / ".m.manifest.previous"
    with sources.open_source(str(image)) as source:
        manifest2_write.write_full(
            str(previous), source, generation=generation, chain_id=chain_id,
            chain_started="2026-12-01T00:00:00Z", domain_xml="",
            source_name="t", created="2026-12-01T00:00:00Z")
    return image, previous


def job(tmp_path, image, previous, generation, chain_id):
    return {"manifest": str(tmp_path / "m.manifest"), "base": str(image),
            "session": "s1", "algorithm": "sha256", "kind": "incremental",
            "why": "incremental from generation %d" % (generation - 1),
            "generation": generation, "chain_id": chain_id,
            "chain_started": "2026-12-01T00:00:00Z", "domain_xml": "",
            "frozen": 0, "previous": str(previous), "dirty": [[0, 4096]]}


def result(tmp_path):
    with open(tmp_path / ".m.manifest.result") as f:
        return json.load(f)


def header(tmp_path):
    with manifest2.FileReader(str(tmp_path / "m.manifest")) as reader:
        return manifest2.read_header(reader)


def test_builds_on_the_previous_generation_of_its_chain(tmp_path):
    image, previous = make(tmp_path, 3, "abc")
    digest._run(job(tmp_path, image, previous, 4, "abc"))
    assert header(tmp_path).kind == "incremental"
    assert result(tmp_path) == {"kind": "incremental", "seconds":
                                result(tmp_path)["seconds"],
                                "bytes_read": 65536, "why": None}


def test_another_chains_manifest_is_never_built_on(tmp_path):
    image, previous = make(tmp_path, 3, "other")
    digest._run(job(tmp_path, image, previous, 4, "abc"))
    got = header(tmp_path)
    assert (got.kind, got.chain_id, got.generation) == ("full", "abc", 4)
    assert "not generation 3 of chain abc" in result(tmp_path)["why"]
    assert result(tmp_path)["bytes_read"] == 1 << 20


def test_a_skipped_generation_is_never_built_on(tmp_path):
    image, previous = make(tmp_path, 2, "abc")
    digest._run(job(tmp_path, image, previous, 4, "abc"))
    assert header(tmp_path).kind == "full"


class Pipe:
    """The digest's stdin, as a real pipe file behaves: what was written,
    whether closed, and ValueError on a write after close."""

    def __init__(self):
        self.written = []
        self.closed = False

    def write(self, data):
        if self.closed:
            raise ValueError("write to closed file")
        self.written.append(data)

    def close(self):
        self.closed = True


def start_held(tmp_path, monkeypatch, holder):
    """digest.start(hold=True) with a fake child; (info, release, pipe)."""
    from nbdsnap.hooks import config, procs
    pipe = Pipe()

    class Popen:
        pid = 4242

        def __init__(self, *args, **kwargs):
            self.stdin = pipe

    image = tmp_path / "base.raw"
    image.write_bytes(b"\x11" * (1 << 20))
    monkeypatch.setattr(digest.subprocess, "Popen", Popen)
    monkeypatch.setattr(procs, "holder_of", lambda pid: holder)
    conf = config.Config(manifest_dir=str(tmp_path / "manifests"))
    state = {"id": "s1", "domain": "d", "disk": "vda", "updated": 5.0}
    info, release = digest.start(conf, state, str(image), hold=True)
    return info, release, pipe


def test_a_digest_the_session_cannot_name_is_never_released(tmp_path,
                                                             monkeypatch):
    """If its pid cannot be recorded (procs.holder_of finds nothing), the
    session cannot wait for it: release() must not let it read."""
    info, release, pipe = start_held(tmp_path, monkeypatch, None)
    assert "pid" not in info
    release()
    assert digest.GO not in pipe.written and pipe.written == []
    assert pipe.closed


def test_release_twice_is_harmless(tmp_path, monkeypatch):
    """A second release() (a retry path, a finally) must not raise
    ValueError (write to a closed file) as a traceback out of the hook."""
    from nbdsnap.hooks import procs
    _, release, _ = start_held(tmp_path, monkeypatch,
                               procs.Holder(4242, 1, "b"))
    release()
    release()
