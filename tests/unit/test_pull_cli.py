"""nbd-pull's command line: rates, statuses, progress, usage errors."""

import pytest

from nbdsnap.pull import cli, disk, fetch, source, state
from nbdsnap.verify.errors import NbdError, UnknownExport


@pytest.mark.parametrize("text, rate", [
    ("100M", 100 << 20), ("1.5g", 1.5 * (1 << 30)), ("800K", 800 << 10),
    ("5000000", 5000000)])
def test_rates(text, rate):
    assert cli._rate(text) == rate


@pytest.mark.parametrize("text", ["0", "-1M", "fast", "1T", ""])
def test_bad_rates(text):
    with pytest.raises(ValueError):
        cli._rate(text)


@pytest.mark.parametrize("error, status", [
    (NbdError("gone"), 1), (source.Incomplete("x"), 1),
    (fetch.Corrupt("x"), 1), (state.Busy("x"), 1),
    (cli.Interrupted(15), 1), (disk.InUse("x"), 1),
    (UnknownExport("x"), 2), (source.NoManifest("x"), 2),
    (state.StateError("x"), 2), (OSError(28, "No space left"), 2)])
def test_statuses(error, status):
    assert cli._status(error) == status


def test_progress_is_a_true_percentage_with_the_time_left(capsys):
    now = [0.0]
    bar = cli._Progress("copy.img", clock=lambda: now[0])
    now[0] = 2.0
    bar(50 << 20, 200 << 20)
    err = capsys.readouterr().err
    assert "50.0 MiB of 200.0 MiB (25%), ETA 6 s, 25.0 MiB/s" in err
    assert err.startswith("\r")


def test_source_and_copy_come_in_pairs(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["nbd://h/e"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pairs" in err[0]


def test_the_manifest_is_the_export_beside():
    assert source.manifest_uri("nbd://h:10809/vm-vda") == \
        "nbd://h:10809/vm-vda.manifest"
    assert source.manifest_uri("nbd+unix:///e?socket=/run/s") == \
        "nbd+unix:///e.manifest?socket=/run/s"
