"""A framed session that no greenlet waits for (npgevent.relay.framedsession) against a pool
peer that sends anything: valid frames, headers of no frame, lengths it never fills, data
after its terminal, resets, and a user that talks, half-closes, resets or goes away.

Whatever the peer does, the session ends exactly once, nothing is reported to the hub as
an error, no watcher is left running, and the pool connection is offered for reuse only
after the peer's well-formed terminal with nothing malformed before it.  Seeded; a longer
run is marked ``slow``.
"""

from __future__ import annotations

import random
import socket as stdsocket
import struct

import gevent
import gevent.event
import pytest
from gevent import socket
from helpers import NowaitStream, tcp_pair

from npgevent.protocol.sessionframe import ABORT_FRAME, EOF_FRAME, data_frame
from npgevent.relay import framed
from npgevent.relay.framedsession import FramedSession
from npgevent.relay.runners import Sessions

pytestmark = pytest.mark.timeout(300)


def _rst(sock: socket.socket) -> None:
    sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _drain(sock: socket.socket) -> None:
    """Read and drop what arrives until the socket ends or fails."""
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


# what the hostile peer may do, one step at a time; the last step always ends its side
MIDDLE = ["data", "data", "bigdata", "pause", "split"]
ENDINGS = ["eof", "abort", "garbage", "huge-then-close", "partial-header", "close", "rst",
           "eof-then-data"]
WELL_FORMED = {"eof", "abort"}  # a terminal with nothing malformed after it


def _peer(sock: socket.socket, rng: random.Random, steps: list[str]) -> None:
    try:
        for step in steps:
            if step == "data":
                sock.sendall(data_frame(rng.randbytes(rng.randint(1, 3000))))
            elif step == "bigdata":
                sock.sendall(data_frame(rng.randbytes(rng.randint(60_000, 200_000))))
            elif step == "pause":
                gevent.sleep(rng.choice([0, 0.005, 0.02]))
            elif step == "split":  # one frame in two writes, cut inside its header
                frame = data_frame(rng.randbytes(rng.randint(1, 500)))
                cut = rng.randint(1, 3)
                sock.sendall(frame[:cut])
                gevent.sleep(0.005)
                sock.sendall(frame[cut:])
            elif step == "eof":
                sock.sendall(EOF_FRAME)
            elif step == "abort":
                sock.sendall(ABORT_FRAME)
            elif step == "garbage":
                sock.sendall(bytes([rng.randint(3, 255)]) + rng.randbytes(rng.randint(3, 40)))
            elif step == "huge-then-close":  # a length it never fills
                sock.sendall(b"\x00\xff\xff\xff" + rng.randbytes(100))
                sock.close()
            elif step == "partial-header":
                sock.sendall(b"\x00\x00")
                sock.close()
            elif step == "close":
                sock.close()
            elif step == "rst":
                _rst(sock)
            elif step == "eof-then-data":  # the next session's bytes, as a reused connection has
                sock.sendall(EOF_FRAME + data_frame(b"next"))
        _drain(sock)  # our side's frames, until the session's end closes nothing: we stop below
    except OSError:
        pass


def _user(sock: socket.socket, rng: random.Random) -> None:
    try:
        for _ in range(rng.randint(0, 3)):
            sock.sendall(rng.randbytes(rng.randint(1, rng.choice([100, 100_000]))))
            gevent.sleep(rng.choice([0, 0.005]))
        how = rng.choice(["half-close", "half-close", "close", "rst", "read-only"])
        if how == "half-close":
            sock.shutdown(socket.SHUT_WR)
        elif how == "close":
            sock.close()
            return
        elif how == "rst":
            _rst(sock)
            return
        _drain(sock)
        sock.close()
    except OSError:
        pass


def _one(seed: int) -> bool:
    """One hostile session; whether its connection was offered for reuse."""
    rng = random.Random(seed)
    steps = [rng.choice(MIDDLE) for _ in range(rng.randint(0, 4))] + [rng.choice(ENDINGS)]
    pool_near, pool_far = tcp_pair()
    user, local = tcp_pair()
    for s in (pool_near, pool_far, user, local):
        s.settimeout(None)
    ends: list[tuple[str, bytes | None]] = []
    ended = gevent.event.Event()
    owner = Sessions()
    started = gevent.event.Event()

    def end(reason: str, leftover: bytes | None) -> None:
        ends.append((reason, leftover))
        ended.set()

    def start() -> None:
        FramedSession(NowaitStream(pool_near), local, [0, 0], 0, 1, 16384, end).start(owner)
        started.set()

    gevent.get_hub().loop.run_callback(start)
    started.wait(5)
    helpers = [gevent.spawn(_peer, pool_far, rng, steps), gevent.spawn(_user, user, rng)]
    try:
        assert ended.wait(10), (seed, steps)
        gevent.sleep(0)
        assert len(ends) == 1, (seed, steps, ends)
        assert len(owner) == 0, (seed, steps)
        assert not local._read_event.active and not pool_near._read_event.active, (seed, steps)
        reason, leftover = ends[0]
        if leftover is not None:  # offered for reuse: only after the peer's clean terminal
            assert steps[-1] in WELL_FORMED or steps[-1] == "eof-then-data", (seed, steps, reason)
            assert leftover in (b"", data_frame(b"next")), (seed, steps, leftover)
        else:
            assert reason, (seed, steps)
        return leftover is not None
    finally:
        for s in (pool_near, pool_far, user, local):
            s.close()
        gevent.killall(helpers, timeout=5)


@pytest.fixture
def quiet_hub(monkeypatch):
    """Fail on anything reported to the hub as an error (a callback or job that raised)."""
    errors: list = []
    hub = gevent.get_hub()
    monkeypatch.setattr(hub, "handle_error", lambda *args: errors.append(args))
    monkeypatch.setattr(framed, "DRAIN", 0.3)  # a peer that never answers our ABORT
    yield errors
    assert errors == []


def test_a_hostile_pool_peer_never_breaks_a_detached_session(quiet_hub):
    reused = [_one(seed) for seed in range(60)]
    assert any(reused) and not all(reused)  # both outcomes were reached


@pytest.mark.slow
def test_a_hostile_pool_peer_never_breaks_a_detached_session_long(quiet_hub):
    reused = [_one(seed) for seed in range(60, 2060)]
    assert any(reused) and not all(reused)
