"""Small fixtures shared by the unit tests of the server side."""

import os

import pytest

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "data")
DOMXML = os.path.join(DATA, "domxml")


def golden_xml(name):
    """The text of tests/data/domxml/NAME.xml (libvirt 9 domain XML)."""
    with open(os.path.join(DOMXML, name + ".xml"), encoding="utf-8") as f:
        return f.read()


@pytest.fixture
def golden():
    """golden("file_raw") -> the parsed Domain of tests/data/domxml/file_raw.xml."""
    from nbdsnap.hooks import domxml
    return lambda name: domxml.parse(golden_xml(name))


@pytest.fixture
def golden_text():
    """golden_text("file_raw") -> the XML text of that golden file."""
    return golden_xml
