"""Readers stop at the read that would fail (npgevent.relay.hubread, npgevent.relay.udplistener).

A read that finds nothing costs a syscall and an exception (~2.5 us); a UDP round trip through
a tunnel used to make four of them.  The UDP listener and the hub readers now stop where they
can tell that nothing is left: a short read of a stream, or no other datagram queued
(``FIONREAD``).  The tests count the reads (``sys.setprofile`` sees every call of the socket
method) and check that nothing is lost on the way, an empty datagram included.
"""

from __future__ import annotations

import sys
from typing import Any

import gevent
import pytest
from gevent import socket

from npgevent.net.sockopt import has_input
from npgevent.relay.hubread import HubReader
from npgevent.relay.udplistener import UdpListener

pytestmark = pytest.mark.timeout(30)


class Calls:
    """Counts the calls of C methods named *name* while active (all greenlets of the thread)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and getattr(arg, "__name__", "") == self.name:
            self.count += 1

    def __enter__(self) -> Calls:
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)


def _udp_pair() -> tuple[socket.socket, socket.socket]:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    a.connect(b.getsockname())
    b.connect(a.getsockname())
    return a, b


def test_has_input_sees_the_next_datagram():
    a, b = _udp_pair()
    try:
        def waiting() -> bool:
            return has_input(a.fileno())

        assert not waiting()
        b.send(b"one")
        assert waiting()
        assert a.recv(100) == b"one"
        assert not waiting()
        b.send(b"")  # an empty datagram reads as none: the level-triggered watcher brings it
        assert not waiting()
        assert a.recv(100) == b""
    finally:
        a.close()
        b.close()
    c, d = socket.socketpair()  # a stream: the bytes queued
    try:
        assert not has_input(c.fileno())
        d.sendall(b"xyz")
        assert has_input(c.fileno())
        assert c.recv(100) == b"xyz"
        assert not has_input(c.fileno())
    finally:
        c.close()
        d.close()


def _read_round(listener: UdpListener) -> list[bytes]:
    out = []
    while (got := listener.do_read()) is not None:
        out.append(got[0])
    return out


def test_the_udp_listener_reads_a_burst_without_a_failing_read():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener = UdpListener(sock, lambda data, addr: None)
    try:
        for data in (b"a", b"b", b"c"):
            sender.sendto(data, sock.getsockname())
        with Calls("recvfrom") as reads:
            assert _read_round(listener) == [b"a", b"b", b"c"]
        assert reads.count == 3  # gevent's loop would read a fourth time, and fail

        # an empty datagram next in line ends the round early; nothing is lost
        for data in (b"x", b"", b"y"):
            sender.sendto(data, sock.getsockname())
        assert _read_round(listener) == [b"x"]
        assert _read_round(listener) == [b"", b"y"]
        assert _read_round(listener) == []  # the socket is empty: a read that fails, once
    finally:
        sender.close()
        sock.close()


class _CountingListener(UdpListener):
    reads = 0

    def do_read(self) -> Any:
        self.reads += 1
        return super().do_read()


def test_the_udp_listener_callback_reads_handles_and_stops_at_the_last_datagram():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    got: list[bytes] = []
    listener = _CountingListener(sock, lambda data, addr: got.append(data))
    listener.start()
    try:
        with Calls("recvfrom") as syscalls:
            for data in (b"a", b"b", b"c"):
                sender.sendto(data, sock.getsockname())
            gevent.sleep(0.05)
        assert got == [b"a", b"b", b"c"]
        # one read per datagram: gevent's loop asks do_read once more after the last one
        assert listener.reads == 3
        assert syscalls.count == 3
    finally:
        listener.close()
        sender.close()


def test_a_failing_handler_is_reported_and_the_udp_listener_reads_on():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    got: list[bytes] = []
    reported: list[Any] = []

    def handle(data: bytes, addr: Any) -> None:
        if data == b"bad":
            raise ValueError("a bug")
        got.append(data)

    listener = UdpListener(sock, handle)
    hub = gevent.get_hub()
    listener.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(hub, "handle_error", lambda *args: reported.append(args))
            for data in (b"one", b"bad", b"two"):
                sender.sendto(data, sock.getsockname())
            gevent.sleep(0.05)
            sender.sendto(b"three", sock.getsockname())
            gevent.sleep(0.05)
        assert got == [b"one", b"two", b"three"]
        assert len(reported) == 1 and reported[0][1] is ValueError
        assert listener.started
    finally:
        listener.close()
        sender.close()


def _serve(reader: HubReader) -> gevent.Greenlet:
    glet = gevent.spawn(reader.serve)
    gevent.sleep(0)
    return glet


def test_a_hub_reader_stops_at_a_short_stream_read():
    a, b = socket.socketpair()
    got: list[bytes] = []
    glet = None
    try:
        with Calls("recv") as reads:
            glet = _serve(HubReader(a, got.append, 65536))
            for chunk in (b"1" * 10, b"2" * 300, b"3" * 5000):
                b.sendall(chunk)
                gevent.sleep(0.02)
            b.close()
            glet.join(timeout=5)
        assert glet.successful()
        assert b"".join(got) == b"1" * 10 + b"2" * 300 + b"3" * 5000
        assert reads.count == 4  # three chunks and the end; not a failing read after each chunk
    finally:
        if glet is not None:
            glet.kill()
        a.close()
        b.close()


def test_a_hub_reader_of_datagrams_reads_each_once_and_keeps_an_empty_one():
    a, b = _udp_pair()
    got: list[bytes] = []
    glet = None
    try:
        with Calls("recv") as reads:
            glet = _serve(HubReader(a, got.append, 65535, datagrams=True))
            for data in (b"p", b"q"):
                b.send(data)
                gevent.sleep(0.02)
            for data in (b"r", b"", b"s"):  # a burst with an empty datagram inside
                b.send(data)
            gevent.sleep(0.05)
            glet.kill()
        assert got == [b"p", b"q", b"r", b"", b"s"]
        assert reads.count == 5
    finally:
        if glet is not None:
            glet.kill()
        a.close()
        b.close()
