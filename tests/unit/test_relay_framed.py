"""A TCP session on a reusable pool connection (npgevent.relay.framed) and the pool's side of
reuse (lend, finish), over real loopback sockets.  The peer end of the pool connection is
scripted here: it writes frames and reads what the relay writes.  Each session runs three
ways: ``relay_framed`` in greenlets, ``relay_framed`` starting in hub callbacks, and a
:class:`~npgevent.relay.framedsession.FramedSession` that no greenlet waits for."""

from __future__ import annotations

import random
import socket as stdsocket
import struct

import gevent
import gevent.event
import pytest
from gevent import socket
from helpers import NowaitStream, read_frames, tcp_pair, track_instances

from npgevent.log import InstanceLog
from npgevent.pool.base import Adaptive
from npgevent.pool.tcp import ClientPool, IdlePool, PoolConn
from npgevent.protocol.sessionframe import (
    ABORT,
    ABORT_FRAME,
    EOF,
    EOF_FRAME,
    FrameReader,
    data_frame,
)
from npgevent.relay import framed
from npgevent.relay.framed import relay_framed
from npgevent.relay.framedsession import FramedSession

pytestmark = pytest.mark.timeout(30)


class Peer:
    """The far end of a pool connection, speaking frames by hand."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader(4096)

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def read_session(self, timeout: float = 5.0) -> tuple[bytes, int]:
        """The relay's data up to its terminal frame, and which terminal it was."""
        with gevent.Timeout(timeout):
            return read_frames(self.sock, self.reader)


def _rst(sock: socket.socket) -> None:
    sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class DetachedStream(NowaitStream):
    """The same stream; :func:`_run` starts a :class:`FramedSession` on it."""


class Detached:
    """A :class:`FramedSession` started from a hub callback, as a tunnel's accept starts one,
    seen through what the tests use of a greenlet running ``relay_framed``."""

    def __init__(self, pool_sock, local) -> None:
        self.acct = [0, 0]
        self.result = gevent.event.AsyncResult()
        self.ended_in: list = []
        started = gevent.event.Event()

        def end(reason: str, leftover: bytes | None) -> None:
            self.ended_in.append(gevent.getcurrent())
            self.result.set((reason, leftover))

        def start() -> None:
            self.session = FramedSession(pool_sock, local, self.acct, 0, 1, 16384, end)
            self.session.start()
            started.set()

        gevent.get_hub().loop.run_callback(start)
        started.wait(5)

    def get(self, timeout: float | None = None):
        return self.result.get(timeout=timeout)

    def ready(self) -> bool:
        return self.result.ready()

    def kill(self, block: bool = True, timeout: float | None = None) -> None:
        self.session.kill(block=False)
        if block:
            self.session.join(timeout)

    @property
    def dead(self) -> bool:
        return self.session.dead


@pytest.fixture(params=["greenlets", "hub", "detached"])
def ends(request):
    pool_near, pool_far = tcp_pair()  # the relay's pool stream / the scripted peer
    local_near, local_far = tcp_pair()  # the user (or target) / the relay's local socket
    for s in (pool_near, pool_far, local_near, local_far):
        s.settimeout(None)
    kind = {"greenlets": lambda s: s, "hub": NowaitStream, "detached": DetachedStream}[request.param]
    yield Peer(pool_far), kind(pool_near), local_near, local_far
    for s in (pool_near, pool_far, local_near, local_far):
        s.close()


def _run(pool_sock, local_far, **kw):
    if type(pool_sock) is DetachedStream and not kw:  # no idle timeout, no rate limit
        return Detached(pool_sock, local_far)
    acct = [0, 0]
    g = gevent.spawn(relay_framed, pool_sock, local_far, acct, 0, 1, **kw)
    g.acct = acct
    return g


def test_a_session_both_ways_then_the_connection_is_clean_with_the_next_sessions_bytes(ends):
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    peer.send(data_frame(b"request"))
    assert user.recv(100) == b"request"
    user.sendall(b"response" * 1000)
    user.shutdown(socket.SHUT_WR)
    data, kind = peer.read_session()
    assert (data, kind) == (b"response" * 1000, EOF)
    peer.send(data_frame(b"tail"), EOF_FRAME, data_frame(b"next session"))
    reason, leftover = g.get(timeout=5)
    assert reason == "EOF"
    assert leftover == b"\x00\x00\x00\x0cnext session"  # the next session's frame, kept
    assert user.recv(100) == b"tail" and user.recv(100) == b""  # the peer's EOF: a half-close
    assert g.acct == [8000, 11]  # read from the local socket, written to it


def test_half_close_the_other_direction_goes_on_until_it_ends(ends):
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    peer.send(data_frame(b"question"), EOF_FRAME)  # the peer is done sending
    assert user.recv(100) == b"question" and user.recv(100) == b""
    gevent.sleep(0.1)
    assert not g.ready()
    user.sendall(b"late answer")
    user.close()
    assert peer.read_session() == (b"late answer", EOF)
    assert g.get(timeout=5) == ("EOF", b"")


def test_a_local_reset_aborts_and_what_the_peer_still_sends_is_dropped(ends):
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    peer.send(data_frame(b"first"))
    assert user.recv(100) == b"first"
    _rst(user)
    assert peer.read_session() == (b"", ABORT)
    peer.send(data_frame(b"x" * 50000), EOF_FRAME)  # sent before the peer saw the abort
    reason, leftover = g.get(timeout=5)
    assert leftover == b"", reason  # reusable: both terminals went
    assert "reset" in reason.lower()
    assert g.acct[1] == 5  # nothing of the dropped bytes was counted as delivered


def test_the_peers_abort_closes_the_local_socket_and_is_answered(ends):
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    user.sendall(b"upload")
    peer.send(ABORT_FRAME)
    user.settimeout(5)
    assert user.recv(100) == b""  # the local side sees the end at once
    data, kind = peer.read_session()
    assert data in (b"", b"upload") and kind in (EOF, ABORT)
    reason, leftover = g.get(timeout=5)
    assert leftover == b"" and "aborted" in reason


def test_a_peer_that_never_answers_an_abort_leaves_the_connection_unusable(ends, monkeypatch):
    monkeypatch.setattr(framed, "DRAIN", 0.3)
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    _rst(user)
    assert peer.read_session() == (b"", ABORT)
    reason, leftover = g.get(timeout=5)  # no terminal from the peer: DRAIN
    assert leftover is None and "no terminal frame" in reason


@pytest.mark.parametrize("garbage", [b"\x07\x00\x00\x00", b"\x00\x00\x00\x00", b"\x01\x00\x00\x09"])
def test_a_malformed_frame_leaves_the_connection_unusable(ends, garbage):
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    peer.send(data_frame(b"ok"), garbage)
    reason, leftover = g.get(timeout=5)
    assert leftover is None and "frame" in reason
    assert user.recv(100) == b"ok"


def test_the_pool_connection_closing_mid_session_leaves_it_unusable(ends):
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    peer.send(data_frame(b"partial"))
    assert user.recv(100) == b"partial"
    peer.sock.close()
    reason, leftover = g.get(timeout=5)
    assert leftover is None and "closed" in reason


def test_an_idle_session_ends_with_an_abort_and_stays_reusable(ends):
    peer, pool_sock, _user, local = ends
    g = _run(pool_sock, local, idle=0.3)
    assert peer.read_session() == (b"", ABORT)
    peer.send(EOF_FRAME)
    reason, leftover = g.get(timeout=5)
    assert (reason, leftover) == ("idle timeout", b"")
    assert pool_sock.gettimeout() is None  # back in the pool without the session's timeout


def test_the_peers_abort_stops_reading_a_local_sender_that_never_stops(ends):
    """The target streams forever (a download the user gave up): after the peer's ABORT the
    relay must stop reading it, send its terminal and end, not keep relaying what the
    socket still delivers after its shutdown."""
    peer, pool_sock, target, local = ends
    stop = gevent.event.Event()

    def stream_forever() -> None:
        try:
            while not stop.is_set():
                target.sendall(b"s" * 65536)
        except OSError:
            pass

    source = gevent.spawn(stream_forever)
    g = _run(pool_sock, local)
    try:
        gevent.sleep(0.1)
        peer.send(ABORT_FRAME)
        data, kind = peer.read_session(timeout=5)  # drains what was on its way
        assert kind in (EOF, ABORT) and len(data) > 0
        reason, leftover = g.get(timeout=5)
        assert leftover == b"" and "aborted" in reason
    finally:
        stop.set()
        source.kill()


def test_a_local_write_failing_after_our_eof_gives_the_connection_up(ends):
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    user.sendall(b"request")
    user.shutdown(socket.SHUT_WR)
    assert peer.read_session() == (b"request", EOF)  # our EOF is out
    _rst(user)  # and now the user is gone
    gevent.sleep(0.05)
    for _ in range(40):  # the peer still streams: it can't be told to stop any more
        if g.ready():
            break
        try:
            peer.send(data_frame(b"z" * 60000))
        except OSError:
            break
    reason, leftover = g.get(timeout=5)
    assert leftover is None, reason


def test_local_writes_that_fail_abort_the_session(ends):
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    _rst(user)
    gevent.sleep(0.05)
    peer.send(*[data_frame(b"y" * 60000)] * 20)  # into a reset socket
    assert peer.read_session()[1] == ABORT
    peer.send(EOF_FRAME)
    assert g.get(timeout=5)[1] == b""


@pytest.fixture(params=["hub", "detached"])
def hub_ends(request):
    yield from _hub_ends(NowaitStream if request.param == "hub" else DetachedStream)


@pytest.fixture
def detached_ends():
    yield from _hub_ends(DetachedStream)


def _hub_ends(kind):
    pool_near, pool_far = tcp_pair()
    local_near, local_far = tcp_pair()
    for s in (pool_near, pool_far, local_near, local_far):
        s.settimeout(None)
    yield Peer(pool_far), kind(pool_near), local_near, local_far
    for s in (pool_near, pool_far, local_near, local_far):
        s.close()


def test_hub_a_request_and_response_runs_in_hub_callbacks_alone(hub_ends, greenlet_jobs):
    """The whole short session in the hub: no worker job for the up pump."""
    peer, pool_sock, user, local = hub_ends
    g = _run(pool_sock, local)
    peer.send(data_frame(b"GET /"))
    assert user.recv(100) == b"GET /"
    user.sendall(b"200 OK")
    user.shutdown(socket.SHUT_WR)
    assert peer.read_session() == (b"200 OK", EOF)
    peer.send(EOF_FRAME, data_frame(b"next"))
    assert g.get(timeout=5) == ("EOF", b"\x00\x00\x00\x04next")
    assert user.recv(100) == b""
    assert len(greenlet_jobs) == 0
    assert g.acct == [6, 5]
    if isinstance(g, Detached):  # it ended in the hub: no greenlet waited for it
        assert g.ended_in == [gevent.get_hub()] and g.dead


def test_hub_hands_a_download_the_user_reads_slowly_to_the_pumps_byte_exact(hub_ends, greenlet_jobs):
    peer, pool_sock, user, local = hub_ends
    g = _run(pool_sock, local)
    body = bytes(range(251)) * 20000  # ~5 MB: the local socket's buffers fill up
    sender = gevent.spawn(peer.send, *[data_frame(body[i:i + 60000]) for i in range(0, len(body), 60000)],
                          EOF_FRAME)
    gevent.sleep(0.2)  # the user reads nothing yet: a local write goes out short
    got = bytearray()
    user.settimeout(5)
    while True:
        chunk = user.recv(65536)
        if not chunk:
            break
        got += chunk
    assert bytes(got) == body
    sender.get(timeout=5)
    user.sendall(b"thanks")
    user.shutdown(socket.SHUT_WR)
    assert peer.read_session() == (b"thanks", EOF)
    assert g.get(timeout=5) == ("EOF", b"")
    # the up pump took over with the session (detached: in a job of its own for the down pump)
    assert len(greenlet_jobs) == (2 if isinstance(g, Detached) else 1)
    assert g.acct == [6, len(body)]


def test_hub_hands_an_upload_the_peer_reads_slowly_to_the_pumps_byte_exact(hub_ends):
    peer, pool_sock, user, local = hub_ends
    g = _run(pool_sock, local)
    body = bytes(range(7, 250)) * 20000
    uploader = gevent.spawn(lambda: (user.sendall(body), user.shutdown(socket.SHUT_WR)))
    gevent.sleep(0.2)  # the peer reads nothing yet: a frame goes out short
    assert peer.read_session(timeout=10) == (body, EOF)
    uploader.get(timeout=5)
    peer.send(EOF_FRAME)
    assert g.get(timeout=5) == ("EOF", b"")
    assert g.acct[0] == len(body)


def test_hub_a_local_socket_closed_under_the_phase_aborts_and_stays_reusable(hub_ends):
    peer, pool_sock, _user, local = hub_ends
    g = _run(pool_sock, local)
    gevent.sleep(0.05)
    local.close()  # another greenlet closes it: gevent cancels the watcher
    assert peer.read_session() == (b"", ABORT)
    peer.send(EOF_FRAME)
    reason, leftover = g.get(timeout=5)
    assert leftover == b"", reason


def test_hub_many_small_frames_in_one_read_all_pass_on(hub_ends):
    """More frames than one callback takes, all read at once: the rest is parsed in the next
    callback, without waiting for the socket to bring more."""
    peer, pool_sock, user, local = hub_ends
    g = _run(pool_sock, local)
    parts = [b"%03d;" % i for i in range(200)]
    peer.send(*[data_frame(p) for p in parts])  # one write: one read takes them all
    user.settimeout(5)
    got = b""
    while len(got) < 800:
        got += user.recv(1000)
    assert got == b"".join(parts)
    peer.send(EOF_FRAME)
    assert user.recv(10) == b""
    user.close()
    assert peer.read_session() == (b"", EOF)
    assert g.get(timeout=5) == ("EOF", b"")


class ShortWrites(NowaitStream):
    """Writes without waiting go out two bytes at a time (a congested socket, cut anywhere)."""

    def send_nowait(self, data) -> int:
        return super().send_nowait(bytes(data[:2]))


@pytest.mark.parametrize("payload", [b"", b"hello"])
def test_hub_frames_cut_short_are_finished_by_the_pumps_whole(hub_ends, payload):
    peer, pool_sock, user, local = hub_ends
    g = _run(ShortWrites(pool_sock.sock), local)
    if payload:
        user.sendall(payload)
        gevent.sleep(0.05)
    user.shutdown(socket.SHUT_WR)
    assert peer.read_session() == (payload, EOF)  # one DATA frame (if any), one EOF: whole
    peer.send(EOF_FRAME)
    assert g.get(timeout=5) == ("EOF", b"")


def test_hub_a_killed_relay_leaves_no_watcher_running(hub_ends):
    peer, pool_sock, user, local = hub_ends
    g = _run(pool_sock, local)
    peer.send(data_frame(b"x"))
    assert user.recv(10) == b"x"
    g.kill(block=True, timeout=5)
    assert g.dead
    assert not local._read_event.active and not pool_sock.sock._read_event.active
    if isinstance(g, Detached):  # killed mid-session: the connection is given up
        assert g.get(timeout=1)[1] is None
    user.sendall(b"after")  # nothing reads it any more, nothing fails
    gevent.sleep(0.05)


@pytest.mark.parametrize("bulk", [False, True], ids=["short", "handed-to-pumps"])
def test_hub_a_finished_session_is_freed_at_once(hub_ends, bulk, monkeypatch):
    """No reference cycle outlives a session's hub phase (its callbacks are its own methods):
    its objects go with their last reference, not at the collector's next pass.  Thousands of
    TLS sessions a second left as cyclic garbage made the collector's full passes stall the
    hub for 25-35 ms (bench/README.md, twentieth pass)."""
    import gc

    from npgevent.relay import framedhub

    made = track_instances(monkeypatch, framedhub.Phase)
    peer, pool_sock, user, local = hub_ends
    gc.collect()
    gc.disable()
    try:
        g = _run(pool_sock, local)
        body = b"d" * (300_000 if bulk else 5)
        gevent.spawn(peer.send, *(data_frame(body[i:i + 60000]) for i in range(0, len(body), 60000)))
        got = b""
        while len(got) < len(body):
            got += user.recv(65536)
        assert got == body
        user.sendall(b"ok")
        user.shutdown(socket.SHUT_WR)
        assert peer.read_session() == (b"ok", EOF)
        peer.send(EOF_FRAME)
        assert g.get(timeout=5)[0] == "EOF"
        del g  # the test's own hold on the session
        gevent.sleep(0.01)  # let the hub drop what it held for the callbacks
        assert made and made[0]() is None
    finally:
        gc.enable()


def test_detached_killed_in_its_pumps_gives_the_connection_up(detached_ends):
    peer, pool_sock, _user, local = detached_ends
    g = Detached(pool_sock, local)
    body = b"b" * 300_000  # bulk: the pumps take over, and the user reads nothing
    gevent.spawn(peer.send, data_frame(body[:60000]), data_frame(body[60000:120000]))
    with gevent.Timeout(5):
        while g.session.job is None:
            gevent.sleep(0.01)
    g.kill(block=True, timeout=5)
    assert g.dead
    reason, leftover = g.get(timeout=1)
    assert leftover is None, reason
    assert not local._read_event.active and not pool_sock.sock._read_event.active


def test_detached_killed_before_its_pumps_ran_still_ends(detached_ends, monkeypatch):
    """A kill that reaches the pumps' job before it started (a job killed then never runs):
    the session still ends, once, with the connection given up."""
    from npgevent.relay import runners

    peer, pool_sock, user, local = detached_ends
    real = runners.run
    killed = []

    def run_then_kill(fn, *args):
        job = real(fn, *args)
        if getattr(fn, "__name__", "") == "_pumps":
            job.kill(block=False)  # not started yet: cancelled
            killed.append(job)
        return job

    monkeypatch.setattr(runners, "run", run_then_kill)
    g = Detached(pool_sock, local)
    user.shutdown(socket.SHUT_WR)  # our EOF goes out in the hub: only the peer's side is left
    assert peer.read_session() == (b"", EOF)
    peer.send(data_frame(b"x" * 65536), data_frame(b"y" * 100))  # bulk in one callback: hand-over
    reason, leftover = g.get(timeout=5)
    assert killed and leftover is None, reason
    with gevent.Timeout(5):
        while not g.dead:
            gevent.sleep(0.01)
    assert len(g.ended_in) == 1


def test_detached_sessions_are_tracked_and_ended_by_their_owner(detached_ends):
    from npgevent.relay.runners import Sessions

    peer, pool_sock, user, local = detached_ends
    owner = Sessions()
    result = gevent.event.AsyncResult()
    done = gevent.event.Event()

    def start() -> None:
        FramedSession(pool_sock, local, [0, 0], 0, 1, 16384,
                      lambda reason, leftover: result.set(leftover)).start(owner)
        done.set()

    gevent.get_hub().loop.run_callback(start)
    done.wait(5)
    peer.send(data_frame(b"hello"))
    assert user.recv(10) == b"hello"
    assert len(owner) == 1 and not owner.join(0.05)
    owner.kill(block=True, timeout=5)
    assert len(owner) == 0 and owner.join(0)
    assert result.get(timeout=1) is None  # ended mid-session: the connection is given up


def _peer_sends(peer: Peer, data: bytes, pause: float, step: int) -> None:
    gevent.sleep(pause)
    for pos in range(0, len(data), step):
        peer.send(data_frame(data[pos:pos + step]))
    peer.send(EOF_FRAME)


def _user_talks(user: socket.socket, data: bytes, pause: float) -> bytes:
    """Send *data*, half-close, and read everything until the relay's half-close."""
    gevent.sleep(pause)
    user.sendall(data)
    user.shutdown(socket.SHUT_WR)
    got = bytearray()
    while True:
        chunk = user.recv(65536)
        if not chunk:
            return bytes(got)
        got += chunk


def test_hub_randomised_sessions_one_after_another_on_one_connection(hub_ends, greenlet_jobs):
    """Sessions of random sizes and timing on the same pool connection, as a reused one
    carries them: some end in the hub, some are handed over midway; every byte arrives once
    and in order both ways, and the connection is clean after each."""
    handed_over = []
    peer, pool_sock, _user, _local = hub_ends
    rng = random.Random(2026)
    sizes = [0, 1, 64, 5000, 70000, 400000]
    for i in range(40):
        user, local = tcp_pair()
        user.settimeout(10)
        local.settimeout(None)
        try:
            down = rng.randbytes(rng.choice(sizes))
            up = rng.randbytes(rng.choice(sizes))
            pause_user, pause_peer = rng.choice([0, 0, 0.02]), rng.choice([0, 0, 0.02])
            g = _run(pool_sock, local)

            sender = gevent.spawn(_peer_sends, peer, down, pause_peer, rng.randint(1, 60000))
            talker = gevent.spawn(_user_talks, user, up, pause_user)
            assert peer.read_session(timeout=10) == (up, EOF), i
            assert talker.get(timeout=10) == down, i
            sender.get(timeout=10)
            assert g.get(timeout=10) == ("EOF", b""), i
            assert g.acct == [len(up), len(down)], i
            handed_over.append(len(greenlet_jobs))
            greenlet_jobs.clear()
        finally:
            user.close()
            local.close()
    assert 0 in handed_over and any(handed_over)  # both courses were taken


def _conn(cid: str) -> tuple[PoolConn, socket.socket]:
    near, far = tcp_pair()
    near.settimeout(None)
    return PoolConn(cid, near, near), far


def test_a_lent_connection_comes_back_unless_flushed_or_over_the_limit():
    pool = IdlePool(InstanceLog("none"))
    pool.max_idle = 2
    conns = [_conn("%08x" % i) for i in range(4)]
    try:
        for conn, _ in conns:
            pool.lend(conn)
        assert pool.finish(conns[0][0], b"") and pool.finish(conns[1][0], b"", trim=True)
        assert not pool.finish(conns[2][0], b"", trim=True)  # two idle already: closed
        assert conns[2][0].sock.fileno() == -1
        assert pool.finish(conns[3][0], None) is False  # the session broke it: closed
        assert sorted(pool.idle) == ["00000000", "00000001"] and not pool.lent
        conn = pool.claim("00000000")
        pool.lend(conn)
        pool.flush()  # both ends flush: what is on a session now is closed after it
        assert not pool.finish(conn, b"") and conn.sock.fileno() == -1
    finally:
        pool.close()
        for conn, far in conns:
            conn.close()
            far.close()


def test_a_waiting_launch_gets_the_connection_as_it_comes_back():
    pool = IdlePool(InstanceLog("none"))
    conn, far = _conn("0a0b0c0d")
    try:
        pool.lend(conn)
        waiter = gevent.spawn(pool.take, "0a0b0c0d", 5)
        gevent.sleep(0.05)
        assert pool.finish(conn, b"")
        assert waiter.get(timeout=5) is conn and pool.errors == 0
    finally:
        pool.close()
        conn.close()
        far.close()


def test_the_client_refill_counts_lent_connections_up_to_half_its_capacity():
    dials: list[int] = []
    fars: list[socket.socket] = []

    def connector() -> PoolConn:
        dials.append(1)
        conn, far = _conn("%08x" % len(dials))
        fars.append(far)
        return conn

    pool = ClientPool(InstanceLog("none"), connector, Adaptive(8, 8, 0.05, 0.05))
    runner = gevent.spawn(pool.run)
    try:
        with gevent.Timeout(5):
            while pool.active < 8:
                gevent.sleep(0.01)
        start = len(dials)
        lent = []
        for _ in range(3):  # three sessions on the pool: they come back, no refill
            conn = pool.take_any(1)
            pool.lend(conn)
            lent.append(conn)
        gevent.sleep(0.3)
        assert len(dials) == start and pool.active == 5
        for _ in range(3):  # six lent: only four (half of 8) count, two are replaced
            conn = pool.take_any(1)
            pool.lend(conn)
            lent.append(conn)
        for _ in range(2):  # ...and two taken for good (single-use): replaced too
            pool.take_any(1).close()
        gevent.sleep(0.3)
        assert len(dials) - start == 4 and pool.active == 4, (len(dials) - start, pool.active)
        for conn in lent:
            pool.finish(conn, b"")
        assert pool.active == 10  # back above capacity: the receiving side trims, not this one
    finally:
        runner.kill()
        pool.close()
        for far in fars:
            far.close()
