"""The test tree itself: what would stop a whole run before any test."""

import collections
import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_test_module_has_a_name_of_its_own():
    # pytest imports test modules by basename (no __init__.py here): a
    # tests/unit/test_x.py beside a tests/real/test_x.py stops the whole
    # run at collection, unit tests and real ones alike.
    seen = collections.defaultdict(list)
    for folder, _, files in os.walk(TESTS):
        for name in files:
            if name.startswith("test_") and name.endswith(".py"):
                seen[name].append(os.path.relpath(folder, TESTS))
    assert {n: f for n, f in seen.items() if len(f) > 1} == {}
