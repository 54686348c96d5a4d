"""connect_numeric (npgevent.net.sockopt): the dialer's and the pool's TCP connect."""

from __future__ import annotations

import time

import pytest
from gevent import socket

from npgevent.net import sockopt
from npgevent.net.sockopt import connect_numeric


def _listener():
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)
    return lst


def test_connects_and_leaves_no_timeout_behind():
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)
    sock = socket.socket()
    try:
        connect_numeric(sock, lst.getsockname(), 5.0)
        assert sock.getpeername() == lst.getsockname()
        assert sock.gettimeout() is None
        peer, _ = lst.accept()
        sock.sendall(b"ok")
        assert peer.recv(2) == b"ok"
        peer.close()
    finally:
        sock.close()
        lst.close()


def test_a_loopback_connect_never_waits_in_the_hub(monkeypatch):
    """On loopback the handshake completes inside connect(2): no wait, no timer, no switch."""
    lst = _listener()
    sock = socket.socket()

    def no_wait(*args):
        raise AssertionError("connect_numeric waited for a connection that was already up")

    monkeypatch.setattr(type(sock), "_wait", no_wait)
    try:
        for _ in range(20):  # not a lucky one
            connect_numeric(sock, lst.getsockname(), 5.0)
            peer, _ = lst.accept()
            peer.close()
            sock.close()
            sock = socket.socket()
    finally:
        sock.close()
        lst.close()


def test_a_connect_still_in_progress_is_waited_for(monkeypatch):
    """Where the handshake takes a round trip (any remote target), the wait path connects."""
    monkeypatch.setattr(sockopt, "established", lambda raw: False)
    lst = _listener()
    sock = socket.socket()
    try:
        connect_numeric(sock, lst.getsockname(), 5.0)
        assert sock.getpeername() == lst.getsockname()
        assert sock.gettimeout() is None
    finally:
        sock.close()
        lst.close()


def test_a_closed_port_is_refused():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    address = probe.getsockname()
    probe.close()  # nothing listens there now
    sock = socket.socket()
    try:
        with pytest.raises(ConnectionRefusedError):
            connect_numeric(sock, address, 5.0)
    finally:
        sock.close()


def test_a_connect_that_hangs_times_out_on_time(full_listener):
    """A listener whose accept queue is full drops new SYNs: the connect hangs."""
    sock = socket.socket()
    try:
        start = time.monotonic()
        with pytest.raises(socket.timeout):
            connect_numeric(sock, full_listener.getsockname(), 0.3)
        assert 0.25 <= time.monotonic() - start < 2.0
        assert sock.gettimeout() is None
    finally:
        sock.close()
