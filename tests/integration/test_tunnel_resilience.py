"""Tunnels that must survive: killed peers, wrong keys, certificate changes."""

from __future__ import annotations

import signal
import ssl
import time

import gevent
import pytest
from gevent import socket
from helpers import (
    EchoPair,
    NpProcess,
    connect_retry,
    echo_roundtrip,
    free_port,
    in_process,
    make_ca_and_cert,
    recv_all,
    tunnel_urls,
    wait_pool,
)

from npgevent.net.tls import fingerprint


def _works(port: int) -> bool:
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    except OSError:
        return False
    try:
        sock.settimeout(2)
        sock.sendall(b"heal?")
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock) == b"heal?"
    except OSError:
        return False
    finally:
        sock.close()


def _heal_time(port: int, limit: float = 10.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if _works(port):
            return time.monotonic() - start
        gevent.sleep(0.2)
    raise AssertionError("tunnel did not heal within %ss" % limit)


@pytest.mark.parametrize("victim", ["server", "client"])
def test_sigkilled_peer_restarted_heals_within_10s(victim):
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("fwd", "0", tport, uport, echo.port)
    env = {"NP_SERVICE_COOLDOWN": "3s", "NP_REPORT_INTERVAL": "5s"}  # Go's defaults
    procs = {"server": NpProcess(server_url, env=env), "client": NpProcess(client_url, env=env)}
    try:
        procs["client"].wait_for(r"CHECK_POINT\|MODE=2\|PING=\d+ms\|POOL=[1-9]")
        assert _works(uport)
        procs[victim].signal(signal.SIGKILL)
        procs[victim].wait(5)
        procs[victim].close()
        procs[victim] = NpProcess(server_url if victim == "server" else client_url, env=env)
        procs[victim].wait_for("started")
        elapsed = _heal_time(uport, 10.0)
        assert elapsed < 10.0
        survivor = procs["client" if victim == "server" else "server"]
        assert survivor.proc.poll() is None  # the other side never died
        assert "Traceback" not in survivor.output
    finally:
        for p in procs.values():
            p.close()
        echo.close()


def test_wrong_key_other_length_refused_both_keep_running():
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, _ = tunnel_urls("rev", "0", tport, uport, echo.port)
    bad_client = "client://secret2@127.0.0.1:%d/127.0.0.1:%d?mode=2" % (tport, echo.port)
    good_client = "client://secret@127.0.0.1:%d/127.0.0.1:%d?mode=2" % (tport, echo.port)
    with NpProcess(server_url) as s, NpProcess(bad_client) as bad:
        s.wait_for(r"WARN  tunnelHandshake: access denied: 127\.0\.0\.1:\d+")
        bad.wait_for(r"ERROR  Client error: tunnel handshake: connection closed by the server \(wrong tunnel key\?\)")
        bad.wait_for(r"INFO  Client restart: ")
        assert s.proc.poll() is None and bad.proc.poll() is None
        bad.stop()
        with NpProcess(good_client) as good:
            good.wait_for("Tunnel handshaked", timeout=20)
            assert _heal_time(uport) < 10
            good.stop()
        assert s.stop() == 0
    echo.close()


def test_wrong_key_same_length_fails_on_client_both_keep_running():
    """auth=0: Go's flaw kept for compatibility (the authenticated case is in test_auth_attacks)."""
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, _ = tunnel_urls("rev", "0", tport, uport, echo.port, extra_server="&auth=0")
    bad_client = "client://SECRET@127.0.0.1:%d/127.0.0.1:%d?mode=2&auth=0" % (tport, echo.port)
    with NpProcess(server_url) as s, NpProcess(bad_client) as bad:
        # the server cannot tell (Go's rule) and replies; the client cannot decode the reply
        s.wait_for(r"INFO  Tunnel handshaked")
        bad.wait_for(r"ERROR  Client error: tunnel handshake: parse tunnel URL failed")
        s.wait_for(r"ERROR  Server error: control connection closed by the peer")
        s.wait_for(r"INFO  Server restart: ")
        bad.wait_for(r"INFO  Client restart: ")
        assert s.proc.poll() is None and bad.proc.poll() is None
        assert s.stop() == 0 and bad.stop() == 0
        assert "Traceback" not in s.output + bad.output
    echo.close()


def _server_cert_fp(port: int) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    from cryptography import x509

    with ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    return fingerprint(x509.load_der_x509_certificate(der))


def test_tls2_certificate_rewritten_while_running_is_reloaded(tmp_path):
    certs = make_ca_and_cert(tmp_path / "a", cn="first")
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "2", tport, uport, echo.port, certs)
    env = {"SSL_CERT_FILE": str(certs["ca"]), "NP_RELOAD_INTERVAL": "1s"}
    from cryptography import x509

    first_fp = fingerprint(x509.load_pem_x509_certificate(certs["crt"].read_bytes()))
    try:
        with NpProcess(server_url, env=env) as s, NpProcess(client_url, env=env) as c:
            s.wait_for("INFO  TLS code-2: first with TLS 1.3")
            s.wait_for(r"CHECK_POINT\|MODE=1\|PING=\d+ms\|POOL=[1-9]")
            assert c.wait_for(r"INFO  TLS cert verified: (\S+)", timeout=20).group(1) == first_fp
            # a live session across the reload
            live = connect_retry(uport)
            live.sendall(b"before")
            assert live.recv(6) == b"before"
            # rewrite the files with a new certificate from the same CA
            new = make_ca_and_cert(tmp_path / "b", cn="second")
            new_pem = new["crt"].read_bytes()
            from cryptography.hazmat.primitives import serialization

            ca_key = serialization.load_pem_private_key(certs["ca_key"].read_bytes(), None)
            reissued = _reissue(new_pem, new["key"].read_bytes(), certs["ca"].read_bytes(), ca_key)
            certs["key"].write_bytes(new["key"].read_bytes())
            certs["crt"].write_bytes(reissued)
            second_fp = fingerprint(x509.load_pem_x509_certificate(reissued))
            gevent.sleep(1.2)
            # a new connection to the tunnel port (from the client's IP) sees the new certificate
            assert _server_cert_fp(tport) == second_fp
            s.wait_for(r"INFO  TLS cert reloaded: second sha256:")
            # the live session was not dropped, and new sessions still verify and work
            live.sendall(b"after")
            assert live.recv(5) == b"after"
            live.close()
            assert echo_roundtrip(uport, b"new sessions") == b"new sessions"
            assert s.stop() == 0 and c.stop() == 0
    finally:
        echo.close()


def _reissue(cert_pem: bytes, key_pem: bytes, ca_pem: bytes, ca_key) -> bytes:
    """Re-sign *cert_pem*'s subject and key with the original CA."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    cert = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(ca_pem)
    key = serialization.load_pem_private_key(key_pem, None)
    now = datetime.datetime.now(datetime.timezone.utc)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    out = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(ca.subject)
           .public_key(key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(san, critical=False).sign(ca_key, hashes.SHA256()))
    return out.public_bytes(serialization.Encoding.PEM)


def test_tls2_unloadable_files_fall_back_to_code_1(tmp_path):
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    missing = {"crt": tmp_path / "nope.crt", "key": tmp_path / "nope.key"}
    server_url, client_url = tunnel_urls("rev", "2", tport, uport, echo.port, missing)
    try:
        with in_process(server_url) as s, in_process(client_url) as c:
            s.capture.wait_for(r"ERROR  TLS code-2: cannot load crt=.*nope\.crt .*falling back to code-1")
            s.capture.wait_for(r"INFO  TLS code-1: RAM cert with TLS 1\.3")
            assert c.core.tls_code == "1"
            wait_pool(lambda: s.core.pool.active, 1)
            assert echo_roundtrip(uport, b"fallback") == b"fallback"
    finally:
        echo.close()


def test_tls2_client_rejects_untrusted_certificate(tmp_path, monkeypatch):
    certs = make_ca_and_cert(tmp_path / "srv")
    other = make_ca_and_cert(tmp_path / "other")
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "2", tport, uport, echo.port, certs)
    monkeypatch.setenv("SSL_CERT_FILE", str(other["ca"]))  # the client trusts another CA
    try:
        with in_process(server_url) as s, in_process(client_url) as c:
            c.capture.wait_for(r"ERROR  Tunnel pool: cannot open pool connections .*certificate verify failed")
            assert s.core.pool.active == 0
            assert c.capture.count("Client error") == 0  # the tunnel itself stays up
    finally:
        echo.close()


def test_tls2_name_mismatch_rejected(tmp_path, monkeypatch):
    certs = make_ca_and_cert(tmp_path / "srv", names=("elsewhere.example",), ips=("192.0.2.1",))
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "2", tport, uport, echo.port, certs)
    monkeypatch.setenv("SSL_CERT_FILE", str(certs["ca"]))
    try:
        with in_process(server_url) as s, in_process(client_url) as c:
            c.capture.wait_for(r"ERROR  Tunnel pool: cannot open pool connections .*does not match 127\.0\.0\.1")
            assert s.core.pool.active == 0
    finally:
        echo.close()
