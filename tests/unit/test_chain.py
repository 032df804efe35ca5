"""Which manifest a freeze makes (hooks/chain.py): every way a chain breaks."""

from typing import NamedTuple

import pytest

from nbdsnap.hooks import chain

NOW = chain.parse_time("2026-12-01T12:00:00Z")


class Header(NamedTuple):
    complete: bool = True
    algorithm: str = "sha256"
    kind: str = "incremental"
    generation: int = 7
    chain_id: str = "c0ffee"
    chain_started: str = "2026-11-30T12:00:00Z"


def decide(previous=Header(), bitmaps=("nbdsnap-c0ffee-7",), online=True,
           now=NOW, full_days=7):
    return chain.decide(previous, bitmaps, online, now, full_days, "new1",
                        algorithm="sha256")


def test_the_chain_continues_from_the_previous_generation():
    plan = decide()
    assert plan.kind == chain.INCREMENTAL
    assert plan.generation == 8
    assert plan.chain_id == "c0ffee"
    assert plan.chain_started == "2026-11-30T12:00:00Z"
    assert plan.bitmap == "nbdsnap-c0ffee-8"
    assert plan.previous_bitmap == "nbdsnap-c0ffee-7"


@pytest.mark.parametrize("case, kwargs, why", [
    ("first freeze", dict(previous=None), "no previous manifest"),
    ("damaged", dict(previous="bad checksum"), "cannot be used: bad checksum"),
    ("incomplete", dict(previous=Header(complete=False)), "incomplete"),
    ("algorithm", dict(previous=Header(algorithm="blake2b")), "blake2b"),
    ("QEMU restarted", dict(bitmaps=()), "nbdsnap-c0ffee-7 is gone"),
    ("other chain's bitmap", dict(bitmaps=("nbdsnap-other-7",)), "is gone"),
    ("shut off", dict(online=False, bitmaps=()), "shut off"),
    ("old chain", dict(now=NOW + 6 * 86400), "7.0 days old"),
    ("every time", dict(full_days=0), "every digest is full"),
    ("clock went back", dict(now=NOW - 2 * 86400), "future"),
    ("no start time", dict(previous=Header(chain_started="")), "start time"),
])
def test_the_chain_breaks(case, kwargs, why):
    plan = decide(**kwargs)
    assert plan.kind == chain.FULL, case
    assert why in plan.why
    assert plan.chain_id == "new1"
    assert plan.chain_started == "2026-12-01T12:00:00Z" or "now" in kwargs
    assert plan.previous_bitmap is None


def test_a_full_digest_keeps_counting_generations():
    assert decide(bitmaps=()).generation == 8
    assert decide(previous=None).generation == 1
    assert decide(previous="damaged").generation == 1


def test_a_shut_off_domain_starts_no_bitmap():
    assert decide(online=False).bitmap is None
    assert decide(previous=None).bitmap == "nbdsnap-new1-1"


def test_a_chain_just_under_the_limit_continues():
    assert decide(now=NOW + 6 * 86400 - 1).kind == chain.INCREMENTAL


def test_as_full_replaces_the_bitmap_in_a_new_chain():
    plan = decide().as_full("cannot read the map", "new2", NOW)
    assert plan.kind == chain.FULL
    assert plan.generation == 8
    assert plan.bitmap == "nbdsnap-new2-8"
    assert plan.previous_bitmap is None
    assert plan.why == "cannot read the map"


def test_times_round_trip():
    assert chain.parse_time(chain.format_time(NOW)) == NOW
    assert chain.parse_time("yesterday") is None
    assert chain.parse_time(None) is None
