"""nbdsnap.verify.nbdproto: URIs and the bytes on the wire, fixed answers.

The client as a whole, against real servers and a fake one, is tested in
tests/real/test_verify_nbd.py.
"""

import struct

import pytest

from nbdsnap.verify import nbdproto
from nbdsnap.verify.errors import SourceError, UnsupportedSource
from nbdsnap.verify.nbdproto import Address


def test_parse_uri():
    assert nbdproto.parse_uri("nbd://host/exp%20ort") == Address(
        "exp ort", "host", 10809)
    assert nbdproto.parse_uri("nbd://[::1]:1234/a/b") == Address(
        "a/b", "::1", 1234)
    assert nbdproto.parse_uri("nbd://h") == Address("", "h", 10809)
    assert nbdproto.parse_uri("nbd+unix:///e?socket=/run/s.sock") == Address(
        "e", socket_path="/run/s.sock")


@pytest.mark.parametrize("uri,error,words", [
    ("nbd+vsock:///x", UnsupportedSource, "not supported"),
    ("http://h/x", SourceError, "not an NBD URI"),
    ("nbd:///x", SourceError, "no host"),
    ("nbd+unix:///x", SourceError, "socket"),
    ("nbd://127.0.0.1:99999/x", SourceError, "invalid NBD URI"),
])
def test_parse_uri_refuses(uri, error, words):
    with pytest.raises(error, match=words):
        nbdproto.parse_uri(uri)


def test_address_names_where_it_connects():
    assert str(Address("e", "host", 10809)) == "host:10809"
    assert str(Address("e", "::1", 1234)) == "[::1]:1234"
    assert str(Address("e", socket_path="/run/s.sock")) == "/run/s.sock"


def test_request():
    assert nbdproto.request(nbdproto.CMD_READ, 7, 4096, 512).hex() == (
        "25609513" "0000" "0000" "0000000000000007" "0000000000001000"
        "00000200")
    assert nbdproto.request(nbdproto.CMD_DISC, 1) == struct.pack(
        ">IHHQQI", 0x25609513, 0, 2, 1, 0, 0)


def test_options():
    assert nbdproto.option(nbdproto.OPT_STRUCTURED_REPLY) == (
        b"IHAVEOPT" + bytes.fromhex("00000008" "00000000"))
    assert nbdproto.go_data("vda") == bytes.fromhex(
        "00000003") + b"vda" + bytes.fromhex("0001" "0003")
    assert nbdproto.meta_context_data("") == bytes.fromhex(
        "00000000" "00000001" "0000000f") + b"base:allocation"
    assert nbdproto.meta_context_data("x", "qemu:dirty-bitmap:b") == (
        bytes.fromhex("00000001") + b"x" + bytes.fromhex("00000001" "00000013")
        + b"qemu:dirty-bitmap:b")


def test_error_names():
    assert nbdproto.error_name(5) == "EIO"
    assert nbdproto.error_name(99) == "error 99"
    payload = struct.pack(">IH", 28, 9) + b" no room \0\0"
    assert nbdproto.error_chunk(payload) == "ENOSPC: no room"
    assert nbdproto.error_chunk(struct.pack(">IH", 5, 0)) == "EIO"
    assert nbdproto.error_chunk(bytes(5)) is None


def test_refusal():
    assert nbdproto.refusal(nbdproto.REP_ERR | 6, b"") == "no such export"
    assert nbdproto.refusal(nbdproto.REP_ERR | 2, b"hook failed\n") == (
        "forbidden by the server's policy: hook failed")
    assert nbdproto.refusal(nbdproto.REP_ERR | 99, b"") == "error 0x80000063"


def test_clip_extents():
    # The server may answer past the range asked for, never short of one.
    assert nbdproto.clip_extents([(100, 0), (50, 3)], 1000, 120) == [
        (100, 0), (20, 3)]
    assert nbdproto.clip_extents([(100, 0), (50, 3)], 0, 100) == [(100, 0)]
    assert nbdproto.clip_extents([(10, 1)], 0, 100) == [(10, 1)]
