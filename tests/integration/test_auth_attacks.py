"""Attacks on the tunnel's authentication; each attacker is a small client written here.

Every ``auth=2`` test shows three things: the attack fails, the real tunnel carries user
sessions during the attack, and nothing the attacker sent reached a user or a target.
"""

from __future__ import annotations

import base64
import contextlib
import os
import time

import gevent
import pytest
from gevent import socket
from gevent.event import Event
from gevent.server import StreamServer
from helpers import (
    EchoPair,
    echo_exact,
    free_port,
    in_process,
    make_ca_and_cert,
    recv_all,
    tunnel_urls,
    udp_roundtrip,
    wait_pool,
)

from npgevent.errors import CoreError
from npgevent.protocol.auth import AUTH_ONLY, CHALLENGE
from npgevent.protocol.handshake import client_hello
from npgevent.protocol.signals import Launch, encode_line

pytestmark = pytest.mark.timeout(120)
KEY = "s3cret-key-of-twenty"


def heals(port: int, within: float) -> None:
    """The tunnel carries sessions again within *within* seconds (after a restart)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, AssertionError):
            carries(port, 1)
            break
        gevent.sleep(0.2)
    carries(port)


def carries(port: int, n: int = 5) -> None:
    for i in range(n):
        payload = b"user session %d " % i + os.urandom(8).hex().encode()
        assert echo_exact(port, payload) == payload


@contextlib.contextmanager
def tunnel(auth_server: str = "2", auth_client: str = "2", tls: str = "1", client_url_port: int | None = None,
           **env: str):
    """An in-process server and client with *auth*; yields (server, client, tunnel port, user port, echo)."""
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", tls, tport, uport, echo.port, key=KEY,
                                         extra_server="&auth=%s" % auth_server,
                                         extra_client="&auth=%s" % auth_client)
    if client_url_port is not None:
        client_url = client_url.replace(":%d/" % tport, ":%d/" % client_url_port)
    try:
        with in_process(server_url, **env) as s, in_process(client_url, **env) as c:
            wait_pool(lambda: s.core.pool.active, 4)
            yield s, c, tport, uport, echo
    finally:
        echo.close()


def target_saw(echo: EchoPair, marker: bytes) -> bool:
    return any(marker in line for line in echo.tcp.first_lines)


# -- the key --------------------------------------------------------------------------------


def wrong_key_attempt(port: int, key: bytes) -> bytes:
    """Both of the attacker's options with a wrong key of the right length: Go's key line, and
    npgevent's challenge-response; returns whatever the server sent back."""
    got = b""
    for first in (client_hello(key, extensions=False), client_hello(key)):
        with contextlib.suppress(OSError):
            sock = socket.create_connection(("127.0.0.1", port), timeout=3)
            try:
                sock.sendall(first)
                data = sock.recv(4096)
                got += data
                if data.startswith(CHALLENGE):  # answer with a proof made from the wrong key
                    from npgevent.protocol.auth import ClientAuth

                    sock.sendall(ClientAuth(key).answer(data))
                    got += sock.recv(4096)
            finally:
                sock.close()
    return got


def test_same_length_wrong_key_gets_nothing_and_the_tunnel_works():
    with tunnel() as (s, _c, tport, uport, _echo):
        wrong = b"x" * len(KEY)
        for _ in range(20):
            answer = wrong_key_attempt(tport, wrong)
            assert b"np://" not in answer and answer.count(b"\n") <= 1  # at most a challenge
        carries(uport)
        assert s.core.control is not None and s.core.cipher is not None  # still the real client
        # with the control slot taken, a new connection is a pool connection: TLS first, then
        # a proof; the attacker's lines fail there and it never sees an id or a reply


def hammer(port: int, stop: Event) -> int:
    n = 0
    while not stop.is_set():
        wrong_key_attempt(port, b"y" * len(KEY))
        n += 1
        gevent.sleep(0)
    return n


def test_wrong_key_hammering_at_start_and_across_a_restart():
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "1", tport, uport, echo.port, key=KEY,
                                         extra_server="&auth=2", extra_client="&auth=2")
    stop = Event()
    try:
        with in_process(server_url) as s:
            attacker = gevent.spawn(hammer, tport, stop)  # hammering before the client exists
            gevent.sleep(0.5)
            with in_process(client_url) as c:
                wait_pool(lambda: s.core.pool.active, 2, timeout=15)
                carries(uport)
                s.core.fail(CoreError("test: control channel lost"))  # a restart, under attack
                s.capture.wait_for(r"Server restart", timeout=10)
                heals(uport, within=15)
                assert s.core.cipher is not None and c.core.cipher is not None
            stop.set()
            assert attacker.get(timeout=10) > 10
    finally:
        stop.set()
        echo.close()


def test_a_recorded_handshake_reveals_no_key_and_cannot_be_replayed():
    """A passive recording of the real handshake: no line XORed with the known reply text gives
    the key (Go's reply would); replaying the client's lines after a server restart gets a
    fresh challenge and a refusal, and the real client gets back in."""
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    tap = ControlMitm(tport)
    server_url, client_url = tunnel_urls("rev", "1", tport, uport, echo.port, key=KEY,
                                         extra_server="&auth=2", extra_client="&auth=2")
    client_url = client_url.replace(":%d/" % tport, ":%d/" % tap.port)
    try:
        with in_process(server_url) as s, in_process(client_url, service_cooldown="3s") as c:
            wait_pool(lambda: s.core.pool.active, 2)
            to_server = b"".join(tap.to_server).split(b"\n")
            to_client = b"".join(tap.to_client).split(b"\n")
            client_lines = [line + b"\n" for line in to_server[:2]]
            assert client_lines[0] == AUTH_ONLY and to_client[0].startswith(CHALLENGE.strip())
            for line in to_server[:2] + to_client[:2]:
                for piece in line.split():
                    with contextlib.suppress(ValueError):
                        raw = base64.b64decode(piece)
                        for plain in (b"np://0@1024/-#1", b"np://0@1024/-?npg=2#1"):
                            guess = bytes(a ^ b for a, b in zip(raw, plain, strict=False))
                            assert KEY.encode()[: len(guess)] != guess
            s.core.fail(CoreError("test: control channel lost"))
            s.capture.wait_for(r"Server restart", timeout=10)
            sock = socket.create_connection(("127.0.0.1", tport), timeout=5)
            try:
                sock.sendall(client_lines[0])
                fresh = sock.recv(4096)
                assert fresh.startswith(CHALLENGE) and fresh.split(b"\n")[0] != to_client[0]
                sock.sendall(client_lines[1])  # the recorded proof, for the old challenge
                assert sock.recv(4096) == b""  # refused, nothing said
            finally:
                sock.close()
            s.capture.wait_for(r"access denied: the client did not prove the key")
            heals(uport, within=20)
            assert c.core.cipher is not None
    finally:
        tap.close()
        echo.close()


# -- the control channel ------------------------------------------------------------------------


class ControlMitm:
    """A TCP proxy on the tunnel path that records the control connection's server->client bytes
    and can inject bytes into either direction of it (the first connection through)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.control: tuple[socket.socket, socket.socket] | None = None
        self.to_client: list[bytes] = []
        self.to_server: list[bytes] = []
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.port = self.server.address[1]
        self.socks: list[socket.socket] = []

    def _handle(self, sock, _addr):
        up = socket.create_connection(("127.0.0.1", self.target))
        self.socks += [sock, up]
        first = self.control is None
        if first:
            self.control = (sock, up)
        a = gevent.spawn(self._pump, sock, up, self.to_server if first else None)
        b = gevent.spawn(self._pump, up, sock, self.to_client if first else None)
        gevent.joinall([a, b], count=1)
        gevent.killall([a, b])
        up.close()

    def _pump(self, src, dst, record):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    return
                if record is not None:
                    record.append(data)
                dst.sendall(data)
        except OSError:
            pass

    def inject_to_server(self, data: bytes) -> None:
        assert self.control is not None
        self.control[1].sendall(data)

    def close(self):
        self.server.stop(timeout=1)
        for s in self.socks:
            s.close()


def test_forged_replayed_and_reordered_signals_fail():
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    mitm = ControlMitm(tport)
    server_url, client_url = tunnel_urls("fwd", "1", tport, uport, echo.port, key=KEY,
                                         extra_server="&auth=2", extra_client="&auth=2")
    client_url = client_url.replace(":%d/" % tport, ":%d/" % mitm.port)
    try:
        with in_process(server_url) as s, in_process(client_url) as c:
            wait_pool(lambda: c.core.pool.active, 4)
            carries(uport)
            accepted = echo.tcp.accepted
            # forged: a launch in Go's format, made with the key itself (what a Go peer would accept)
            cid = next(iter(s.core.pool.idle))
            mitm.inject_to_server(encode_line(Launch(False, "6.6.6.6:666", cid).encode(), KEY.encode()))
            s.capture.wait_for(r"Control signal from .* rejected: control line failed authentication")
            gevent.sleep(0.3)
            assert echo.tcp.accepted == accepted  # the server dialled nothing for it
            carries(uport)  # one bad line is reported, the tunnel goes on
            # replayed: a sealed line the server sent earlier, sent to it again (and reordered)
            recorded = b"".join(mitm.to_client).split(b"\n")
            sealed = [line + b"\n" for line in recorded[1:] if line][:2]
            for line in reversed(sealed):
                mitm.inject_to_server(line)
            s.capture.wait_for(r"control channel: 3 lines failed authentication: torn down", timeout=10)
            # the tunnel rebuilds itself and carries sessions again
            heals(uport, within=20)
            assert not any(b"6.6.6.6" in line for line in echo.tcp.first_lines)
    finally:
        mitm.close()
        echo.close()


# -- pool connections ------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", ["0", "1"])
def test_a_thousand_pool_connections_from_the_clients_ip_get_nothing(tls):
    """The attacker shares the client's IP (NAT, a shared host) and opens 1000 pool
    connections: none proves membership, none gets an id or a user session."""
    with tunnel(tls=tls) as (s, _c, tport, uport, _echo):
        from npgevent.net.tlsctx import client_context

        rogue: list = []
        got_ids = 0

        def one(i: int) -> None:
            nonlocal got_ids
            with contextlib.suppress(OSError):
                sock = socket.create_connection(("127.0.0.1", tport), timeout=5)
                rogue.append(sock)
                stream = sock
                if tls == "1":
                    from npgevent.net.tls import TLSStream

                    stream = TLSStream.client(sock, client_context("1"), "127.0.0.1")
                    stream.handshake(5)
                stream.sendall(os.urandom(24))  # a made-up proof
                sock.settimeout(3)
                if stream.recv(4):
                    got_ids += 1

        jobs = [gevent.spawn(one, i) for i in range(1000)]
        users = [gevent.spawn(echo_exact, uport, b"user %03d" % i + os.urandom(4).hex().encode())
                 for i in range(150)]
        gevent.joinall(jobs + users, timeout=90)
        for sock in rogue:
            sock.close()
        assert got_ids == 0
        assert all(u.successful() and u.value.startswith(b"user ") for u in users)
        assert s.core.pool_rejected >= 100


def test_stalled_pool_proofs_hold_no_greenlet_and_are_dropped_at_the_timeout():
    """The attacker (the client's IP) opens 300 pool connections, sends part of a proof and
    then nothing.  Each waits as a watcher and a timer, not a greenlet; the server closes
    them all at the handshake timeout without an id, counts them, and serves users meanwhile."""
    with tunnel(tls="0", handshake_timeout="2s") as (s, _c, tport, uport, _echo):
        core = s.core
        tasks_before = len(core.tasks)
        failed_before = core.inst.events.failures["pool_admission"]
        rogue = []
        try:
            for _ in range(300):
                sock = socket.create_connection(("127.0.0.1", tport), timeout=5)
                sock.sendall(os.urandom(10))  # 10 of the 24 bytes of a proof
                rogue.append(sock)
            deadline = time.monotonic() + 5
            while len(core.setups) < 300 and time.monotonic() < deadline:
                gevent.sleep(0.02)
            assert len(core.setups) >= 300
            assert len(core.tasks) <= tasks_before + 5  # no greenlet per pending connection
            for i in range(20):
                payload = b"user %02d " % i + os.urandom(8).hex().encode()
                assert echo_exact(uport, payload) == payload
            for sock in rogue:
                sock.settimeout(10)
                assert recv_all(sock) == b""  # closed by the server: no id
            assert core.inst.events.failures["pool_admission"] - failed_before >= 300
            deadline = time.monotonic() + 5
            while core.setups and time.monotonic() < deadline:
                gevent.sleep(0.02)
            assert not core.setups
        finally:
            for sock in rogue:
                sock.close()


# -- the certificate ----------------------------------------------------------------------------------


class TlsMitm:
    """Between client and server: relays the control connection as it is, and terminates the
    pool connections' TLS with its own certificate (re-encrypting towards the server)."""

    def __init__(self, target: int, certs) -> None:
        from gevent import ssl as gssl

        self.target = target
        self.ctx = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(certs["crt"]), str(certs["key"]))
        self.up_ctx = gssl.SSLContext(gssl.PROTOCOL_TLS_CLIENT)
        self.up_ctx.check_hostname = False
        self.up_ctx.verify_mode = gssl.CERT_NONE
        self.seen = b""  # plaintext of pool connections the MITM got to read
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.port = self.server.address[1]

    def _handle(self, sock, _addr):
        up = socket.create_connection(("127.0.0.1", self.target))
        try:
            first = sock.recv(1, socket.MSG_PEEK)
            if first == b"\x16":  # a TLS ClientHello: a pool connection, ours to read
                sock = self.ctx.wrap_socket(sock, server_side=True)
                up = self.up_ctx.wrap_socket(up)
            pumps = [gevent.spawn(self._pump, sock, up), gevent.spawn(self._pump, up, sock)]
            gevent.joinall(pumps, count=1)
            gevent.killall(pumps)
        except OSError:
            pass
        finally:
            up.close()

    def _pump(self, src, dst):
        with contextlib.suppress(OSError):
            while True:
                data = src.recv(65536)
                if not data:
                    return
                self.seen += data
                dst.sendall(data)

    def close(self):
        self.server.stop(timeout=1)


def test_a_man_in_the_middle_on_tls1_with_its_own_certificate_gets_no_data(tmp_path):
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    mitm = TlsMitm(tport, make_ca_and_cert(tmp_path / "mitm", cn="mitm"))
    server_url, client_url = tunnel_urls("fwd", "1", tport, uport, echo.port, key=KEY,
                                         extra_server="&auth=2", extra_client="&auth=2")
    client_url = client_url.replace(":%d/" % tport, ":%d/" % mitm.port)
    try:
        with in_process(server_url) as s, in_process(client_url, wait_running=False) as c:
            c.capture.wait_for(r"its TLS certificate .* is not the one the authenticated server vouched for",
                               timeout=15)
            secret = b"SECRET-USER-DATA password=hunter2"
            with contextlib.suppress(OSError):
                echo_exact(uport, secret, timeout=3)
            gevent.sleep(0.5)
            assert secret not in mitm.seen
            assert c.core.pool.active == 0  # nothing the MITM served entered the pool
            assert s.core.cipher is not None  # the control channel itself was authenticated
    finally:
        mitm.close()
        echo.close()


# -- handshake floods ---------------------------------------------------------------------------------


def test_connect_and_close_floods_do_not_keep_the_client_out():
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "0", tport, uport, echo.port, key=KEY,
                                         extra_server="&auth=2", extra_client="&auth=2")
    try:
        with in_process(server_url) as s:
            for _ in range(100):  # 100 connect-and-close, as fast as possible
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", tport), timeout=1).close()
            began = time.monotonic()
            with in_process(client_url) as c:
                wait_pool(lambda: s.core.pool.active, 1, timeout=10)
                carries(uport)
                assert time.monotonic() - began < 3  # Go: minutes (a 3 s pause per failure)
                assert c.core.cipher is not None
    finally:
        echo.close()


def test_a_thousand_idle_connections_delay_the_client_by_one_timeout_at_most():
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "0", tport, uport, echo.port, key=KEY,
                                         extra_server="&auth=2", extra_client="&auth=2")
    idle: list = []
    try:
        with in_process(server_url, handshake_timeout="2s") as s:
            for _ in range(1000):  # opened before the client, and left silent
                with contextlib.suppress(OSError):
                    idle.append(socket.create_connection(("127.0.0.1", tport), timeout=1))
            began = time.monotonic()  # the attack stops here: nothing new is opened
            with in_process(client_url, handshake_timeout="2s", wait_running=False) as c:
                c.running.wait(timeout=15)
                wait_pool(lambda: s.core.pool.active, 1, timeout=15)
                carries(uport)
                # Go serves one handshake at a time with a 5 s limit each: over an hour here
                assert time.monotonic() - began < 2 + 1 + 2  # one timeout, one cooldown, slack
    finally:
        for sock in idle:
            sock.close()
        echo.close()


# -- auth=1 ----------------------------------------------------------------------------------------------


def test_auth1_between_npgevent_peers_still_authenticates_pool_and_signals():
    with tunnel(auth_server="1", auth_client="1") as (s, _c, tport, uport, _echo):
        assert s.core.cipher is not None and s.core.pool_verifier is not None
        rogue = []
        for _ in range(50):
            with contextlib.suppress(OSError):
                sock = socket.create_connection(("127.0.0.1", tport), timeout=3)
                rogue.append(sock)
        gevent.sleep(0.5)
        for sock in rogue:
            sock.settimeout(6)
            with contextlib.suppress(OSError):
                assert sock.recv(4) == b""  # no id for an unproven connection
            sock.close()
        carries(uport)
        assert udp_roundtrip(uport, b"udp through an authenticated tunnel") == b"udp through an authenticated tunnel"


def test_auth2_refuses_a_go_style_client_clearly():
    """The right key, sent Go's way: no reply at all (a Go-style reply would reveal the key),
    an ERROR naming the setting, and the real client gets in afterwards."""
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "1", tport, uport, echo.port, key=KEY,
                                         extra_server="&auth=2", extra_client="&auth=2")
    try:
        with in_process(server_url) as s:
            sock = socket.create_connection(("127.0.0.1", tport), timeout=5)
            try:
                sock.sendall(client_hello(KEY.encode(), extensions=False))
                assert sock.recv(4096) == b""
            finally:
                sock.close()
            s.capture.wait_for(r"ERROR  tunnelHandshake: refused: the client speaks only Go NodePass's "
                               r"handshake.*auth=2")
            assert s.core.control is None
            with in_process(client_url):
                wait_pool(lambda: s.core.pool.active, 1)
                carries(uport)
    finally:
        echo.close()


def test_auth2_client_refuses_a_go_style_server_clearly():
    """A server that answers Go's way (auth=0 here, as a Go server would) is refused by an
    auth=2 client, which never sent it a line it would answer."""
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "0", tport, uport, echo.port, key=KEY,
                                         extra_server="&auth=0", extra_client="&auth=2")
    try:
        with in_process(server_url) as s, in_process(client_url, wait_running=False) as c:
            c.capture.wait_for(r"ERROR  Tunnel handshake with .* refused \(auth=2\)")
            s.capture.wait_for(r"tunnelHandshake: access denied")
            assert s.core.control is None
    finally:
        echo.close()


def test_a_client_that_saw_its_server_authenticate_refuses_a_downgrade():
    """The same address answers Go's way after having proved the key (a man in the middle
    stripping authentication, say): refused with an ERROR, never silently accepted."""
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "0", tport, uport, echo.port, key=KEY,
                                         extra_server="&auth=1", extra_client="&auth=1")
    try:
        with in_process(client_url, wait_running=False) as c:
            with in_process(server_url) as s:
                wait_pool(lambda: s.core.pool.active, 1)
                assert c.core.cipher is not None
            with in_process(server_url.replace("auth=1", "auth=0")) as go_style:
                c.capture.wait_for(r"ERROR  Tunnel handshake with .* proved the key before and now answers "
                                   r"with Go NodePass's unauthenticated handshake: refused", timeout=15)
                assert go_style.core.cipher is None
                assert c.capture.count(r"Tunnel signal <- :") == 1  # only the authenticated one
    finally:
        echo.close()
