"""Shared by the unit and the real tests: tests/ on sys.path, for verifykit."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def copy(tmp_path, data):
    """The test module's data fixture, written to a file of its own."""
    path = tmp_path / "copy.raw"
    path.write_bytes(data)
    return path
