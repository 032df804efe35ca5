"""nbdsnap.verify.tls and the TLS side of nbdproto.parse_uri: libnbd's URI
parameters, its certificate folders, and the client context made of
them, with fixed answers.

The handshake against nbd-server is tested in tests/real/test_tls_client.py.
"""

import socket
import ssl
import struct
import subprocess
import threading

import pytest

from nbdsnap.verify import nbd, nbdconn, nbdproto, tls
from nbdsnap.verify.errors import (NbdError, SourceError, TlsError,
                                   UnsupportedSource)
from nbdsnap.verify.nbdproto import Address
from verifykit import recv_exactly


def test_nbds_uris_in_libnbds_form():
    assert nbdproto.parse_uri(
        "nbds://vm.example:1234/vda?tls-certificates=/etc/c") == Address(
        "vda", "vm.example", 1234, tls=True, certificates="/etc/c")
    assert nbdproto.parse_uri("NBDS://h/e") == Address(
        "e", "h", 10809, tls=True)
    assert nbdproto.parse_uri(
        "nbds+unix://alice@/e?socket=/run/s&tls-certificates=c") == Address(
        "e", socket_path="/run/s", tls=True, certificates="c")


@pytest.mark.parametrize("value,verify", [
    ("false", False), ("0", False), ("No", False), ("off", False),
    ("true", True), ("1", True), ("yes", True), ("on", True)])
def test_tls_verify_peer_takes_libnbds_booleans(value, verify):
    address = nbdproto.parse_uri(f"nbds://h/e?tls-verify-peer={value}")
    assert address.verify_peer is verify


def test_tls_parameters_on_a_plain_uri_are_refused():
    """libnbd ignores them; whoever wrote them believes the copy goes
    encrypted."""
    with pytest.raises(SourceError, match="tls-certificates, tls-psk-file "
                       "with a plain-text URI: use nbds://"):
        nbdproto.parse_uri("nbd://h/e?tls-certificates=/c&tls-psk-file=/k")


def test_a_plus_in_a_folder_is_a_plus_as_libnbd_reads_it():
    assert nbdproto.parse_uri(
        "nbds://h/e?tls-certificates=/srv/a+b%20c").certificates == \
        "/srv/a+b c"


def test_a_server_s_refusal_is_one_printable_line():
    text = nbdproto.refusal(0x80000001, b"no\n\x1b[31mFAKE: all good"
                            + b"x" * 500)
    assert "\n" not in text and "\x1b" not in text
    assert text.startswith("NBD_REP_ERR_UNSUP: no??[31mFAKE") or \
        "??[31mFAKE" in text
    assert len(text) < 260


@pytest.mark.parametrize("uri,error,words", [
    ("nbds://h/e?tls-psk-file=/k", UnsupportedSource, "pre-shared key"),
    ("nbds://h/e?tls-username=u", UnsupportedSource, "pre-shared key"),
    ("nbds://h/e?tls-verify-peer=maybe", SourceError, "not a boolean"),
    ("nbds+unix:///e", SourceError, "socket"),
    ("nbds:///e", SourceError, "no host: nbds://"),
    ("nbds+vsock:///e", UnsupportedSource, "vsock"),
])
def test_refused_tls_uris(uri, error, words):
    with pytest.raises(error, match=words) as e:
        nbdproto.parse_uri(uri)
    assert "\n" not in str(e.value)


def test_default_folders_are_libnbds():
    assert tls.default_folders(0, "/root") == ["/etc/pki/libnbd"]
    assert tls.default_folders(1000, "/home/u") == [
        "/home/u/.pki/libnbd", "/home/u/.config/pki/libnbd"]
    assert tls.default_folders(1000, None) == []


def test_the_first_default_folder_with_a_ca_counts():
    present = {"/home/u/.config/pki/libnbd",
               "/home/u/.config/pki/libnbd/ca-cert.pem",
               "/home/u/.config/pki/libnbd/client-cert.pem",
               "/home/u/.config/pki/libnbd/client-key.pem",
               "/home/u/.pki/libnbd/client-cert.pem"}
    files = tls.find_files(None, present.__contains__, 1000, "/home/u")
    d = "/home/u/.config/pki/libnbd/"
    assert files == tls.Files(d[:-1], d + "ca-cert.pem",
                              d + "client-cert.pem", d + "client-key.pem",
                              None)


def test_without_any_folder_the_systems_cas():
    assert tls.find_files(None, lambda p: False, 1000, "/home/u") == \
        tls.Files(None, None, None, None, None)


def test_a_named_folder_needs_its_ca_and_cert_and_key_together():
    def exists(*names):
        return {"/c", *("/c/" + n for n in names)}.__contains__

    with pytest.raises(tls.TlsError, match="^/x: no such folder"):
        tls.find_files("/x", exists())
    with pytest.raises(tls.TlsError, match="^/c/ca-cert.pem: no such file"):
        tls.find_files("/c", exists("client-cert.pem", "client-key.pem"))
    with pytest.raises(tls.TlsError, match="^/c/client-key.pem: no such"):
        tls.find_files("/c", exists("ca-cert.pem", "client-cert.pem"))
    with pytest.raises(tls.TlsError, match="^/c/client-cert.pem: no such"):
        tls.find_files("/c", exists("ca-cert.pem", "client-key.pem"))
    # A CA alone: the server is checked, no certificate shown (libnbd).
    assert tls.find_files("/c", exists("ca-cert.pem")).cert is None


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A CA and a client certificate, by the real openssl."""
    d = tmp_path_factory.mktemp("pki")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True,
                       capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt",
        "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=ca",
        "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-subj", "/CN=clone", "-keyout", "client-key.pem",
        "-out", "client.csr")
    run("x509", "-req", "-in", "client.csr", "-CA", "ca-cert.pem",
        "-CAkey", "ca-key.pem", "-CAcreateserial", "-out",
        "client-cert.pem", "-days", "2")
    # The fake server's, for the name "fake" (not in the client's folder
    # in real life; harmless here).
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-subj", "/CN=fake", "-addext", "subjectAltName=DNS:fake",
        "-keyout", "server-key.pem", "-out", "server.csr")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem",
        "-CAkey", "ca-key.pem", "-CAcreateserial", "-copy_extensions",
        "copy", "-out", "server-cert.pem", "-days", "2")
    return d


def test_the_context_checks_the_server_and_shows_our_certificate(folder):
    t = tls.setup(str(folder))
    ctx = t.context
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert [c["subject"] for c in ctx.get_ca_certs()] == [
        ((("commonName", "ca"),),)]
    assert t.files.cert == str(folder / "client-cert.pem")
    # Over a Unix socket the chain only, as libnbd.
    assert not tls.setup(str(folder), check_hostname=False).context \
        .check_hostname


def test_verify_peer_false_checks_nothing_and_warns(folder, caplog):
    ctx = tls.setup(str(folder), verify_peer=False).context
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    assert "tls-verify-peer=false" in caplog.text


def test_keys_that_cannot_be_used_are_one_line(folder, tmp_path):
    for name in ("ca-cert.pem", "client-cert.pem"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "client-key.pem").write_text("not a key\n")
    with pytest.raises(tls.TlsError, match="client-key.pem: not the client "
                                           "certificate and its key"):
        tls.setup(str(tmp_path))
    subprocess.run(["openssl", "pkey", "-in", str(folder / "client-key.pem"),
                    "-aes256", "-passout", "pass:x", "-out",
                    str(tmp_path / "client-key.pem")], check=True,
                   capture_output=True, timeout=60)
    with pytest.raises(tls.TlsError, match="the key is encrypted"):
        tls.setup(str(tmp_path))
    (tmp_path / "ca-cert.pem").write_text("junk\n")
    with pytest.raises(tls.TlsError, match="ca-cert.pem: not a CA"):
        tls.setup(str(tmp_path))


def test_refusals_name_what_the_operator_can_change():
    files = tls.Files("/c", "/c/ca-cert.pem", "/c/client-cert.pem",
                      "/c/client-key.pem", None)
    assert tls.refused_client(files, "eof") == (
        "the server refused the TLS session: it did not accept "
        "/c/client-cert.pem (eof)")
    none = files._replace(cert=None, key=None)
    assert "no client certificate was shown (/c has none)" in \
        tls.refused_client(none, "eof")


# -- the handshake, against a fake server on a socket pair --------------------

def reply(conn, opt, rtype, data=b""):
    conn.sendall(struct.pack(">QIII", nbdproto.OPTION_REPLY_MAGIC, opt,
                             rtype, len(data)) + data)


def option(conn):
    _, opt, length = struct.unpack(">QII", recv_exactly(conn, 16))
    recv_exactly(conn, length)
    return opt


@pytest.fixture
def server(monkeypatch, folder):
    """server(starttls, require): the next connection's other end is a
    fake NBD server in a thread (a socket pair): it answers STARTTLS with
    starttls (an option reply type; TLS follows an ACK), refuses every
    other option with NBD_REP_ERR_TLS_REQD before TLS if require, then
    serves a 1 MiB export and records the next command in got."""
    threads, got = [], []

    def make(starttls=nbdproto.REP_ACK, require=True):
        ours, theirs = socket.socketpair()
        ours.settimeout(10)
        theirs.settimeout(10)

        def serve():
            conn, plain_refused = theirs, require
            try:
                conn.sendall(struct.pack(
                    ">QQH", nbdproto.NBDMAGIC, nbdproto.IHAVEOPT,
                    nbdproto.FLAG_FIXED_NEWSTYLE | nbdproto.FLAG_NO_ZEROES))
                recv_exactly(conn, 4)
                while True:
                    opt = option(conn)      # conn: TLS once started
                    if opt == nbdproto.OPT_STARTTLS:
                        reply(conn, opt, starttls)
                        if starttls != nbdproto.REP_ACK:
                            continue
                        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                        ctx.load_cert_chain(folder / "server-cert.pem",
                                            folder / "server-key.pem")
                        conn = ctx.wrap_socket(conn, server_side=True)
                        plain_refused = False
                    elif plain_refused:
                        reply(conn, opt, nbdproto.REP_ERR_TLS_REQD)
                    elif opt == nbdproto.OPT_GO:
                        reply(conn, opt, nbdproto.REP_INFO, struct.pack(
                            ">HQH", nbdproto.INFO_EXPORT, 1 << 20,
                            nbdproto.FLAG_HAS_FLAGS))
                        reply(conn, opt, nbdproto.REP_ACK)
                        break
                    else:
                        reply(conn, opt, nbdproto.REP_ERR_UNSUP)
                got.append(struct.unpack(">IHHQQI",
                                         recv_exactly(conn, 28))[2])
            except (OSError, AssertionError):
                pass
            finally:
                conn.close()

        threads.append(threading.Thread(target=serve, daemon=True))
        threads[-1].start()
        monkeypatch.setattr(nbdconn, "_connect", lambda *args: ours)
        return threads[-1]

    make.got = got
    yield make
    for thread in threads:
        thread.join(10)


def test_starttls_then_the_export_then_goodbye(server, folder):
    thread = server()
    with nbd.Client(f"nbds://fake/x?tls-certificates={folder}",
                    timeout=10) as c:
        assert c.size == 1 << 20
    thread.join(10)     # the server has read what we sent last
    assert server.got == [nbdproto.CMD_DISC]


def test_a_name_the_servers_certificate_lacks_is_refused(server, folder):
    server()
    with pytest.raises(TlsError, match="not valid for other"):
        nbd.Client(f"nbds://other/x?tls-certificates={folder}", timeout=10)


def test_a_plain_client_is_told_to_use_nbds(server):
    server()
    with pytest.raises(TlsError, match="requires TLS for export 'x': use "
                                       "nbds://"):
        nbd.Client("nbd://fake/x", timeout=10)


def test_a_server_without_tls(server, folder):
    server(starttls=nbdproto.REP_ERR | 2)
    with pytest.raises(TlsError, match="does not offer TLS"):
        nbd.Client(f"nbds://fake/x?tls-certificates={folder}", timeout=10)


def test_over_a_unix_socket_the_chain_only_as_libnbd(server, folder):
    server()
    with nbd.Client(f"nbds+unix:///x?socket=/run/nbd.sock&"
                    f"tls-certificates={folder}", timeout=10) as c:
        assert c.size == 1 << 20


def test_a_server_silent_in_the_handshake_is_a_timeout_not_a_refusal(
        monkeypatch, folder):
    """A slow network or server is worth another run (exit 1), not a
    certificate to change (TlsError, exit 2)."""
    ours, theirs = socket.socketpair()
    ours.settimeout(0.5)            # what _connect sets from timeout=
    done = threading.Event()

    def serve():
        theirs.sendall(struct.pack(
            ">QQH", nbdproto.NBDMAGIC, nbdproto.IHAVEOPT,
            nbdproto.FLAG_FIXED_NEWSTYLE | nbdproto.FLAG_NO_ZEROES))
        recv_exactly(theirs, 4)
        reply(theirs, option(theirs), nbdproto.REP_ACK)
        done.wait(10)               # and never a TLS record
        theirs.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    monkeypatch.setattr(nbdconn, "_connect", lambda *args: ours)
    try:
        with pytest.raises(NbdError) as raised:
            nbd.Client(f"nbds://fake/x?tls-certificates={folder}",
                       timeout=0.5)
        assert not isinstance(raised.value, TlsError)
        assert str(raised.value) == (
            f"nbds://fake/x?tls-certificates={folder}: timed out during "
            f"the TLS handshake")
    finally:
        done.set()
        thread.join(10)
