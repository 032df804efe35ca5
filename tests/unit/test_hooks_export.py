"""nbdsnap export -o FILE rerun: an identical FILE is left untouched and
the command says so, as a configuration tool needs to tell "changed"."""

import os

import pytest

from nbdsnap.hooks import export


def test_an_identical_file_is_left_untouched(tmp_path):
    path = str(tmp_path / "x.conf")
    text = export.MARK + "\n[a]\n"
    assert export.write_file(path, text) is True
    before = os.stat(path)
    assert export.write_file(path, text) is False
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino,
                                                 before.st_mtime_ns)
    assert os.listdir(str(tmp_path)) == ["x.conf"]


@pytest.mark.parametrize("change", ["text", "mode", "longer"])
def test_a_file_that_differs_in_text_or_mode_is_rewritten(tmp_path, change):
    path = str(tmp_path / "x.conf")
    text = export.MARK + "\n[a]\n"
    export.write_file(path, text)
    if change == "mode":
        os.chmod(path, 0o600)
    elif change == "longer":
        with open(path, "a") as f:
            f.write("[b]\n")
    else:
        text += "[b]\n"
    assert export.write_file(path, text) is True
    assert open(path).read() == text
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"


def test_a_missing_file_is_not_the_same():
    assert export.same("/nonexistent/x.conf", "") is False


def test_run_says_wrote_then_unchanged_for_each_file(tmp_path, monkeypatch,
                                                     golden):
    domain = golden("file_raw")

    class Conn:
        def close(self):
            pass
    monkeypatch.setattr(export.virt, "connect", Conn)
    monkeypatch.setattr(export.virt, "lookup",
                        lambda conn, name: (None, domain))
    conf = str(tmp_path / "dom1.conf")
    allow = str(tmp_path / "dom1-vda.allow")

    def run(*addresses):
        said = []
        export.run("dom1", allow=list(addresses), output=conf,
                   folder="/usr/bin", out=said.append, tls=True)
        return said

    assert run("192.0.2.1") == ["wrote " + allow, "wrote " + conf]
    assert run("192.0.2.1") == ["unchanged " + allow, "unchanged " + conf]
    # Another address: the authfile changes, and the comment of FILE
    # that lists the clients.
    assert run("192.0.2.2") == ["wrote " + allow, "wrote " + conf]
