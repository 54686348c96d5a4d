"""The TCP relay's hub-callback path (npgevent.relay.tcphub), over real loopback sockets."""

from __future__ import annotations

import hashlib
import os
import socket as stdsocket
import struct

import gevent
import pytest
from gevent import socket

from npgevent.relay import runners, tcphub
from npgevent.relay.limit import RateLimiter
from npgevent.relay.tcp import relay

pytestmark = pytest.mark.timeout(60)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    near = socket.create_connection(lst.getsockname(), timeout=5)
    far, _ = lst.accept()
    lst.close()
    return near, far


@pytest.fixture
def pairs():
    """user_near (the user), user_far (relayed), target_near (relayed), target_far (the target)."""
    user_near, user_far = _tcp_pair()
    target_near, target_far = _tcp_pair()
    yield user_near, user_far, target_near, target_far
    for s in (user_near, user_far, target_near, target_far):
        s.close()


@pytest.fixture
def greenlet_jobs(monkeypatch):
    """How many times a direction moved to a greenlet."""
    calls = []
    real = runners.run

    def counting(fn, *args):
        calls.append(fn)
        return real(fn, *args)

    monkeypatch.setattr(runners, "run", counting)
    return calls


def _recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(out)
        out += chunk


def test_a_short_exchange_runs_in_the_hub_alone(pairs, greenlet_jobs):
    """Request, answer, half-close each way: all delivered, counted, and no greenlet taken."""
    user_near, user_far, target_near, target_far = pairs
    acct = [0] * 4
    g = gevent.spawn(relay, user_far, target_near, acct, 0, 1)
    user_near.sendall(b"q" * 64)
    assert target_far.recv(100) == b"q" * 64
    target_far.sendall(b"a" * 100)
    assert user_near.recv(200) == b"a" * 100
    user_near.shutdown(socket.SHUT_WR)
    assert target_far.recv(10) == b""  # the user's end reached the target
    target_far.sendall(b"late")  # the other direction still carries data after a half-close
    assert user_near.recv(10) == b"late"
    target_far.shutdown(socket.SHUT_WR)
    assert user_near.recv(10) == b""
    assert g.get(timeout=5) == "EOF"
    assert acct[1] == 64 and acct[0] == 104
    assert greenlet_jobs == []
    assert not user_far._read_event.active and not target_near._read_event.active


def test_bulk_moves_to_a_greenlet_and_arrives_whole(pairs, greenlet_jobs):
    user_near, user_far, target_near, target_far = pairs
    acct = [0] * 4
    payload = os.urandom(8 << 20)
    g = gevent.spawn(relay, user_far, target_near, acct, 0, 1)

    def send() -> None:
        user_near.sendall(payload)
        user_near.shutdown(socket.SHUT_WR)

    sender = gevent.spawn(send)
    got = _recv_all(target_far)
    sender.get(timeout=10)
    target_far.shutdown(socket.SHUT_WR)
    assert g.get(timeout=10) == "EOF"
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert acct[1] == len(payload)
    assert len(greenlet_jobs) == 1


def test_a_write_that_does_not_go_out_whole_finishes_in_a_greenlet(pairs, greenlet_jobs):
    """Small chunks into a target that reads nothing for a while: the relay's write comes up
    short once the send buffer is full, and the rest must not be lost or reordered."""
    user_near, user_far, target_near, target_far = pairs
    target_near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    acct = [0] * 4
    # reads of 1 MiB: a read never fills the chunk here, so only a short write moves it
    g = gevent.spawn(relay, user_far, target_near, acct, 0, 1, bufsize=1 << 20)
    blocks = [bytes([i % 251]) * 1000 for i in range(3000)]

    def send() -> None:
        for block in blocks:
            user_near.sendall(block)
            gevent.sleep(0)  # one block per read of the relay, never a full chunk
        user_near.shutdown(socket.SHUT_WR)

    sender = gevent.spawn(send)
    gevent.sleep(0.3)  # the target reads nothing yet
    got = _recv_all(target_far)
    sender.get(timeout=10)
    target_far.shutdown(socket.SHUT_WR)
    assert g.get(timeout=10) == "EOF"
    assert got == b"".join(blocks)
    assert greenlet_jobs, "the relay never had to wait for a writable target"


def test_a_reset_on_one_side_ends_both_directions(pairs):
    user_near, user_far, target_near, target_far = pairs
    acct = [0] * 4
    g = gevent.spawn(relay, user_far, target_near, acct, 0, 1)
    user_near.sendall(b"x" * 10)
    assert target_far.recv(10) == b"x" * 10
    target_far.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    target_far.close()  # RST
    reason = g.get(timeout=5)
    assert "reset" in reason.lower()
    assert not user_far._read_event.active and not target_near._read_event.active


def test_a_killed_relay_leaves_nothing_running(pairs, greenlet_jobs):
    """Stopping an instance kills its sessions: no callback or greenlet may touch the
    sockets after the kill returned (the caller closes them)."""
    user_near, user_far, target_near, _target_far = pairs
    acct = [0] * 4
    target_near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    g = gevent.spawn(relay, user_far, target_near, acct, 0, 1)
    user_near.sendall(b"y" * 200_000)  # more than the target's buffers: one direction waits
    gevent.sleep(0.2)
    assert greenlet_jobs
    g.kill(timeout=5)
    assert g.dead
    assert not user_far._read_event.active and not target_near._read_event.active
    assert not target_near._write_event.active
    user_far.close()
    target_near.close()
    gevent.sleep(0.05)  # nothing left to fail on the closed sockets


@pytest.mark.parametrize("kwargs", [{"idle": 5.0}, {"limiter": RateLimiter(1 << 30)}])
def test_idle_timeouts_and_rate_limits_keep_the_greenlet_relay(pairs, greenlet_jobs, kwargs):
    user_near, user_far, target_near, target_far = pairs
    assert not tcphub.usable(user_far, target_near, kwargs.get("limiter"), kwargs.get("idle", 0.0))
    acct = [0] * 4
    g = gevent.spawn(relay, user_far, target_near, acct, 0, 1, **kwargs)
    user_near.sendall(b"z")
    assert target_far.recv(1) == b"z"
    user_near.shutdown(socket.SHUT_WR)
    target_far.shutdown(socket.SHUT_WR)
    assert g.get(timeout=5) == "EOF"
    assert greenlet_jobs  # the greenlet relay runs its reverse direction on a worker


def test_a_socket_closed_under_the_relay_ends_the_session(pairs):
    """Another greenlet closing a relayed socket (gevent cancels the waits on it) ends the
    session with an error, as it does a waiting greenlet: the relay must not wait for ever."""
    _user_near, user_far, target_near, _target_far = pairs
    acct = [0] * 4
    g = gevent.spawn(relay, user_far, target_near, acct, 0, 1)
    gevent.sleep(0.05)
    target_near.close()
    reason = g.get(timeout=5)
    assert reason != "EOF"
    assert not user_far._read_event.active
