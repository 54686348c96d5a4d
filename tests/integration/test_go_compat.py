"""npgevent against scripted Go NodePass v1.11.0 peers, replaying the captured traffic."""

from __future__ import annotations

import os
import re

import gevent
from gevent import socket
from gevent.server import StreamServer
from gopeer import GoClient, GoServer, load_vector, recv_exact
from helpers import (
    EchoPair,
    UdpEcho,
    connect_retry,
    free_port,
    in_process,
    recv_all,
    tunnel_urls,
    udp_socket,
    wait_pool,
)

from npgevent.protocol.signals import Flush, Launch, Ping, Verify, decode_line, encode_line
from npgevent.url import fnv1a32_hex


class EchoAfterE:
    """The captures' upstream: consumes a first byte ``E`` and echoes the rest."""

    def __init__(self) -> None:
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.port = self.server.address[1]

    def _handle(self, sock, _addr):
        first = sock.recv(1)
        if first != b"E":
            return
        while True:
            data = sock.recv(65536)
            if not data:
                break
            sock.sendall(data)

    def close(self):
        self.server.stop()


# -- npgevent server, Go client ------------------------------------------------------------


def test_server_answers_go_client_byte_for_byte():
    vec = load_vector("rev_tls0_key-secret")
    control = vec["connections"][0]
    tport, uport = free_port(), free_port()
    with in_process("server://secret@127.0.0.1:%d/127.0.0.1:%d?mode=1&tls=0&max=4" % (tport, uport)) as s:
        go = GoClient(tport, b"secret")
        try:
            hello = control["c2s_raw"].split("\n")[0].encode() + b"\n"
            assert hello == b"AAAAAAAA\n"
            reply = go.handshake(hello)
            # exactly Go's reply: np://0@4/-#0, no npgevent extension for a Go client
            assert reply == control["s2c_raw"].split("\n")[0].encode() + b"\n"
            assert s.core.npg == 0
            ids = go.open_pool(2)
            assert all(re.fullmatch(r"[0-9a-f]{8}", i) for i in ids)
            wait_pool(lambda: s.core.pool.active, 2)
            # the server pings at once and the Go client's pong produces CHECK_POINT
            go.control.next_signal(Ping)
            s.capture.wait_for(r"EVENT  CHECK_POINT\|MODE=1\|PING=\d+ms\|POOL=2\|")
            # a user connects to the server's target address: the launch names a pool id
            user = connect_retry(uport)
            user.sendall(vec["drive"]["tcp_echo_payload"].encode())
            launch = go.control.next_signal(Launch)
            assert not launch.udp and launch.cid in ids
            assert launch.addr == "127.0.0.1:%d" % user.getsockname()[1]
            line = next(raw for raw in go.control.raw_lines if decode_line(raw, b"secret").endswith(b"#1"))
            assert decode_line(line, b"secret") == ("np://%s/%s#1" % (launch.addr, launch.cid)).encode()
            pool_conn = go.pool[launch.cid]
            payload = recv_exact(pool_conn, len(vec["drive"]["tcp_echo_payload"]))
            assert payload == vec["drive"]["tcp_echo_payload"].encode()
            pool_conn.sendall(payload)
            pool_conn.shutdown(socket.SHUT_WR)
            user.shutdown(socket.SHUT_WR)
            assert recv_all(user) == payload
            user.close()
        finally:
            go.close()


def test_server_sends_udp_raw_to_go_client():
    vec = load_vector("rev_tls0_udp")
    tport, uport = free_port(), free_port()
    with in_process("server://secret@127.0.0.1:%d/127.0.0.1:%d?mode=1&max=4" % (tport, uport)) as s:
        go = GoClient(tport, b"secret")
        try:
            assert go.handshake() == encode_line("np://0@4/-#0", b"secret")
            go.open_pool(2)
            wait_pool(lambda: s.core.pool.active, 2)
            user = udp_socket()
            one, two = (p.encode() for p in vec["drive"]["udp_payloads"])
            user.sendto(one, ("127.0.0.1", uport))
            launch = go.control.next_signal(Launch)
            assert launch.udp
            conn = go.pool[launch.cid]
            assert recv_exact(conn, len(one)) == one  # raw, no length prefix
            user.sendto(two, ("127.0.0.1", uport))
            assert recv_exact(conn, len(two)) == two  # same pool connection for the same user
            conn.sendall(b"ECHO")
            assert user.recv(100) == b"ECHO"
            user.close()
        finally:
            go.close()


def test_server_refuses_key_of_other_length_and_keeps_serving():
    vec = load_vector("wrongkey_difflen")
    tport, uport = free_port(), free_port()
    with in_process("server://secret@127.0.0.1:%d/127.0.0.1:%d?mode=1" % (tport, uport),
                    service_cooldown="200ms") as s:
        bad = GoClient(tport, b"secret2")
        line = vec["connections"][0]["c2s_raw"].encode()
        assert bad.handshake(line) == b""  # closed without a reply
        s.capture.wait_for(r"WARN  tunnelHandshake: access denied: 127\.0\.0\.1:\d+")
        good = GoClient(tport, b"secret")
        try:
            assert good.handshake() != b""
        finally:
            good.close()


def test_garbage_on_control_and_pool_port_and_bad_signals():
    """Go's rules (auth=0): bad control lines are skipped; an authenticated tunnel rejects them
    instead (test_auth_attacks)."""
    tport, uport = free_port(), free_port()
    echo = EchoPair()
    server_url, client_url = tunnel_urls("rev", "1", tport, uport, echo.port, extra_server="&auth=0",
                                         extra_client="&auth=0")
    try:
        with in_process(server_url, service_cooldown="200ms", handshake_timeout="1s") as s:
            # garbage before any handshake: denied, the server keeps listening
            for junk in (os.urandom(300) + b"\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 10):
                g = socket.create_connection(("127.0.0.1", tport))
                g.sendall(junk)
                g.settimeout(5)
                assert recv_all(g) == b""
                g.close()
            s.capture.wait_for("access denied")
            s.capture.wait_for(r"WARN  tunnelHandshake: handshake timeout: 127\.0\.0\.1:\d+")
            with in_process(client_url) as c:
                wait_pool(lambda: s.core.pool.active, 2)
                # garbage on the pool port (same IP as the client): TLS handshake fails, dropped
                g = socket.create_connection(("127.0.0.1", tport))
                g.sendall(os.urandom(4000))
                g.settimeout(5)
                try:
                    recv_all(g)
                except OSError:
                    pass
                g.close()
                # garbage signal lines from the peer: logged and skipped, the tunnel stays
                ctl = c.core.control
                ctl.sendall(b"!!!! not base64 !!!!\n")
                ctl.sendall(encode_line(b"\x00\x01garbage", b"secret"))
                ctl.sendall(encode_line("np://x/y#z", b"secret"))
                ctl.sendall(b"A" * 70000 + b"\n")
                s.capture.wait_for(r"ERROR  Control signal skipped: undecodable control line")
                s.capture.wait_for(r"ERROR  Control signal skipped: control line over 65536 bytes")
                n = s.capture.count("CHECK_POINT")
                s.capture.wait_for("CHECK_POINT")
                gevent.sleep(1.5)
                assert s.capture.count("CHECK_POINT") > n  # pings still flow
                assert s.capture.count("Server error") == 0
                from helpers import echo_roundtrip

                assert echo_roundtrip(uport, b"still works") == b"still works"
    finally:
        echo.close()


# -- npgevent client, Go server --------------------------------------------------------------


def test_client_with_go_server_replays_capture():
    vec = load_vector("rev_tls0_key-secret")
    control = vec["connections"][0]
    ids = [c["s2c_hex_head"][:8] for c in vec["connections"][1:]]
    upstream = EchoAfterE()
    go = GoServer(b"secret", "np://0@4/-#0", ids=list(ids))
    try:
        with in_process("client://secret@127.0.0.1:%d/127.0.0.1:%d?min=2&mode=2" % (go.port, upstream.port)) as c:
            go.wait_pool(2)
            # npgevent's hello decodes to the key under Go's rules (the \r is ignored)
            assert decode_line(go.hello_lines[0], b"secret") == b"secret"
            assert go.hello_lines[0] == b"AAAAAAAA\r\n"
            assert c.core.npg == 0  # the Go server offered no extension
            # replay the captured launch line byte for byte
            launch_line = control["s2c_raw"].split("\n")[3].encode() + b"\n"
            assert decode_line(launch_line, b"secret") == b"np://127.0.0.1:54276/15569b6d#1"
            pool = go.pool[ids[0]]
            go.control.send_raw(launch_line)
            pool.sendall(bytes.fromhex(vec["connections"][1]["s2c_hex_head"])[4:])
            expect = bytes.fromhex(vec["connections"][1]["c2s_hex_head"])
            assert recv_exact(pool, len(expect)) == expect  # "hello-through-tunnel"
            c.capture.wait_for(r"EVENT  CHECK_POINT\|MODE=2\|")
    finally:
        go.close()
        upstream.close()


def test_client_forward_with_go_server_default_key():
    echo = EchoPair()
    uport = free_port()
    go = GoServer(b"", "np://0@4/+#0")
    go.key = fnv1a32_hex(str(go.port)).encode()  # Go's default key for this port
    try:
        with in_process("client://127.0.0.1:%d/127.0.0.1:%d?min=2&mode=2" % (go.port, uport)) as c:
            go.wait_pool(2)
            assert c.core.flow == "+" and c.core.npg == 0
            user = connect_retry(uport)
            user.sendall(b"forward via go")
            launch = go.control.next_signal(Launch)
            assert launch.addr == "127.0.0.1:%d" % user.getsockname()[1]
            pool = go.pool[launch.cid]
            assert recv_exact(pool, 14) == b"forward via go"
            pool.sendall(b"answer")
            pool.shutdown(socket.SHUT_WR)
            assert user.recv(6) == b"answer"
            user.close()
            # UDP to a Go server goes raw on its pool connection
            u = udp_socket()
            u.sendto(b"dgram-1", ("127.0.0.1", uport))
            ulaunch = go.control.next_signal(Launch)
            assert ulaunch.udp
            assert recv_exact(go.pool[ulaunch.cid], 7) == b"dgram-1"
            u.close()
    finally:
        go.close()
        echo.close()


def test_client_same_length_wrong_key_fails_and_retries():
    vec = load_vector("wrongkey_samelen")
    go = GoServer(b"secret", "np://0@4/-#0")
    try:
        with in_process("client://SECRET@127.0.0.1:%d/127.0.0.1:9?mode=2" % go.port,
                        wait_running=False, service_cooldown="300ms") as c:
            c.capture.wait_for(r"ERROR  Client error: tunnel handshake: parse tunnel URL failed")
            c.capture.wait_for(r"INFO  Client restart: client://SECRET@")
            assert go.hello_lines[0].rstrip(b"\r\n") == vec["connections"][0]["c2s_raw"].encode().rstrip(b"\n")
    finally:
        go.close()


def test_client_dies_on_control_silence_and_restarts():
    go = GoServer(b"secret", "np://0@4/-#0")
    go.answer_pings = False
    try:
        with in_process("client://secret@127.0.0.1:%d/127.0.0.1:9?mode=2" % go.port, wait_running=False,
                        report_interval="300ms", service_cooldown="300ms") as c:
            c.capture.wait_for(r"ERROR  Client error: control connection silent for 0\.9s", timeout=10)
            c.capture.wait_for(r"INFO  Client restart: ")
    finally:
        go.close()


def test_client_flushes_when_named_ids_are_missing_and_on_peer_flush():
    go = GoServer(b"secret", "np://0@4/-#0")
    upstream = UdpEcho()
    try:
        url = "client://secret@127.0.0.1:%d/127.0.0.1:%d?min=2&mode=2&log=debug" % (go.port, upstream.port)
        with in_process(url, report_interval="500ms", pool_get_timeout="200ms") as c:
            first = go.wait_pool(2)
            # launches naming ids the client never had: pool errors
            for n in range(3):
                go.control.send("np://127.0.0.1:1/%08x#1" % (0xdead0000 + n))
            c.capture.wait_for(r"ERROR  TCP launch: pool connection dead0000 not found")
            go.control.next_signal(Flush, timeout=5)  # errors > idle/2: the client asks to flush
            # ...and dropped its idle connections: the server sees them close
            for cid in first:
                go.pool[cid].settimeout(5)
                assert go.pool[cid].recv(1) == b""
            refill = go.wait_pool(2)  # then refills
            assert not set(refill) & set(first)
            wait_pool(lambda: c.core.pool.active, 2)
            idle = set(c.core.pool.idle)
            # a flush from the peer empties the pool too
            go.control.send(Flush().encode())
            for cid in idle:
                go.pool[cid].settimeout(5)
                assert go.pool[cid].recv(1) == b""
            go.wait_pool(1)
    finally:
        go.close()
        upstream.close()


def test_go_server_reply_lines_parsed_from_all_vectors():
    from npgevent.protocol.handshake import read_reply

    for name in ("rev_tls0_key-secret", "fwd_tls0_defaultkey", "rev_tls0_udp", "rev_tls1_key-secret"):
        vec = load_vector(name)
        line = vec["connections"][0]["s2c_raw"].split("\n")[0].encode() + b"\n"
        reply = read_reply(line, vec["key"].encode())
        assert reply.encode() == vec["connections"][0]["s2c_decoded"][0]


def test_verify_signal_leaves_pool_connections_a_go_client_already_wrote_on():
    """Forward flow, tls=1: a Go client hands idle pool connections to users and writes on
    them before its launch signals arrive.  The server's verify signal must name a clean
    connection and leave those alone (it used to drop them all as unclean: sessions lost)."""
    echo = UdpEcho()
    tport = free_port()
    url = "server://secret@127.0.0.1:%d/127.0.0.1:%d?mode=2&tls=1&max=8" % (tport, echo.port)
    with in_process(url, report_interval="1s") as s:  # the verify tick: ~1 s after the handshake
        go = GoClient(tport, b"secret")
        try:
            assert go.handshake() == encode_line("np://0@8/+#1", b"secret")
            ids = go.open_pool(1, tls=True)  # the clean one is the oldest: the server looks at the newest first
            used = []
            for _ in range(4):  # each written on as soon as it is open, as a Go client's user does
                cid = go.open_pool(1, tls=True)[0]
                go.pool[cid].sendall(b"user datagram on " + cid.encode())
                used.append(cid)
            ids += used
            wait_pool(lambda: s.core.pool.active, 5)
            verify = go.control.next_signal(Verify, timeout=10)
            assert verify.cid == ids[0]
            for n, cid in enumerate(used):
                go.control.send(Launch(True, "127.0.0.1:%d" % (40000 + n), cid).encode())
            for cid in used:
                conn = go.pool[cid]
                conn.settimeout(5)
                assert conn.recv(100) == b"user datagram on " + cid.encode()
            assert s.capture.count("dead or unclean") == 0
        finally:
            go.close()
            echo.close()
