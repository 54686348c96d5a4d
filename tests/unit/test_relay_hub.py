"""The TCP relay's hub-callback path (npgevent.relay.tcphub), over real loopback sockets."""

from __future__ import annotations

import hashlib
import os
import socket as stdsocket
import struct

import gevent
import pytest
from gevent import socket
from helpers import recv_all, tcp_pair, track_instances, upload

from npgevent.relay import runners, tcphub
from npgevent.relay.limit import RateLimiter
from npgevent.relay.tcp import relay

pytestmark = pytest.mark.timeout(60)


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
    got = upload(user_near, target_far, payload)
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
    got = recv_all(target_far)
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


def _session_with(rng, user_near, user_far, target_near, target_far, reset: bool):
    """One randomised session: sizes, write pieces, buffer sizes and which side ends first."""
    if rng.random() < 0.5:
        target_near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    if rng.random() < 0.5:
        user_far.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    up = os.urandom(rng.choice([0, 1, 64, 5000, 70_000, 300_000]))
    down = os.urandom(rng.choice([0, 1, 64, 5000, 70_000, 300_000]))
    acct = [0] * 4
    g = gevent.spawn(relay, user_far, target_near, acct, 0, 1, bufsize=rng.choice([4096, 16384]))

    def writer(sock, data, piece):
        piece = max(piece, len(data) // 500)  # at most ~500 writes: one-byte writes of small data only
        for off in range(0, len(data), piece):
            sock.sendall(data[off:off + piece])
            if rng.random() < 0.3:
                gevent.sleep(0)
        if reset:
            return
        sock.shutdown(socket.SHUT_WR)

    writers = [gevent.spawn(writer, user_near, up, rng.choice([1, 100, 4096, 65536])),
               gevent.spawn(writer, target_far, down, rng.choice([1, 100, 4096, 65536]))]
    if reset:
        # the user keeps reading (a relay blocked on a user who reads nothing waits for that
        # user, as any TCP proxy does), and the target resets mid-transfer
        drain = gevent.spawn(recv_all, user_near)
        gevent.sleep(rng.random() * 0.02)
        target_far.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
        gevent.killall(writers)
        target_far.close()
        reason = g.get(timeout=20)
        drain.kill()
        return reason, None, None, up, down, acct
    readers = [gevent.spawn(recv_all, target_far), gevent.spawn(recv_all, user_near)]
    gevent.joinall(writers + readers, timeout=20, raise_error=True)
    return g.get(timeout=20), readers[0].value, readers[1].value, up, down, acct


def test_randomised_sessions_deliver_every_byte_or_end_on_a_reset():
    """Sixty concurrent sessions in groups: sizes from nothing to bulk, writes from one byte to
    64 KiB, small send buffers (short writes) and resets.  Every clean session delivers both
    directions whole and in order; a reset session ends; nothing stays behind."""
    import random

    rng = random.Random(1234)
    for _group in range(3):
        jobs, socks = [], []
        for i in range(20):
            user_near, user_far = tcp_pair()
            target_near, target_far = tcp_pair()
            socks += [user_near, user_far, target_near, target_far]
            jobs.append(gevent.spawn(_session_with, rng, user_near, user_far, target_near, target_far,
                                     reset=(i % 7 == 3)))
        gevent.joinall(jobs, timeout=40, raise_error=True)
        for i, job in enumerate(jobs):
            reason, got_up, got_down, up, down, acct = job.value
            if i % 7 == 3:
                continue  # ended, which is all a reset promises (data may be cut)
            assert reason == "EOF"
            assert got_up == up and got_down == down
            assert acct[1] == len(up) and acct[0] == len(down)
        for s in socks:
            if s._read_event is not None:  # (the reset sessions' targets are closed already)
                assert not s._read_event.active and not s._write_event.active
            s.close()
    assert runners.parked() <= runners.KEEP


def test_a_finished_relay_is_freed_at_once(pairs, monkeypatch):
    """No reference cycle outlives a session: its objects go with their last reference, not
    at the garbage collector's next pass (thousands of sessions a second)."""
    import gc

    made = track_instances(monkeypatch, tcphub._HubRelay)
    user_near, user_far, target_near, target_far = pairs
    gc.disable()
    try:
        g = gevent.spawn(relay, user_far, target_near, [0] * 4, 0, 1)
        user_near.sendall(b"q")
        assert target_far.recv(1) == b"q"
        user_near.shutdown(socket.SHUT_WR)
        target_far.shutdown(socket.SHUT_WR)
        assert g.get(timeout=5) == "EOF"
        gevent.sleep(0.01)  # let the hub drop what it held for the callbacks
        assert made and made[0]() is None
    finally:
        gc.enable()


def test_a_user_flooding_a_target_that_reads_nothing_is_held_back(pairs):
    """An attacker sends as fast as they can into a session whose target never reads: the relay
    reads no more than the kernel's buffers let it pass on (plus one chunk) and then waits;
    nothing piles up in the process."""
    user_near, user_far, target_near, target_far = pairs
    acct = [0] * 4
    g = gevent.spawn(relay, user_far, target_near, acct, 0, 1)
    block = b"z" * 65536

    def flood() -> None:
        while True:
            user_near.sendall(block)

    attacker = gevent.spawn(flood)
    gevent.sleep(1.0)
    held = acct[1]
    gevent.sleep(0.5)
    assert acct[1] == held, "the relay kept reading from a user its target does not drain"
    buffered = sum(s.getsockopt(socket.SOL_SOCKET, opt) for s, opt in (
        (target_near, socket.SO_SNDBUF), (target_far, socket.SO_RCVBUF)))
    assert held <= buffered + 16384 + (1 << 20), (held, buffered)  # kernel buffers, one chunk, slack
    attacker.kill()
    g.kill(timeout=5)
