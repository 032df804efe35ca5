"""nbdsnap.hooks.certs: what to make, and openssl's arguments (pure)."""

import os

import pytest

from nbdsnap.hooks import certs
from nbdsnap.hooks.errors import ConfigError, Unsupported


def having(*files):
    return lambda rel: rel in files


def test_a_first_run_makes_the_ca_the_server_and_each_client():
    steps = certs.plan(having(), ["vmhost", "192.0.2.7"], ["c1", "c2"])
    assert [(s.what, s.name) for s in steps] == [
        ("ca", "nbdsnap CA"), ("server", "vmhost"), ("client", "c1"),
        ("client", "c2")]
    server = steps[1].argv
    assert "subjectAltName=DNS:vmhost,IP:192.0.2.7" in server
    assert "extendedKeyUsage=serverAuth" in server
    assert "extendedKeyUsage=clientAuth" in steps[2].argv
    assert steps[2].files == (os.path.join("clients", "c1",
                                           "client-cert.pem"),
                              os.path.join("clients", "c1", "client-key.pem"),
                              os.path.join("clients", "c1", "ca-cert.pem"))
    for step in steps:
        assert step.argv[:2] == ("openssl", "req") and "-nodes" in step.argv
        assert "ec_paramgen_curve:P-256" in step.argv
        # Never the system's openssl.cnf: its v3_ca would make leaves CAs.
        assert ("-config", "openssl.cnf") in zip(step.argv, step.argv[1:])
    assert "basicConstraints=critical,CA:TRUE,pathlen:0" in steps[0].argv
    for leaf in steps[1:]:
        assert "basicConstraints=critical,CA:FALSE" in leaf.argv


def test_a_rerun_makes_only_the_new_client():
    have = having("ca-cert.pem", "ca-key.pem", "server-cert.pem",
                  os.path.join("clients", "c1", "client-cert.pem"))
    assert [(s.what, s.name) for s in certs.plan(have, [], ["c1", "c2"])] \
        == [("client", "c2")]


def test_the_first_run_needs_a_server_name():
    with pytest.raises(ConfigError, match="--server-name"):
        certs.plan(having(), [], ["c1"])


@pytest.mark.parametrize("files, words", [
    (("ca-key.pem",), "ca-key.pem exists without ca-cert.pem"),
    (("ca-cert.pem",), "ca-cert.pem exists without ca-key.pem"),
])
def test_half_a_ca_is_never_replaced(files, words):
    with pytest.raises(Unsupported, match=words):
        certs.plan(having(*files), ["vmhost"], [])


@pytest.mark.parametrize("name", [
    "../etc", "a/b", "-rf", "", "a b", "x\ny", "/CN=evil", "a..b", "é"])
def test_a_name_that_is_no_host_name_is_refused(name):
    with pytest.raises(ConfigError):
        certs.plan(having(), ["vmhost"], [name])
    with pytest.raises(ConfigError):
        certs.plan(having(), [name], [])


def test_addresses_go_into_the_certificate_as_addresses():
    assert certs.san(["::1", "127.0.0.1", "vm.example.org"]) == \
        "IP:::1,IP:127.0.0.1,DNS:vm.example.org"


def test_generic_lines_name_the_three_files():
    assert certs.generic_lines("/etc/nbdsnap/tls") == [
        "certfile = /etc/nbdsnap/tls/server-cert.pem",
        "keyfile = /etc/nbdsnap/tls/server-key.pem",
        "cacertfile = /etc/nbdsnap/tls/ca-cert.pem"]
