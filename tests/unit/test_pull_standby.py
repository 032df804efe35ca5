"""standby.define against a stand-in for libvirt's binding: whatever libvirt
says becomes one line (StandbyError), never a libvirtError."""

import sys
import types

import pytest

from nbdsnap.pull import standby, standby_xml
from test_pull_standby_xml import COPIES, FROZEN


class LibvirtError(Exception):
    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code

    def get_error_message(self):
        return str(self)

    def get_error_code(self):
        return self.code


NO_DOMAIN = 42


class Conn:
    def __init__(self, lookup=None, networks=None):
        self.lookup, self.networks = lookup, networks
        self.defined = []

    def lookupByName(self, name):
        raise self.lookup or LibvirtError("no domain", NO_DOMAIN)

    def listNetworks(self):
        if self.networks:
            raise self.networks
        return ["default"]

    def listDefinedNetworks(self):
        return []

    def defineXML(self, xml):
        self.defined.append(xml)
        return types.SimpleNamespace(setAutostart=lambda flag: 0)

    def close(self):
        pass


@pytest.fixture
def libvirt(monkeypatch):
    fake = types.SimpleNamespace(
        libvirtError=LibvirtError, VIR_ERR_NO_DOMAIN=NO_DOMAIN,
        VIR_DOMAIN_XML_INACTIVE=2, registerErrorHandler=lambda f, c: 0,
        conn=Conn(), open=lambda uri: fake.conn)
    monkeypatch.setitem(sys.modules, "libvirt", fake)
    return fake


def test_a_new_standby_is_defined(libvirt):
    standby.define("test:///", "s", FROZEN, COPIES)
    assert standby_xml.mark_of(libvirt.conn.defined[0])


def test_a_lookup_that_fails_is_not_taken_for_no_domain(libvirt):
    # libvirtd gone, or no right to read it: defining over a domain not
    # looked at could replace one nbd-pull did not make.
    libvirt.conn = Conn(lookup=LibvirtError("End of file while reading "
                                            "data: Input/output error"))
    with pytest.raises(standby_xml.StandbyError, match="End of file"):
        standby.define("test:///", "s", FROZEN, COPIES)
    assert libvirt.conn.defined == []


def test_libvirt_failing_later_is_one_line(libvirt):
    libvirt.conn = Conn(networks=LibvirtError("connection closed"))
    with pytest.raises(standby_xml.StandbyError, match="connection closed"):
        standby.define("test:///", "s", FROZEN, COPIES)


class Dom:
    def __init__(self, xml, saved=False):
        self.xml, self.saved = xml, saved

    def XMLDesc(self, flags):
        return self.xml

    def isActive(self):
        return False

    def hasManagedSaveImage(self, flags):
        return self.saved

    def UUIDString(self):
        return "abc"


def test_a_standby_with_a_saved_state_is_not_updated(libvirt):
    # virsh start would restore its memory over the rewritten disks.
    made, _ = standby_xml.standby(FROZEN, "s", COPIES, standby_xml.Host(
        frozenset(), frozenset()))

    class Found(Conn):
        def lookupByName(self, name):
            return Dom(made, saved=True)
    libvirt.conn = Found()
    with pytest.raises(standby.Running, match="managedsave-remove"):
        standby.define("test:///", "s", FROZEN, COPIES)
    assert libvirt.conn.defined == []
    libvirt.conn = type("Unsaved", (Conn,), {
        "lookupByName": lambda self, name: Dom(made)})()
    standby.define("test:///", "s", FROZEN, COPIES)
    assert libvirt.conn.defined
