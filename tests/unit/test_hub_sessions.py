"""Sessions that start at accept, in the hub: the dial's first step (Dialer.start_tcp), the
resolver's no-lookup answer, the detached hub relay (tcphub.HubSession) and the listener's
hand-over (Listeners.tcp_start), over real loopback sockets."""

from __future__ import annotations

import dataclasses
import os
import socket as stdsocket
import struct
import time

import gevent
import pytest
from gevent import socket
from greenlet import GreenletExit
from helpers import recv_all, upload

from npgevent.log import InstanceLog
from npgevent.net.dial import Attempt, Dialer, DialError
from npgevent.net.resolver import HostsFile, Resolver
from npgevent.relay import runners, tcphub
from npgevent.relay.limit import Slots
from npgevent.relay.listeners import Listeners
from npgevent.settings import Options
from npgevent.url import HostPort

pytestmark = pytest.mark.timeout(60)


def in_hub(fn, *args):
    """Run *fn* in a hub callback, where anything that waits raises, and return its result."""
    result = gevent.event.AsyncResult()

    def call() -> None:
        try:
            result.set(fn(*args))
        except BaseException as exc:  # handed to the test
            result.set_exception(exc)

    gevent.get_hub().loop.run_callback(call)
    return result.get(timeout=10)


def closed_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def dialer(*ports: int, host: str = "127.0.0.1", resolver: Resolver | None = None) -> Dialer:
    return Dialer(tuple(HostPort(host, p) for p in ports), resolver or Resolver(()), tcp_timeout=5.0)


# -- the dial's first step --------------------------------------------------------------------
def test_a_loopback_target_is_connected_inside_the_callback(listener):
    d = dialer(listener.getsockname()[1])
    for _ in range(10):  # not a lucky one
        started = in_hub(d.start_tcp)
        assert isinstance(started, tuple)
        sock, target = started
        assert target.port == listener.getsockname()[1]
        assert sock.getpeername() == listener.getsockname()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        peer, _ = listener.accept()
        sock.sendall(b"hi")
        assert peer.recv(2) == b"hi"
        peer.close()
        sock.close()


def test_a_refused_first_target_fails_over_in_the_greenlet(listener):
    down, up = closed_port(), listener.getsockname()[1]
    d = dialer(down, up)
    started = in_hub(d.start_tcp)  # round robin starts at the first target
    assert isinstance(started, Attempt)
    assert [t.port for t in started.order] == [down, up]
    sock, target = d.dial_tcp(attempt=started)
    assert target.port == up and sock.getpeername() == listener.getsockname()
    sock.close()
    assert started.sock is None or started.sock.closed


def test_every_target_down_names_each_and_counts_one_failure():
    class Events:
        dial_failures = 0

    a, b = closed_port(), closed_port()
    d = dialer(a, b)
    d.events = Events()
    started = in_hub(d.start_tcp)
    with pytest.raises(DialError) as info:
        d.dial_tcp(attempt=started)
    assert "127.0.0.1:%d" % a in str(info.value) and "127.0.0.1:%d" % b in str(info.value)
    assert "refused" in str(info.value)
    assert d.events.dial_failures == 1


def test_the_round_robin_advances_once_per_dial(listener):
    port = listener.getsockname()[1]
    d = dialer(closed_port(), port)
    firsts = []
    for _ in range(4):
        started = in_hub(d.start_tcp)
        if isinstance(started, Attempt):
            firsts.append(started.order[0].port)
            sock, _t = d.dial_tcp(attempt=started)
        else:
            sock, target = started
            firsts.append(target.port)
        sock.close()
    assert firsts[1::2] == [port, port] and port not in firsts[0::2]


def test_a_name_not_in_the_cache_is_looked_up_in_the_greenlet(listener, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 target.test\n")
    resolver = Resolver((), hosts=HostsFile(str(hosts)))
    d = dialer(listener.getsockname()[1], host="target.test", resolver=resolver)
    assert resolver.resolve_now("target.test") is None
    started = in_hub(d.start_tcp)
    assert isinstance(started, Attempt) and started.ips == [] and started.sock is None
    sock, _ = d.dial_tcp(attempt=started)
    assert sock.getpeername() == listener.getsockname()
    sock.close()
    assert resolver.resolve_now("TARGET.test.") == ["127.0.0.1"]  # cached by that lookup
    started = in_hub(d.start_tcp)  # the next dial is made in the hub
    assert isinstance(started, tuple)
    started[0].close()


def test_resolve_now_answers_literals_and_fresh_entries_only():
    resolver = Resolver((), ttl=0.2, hosts=HostsFile("/nonexistent"))
    assert resolver.resolve_now("::1") == ["::1"]
    assert resolver.resolve_now("127.000.0.1") is None  # not a literal ipaddress accepts
    resolver._cache["name.test"] = type("E", (), {"addrs": ["10.0.0.1"], "expires": time.monotonic() + 0.2})()
    assert resolver.resolve_now("name.test") == ["10.0.0.1"]
    time.sleep(0.25)
    assert resolver.resolve_now("name.test") is None


def test_a_connect_under_way_is_handed_on_and_times_out(full_listener):
    d = dialer(full_listener.getsockname()[1])
    started = in_hub(d.start_tcp)
    assert isinstance(started, Attempt) and started.sock is not None
    start = time.monotonic()
    with pytest.raises(DialError, match="i/o timeout"):
        d.dial_tcp(timeout=0.3, attempt=started)
    assert 0.25 <= time.monotonic() - start < 2.0
    assert started.sock.closed


def test_a_connect_under_way_completes_in_the_greenlet(full_listener):
    """The SYN dropped by the full queue is sent again (after ~1 s): once the queue has room,
    the same connect completes; nothing is dialled twice."""
    d = dialer(full_listener.getsockname()[1])
    started = in_hub(d.start_tcp)
    assert isinstance(started, Attempt) and started.sock is not None
    accepted = []

    def drain() -> None:
        full_listener.settimeout(5)
        while True:
            try:
                accepted.append(full_listener.accept()[0])
            except OSError:
                return

    drainer = gevent.spawn(drain)
    try:
        sock, _ = d.dial_tcp(timeout=5.0, attempt=started)
        assert sock is started.sock
        sock.close()
    finally:
        drainer.kill()
        for s in accepted:
            s.close()


# -- HubSession -------------------------------------------------------------------------------
class Ends:
    """The session's end callback: what it was told, and what still ran at that moment."""

    def __init__(self, *socks: socket.socket) -> None:
        self.calls: list[BaseException | None] = []
        self.socks = socks
        self.busy_at_end: list[bool] = []
        self.session: tcphub.HubSession | None = None

    def __call__(self, err: BaseException | None) -> None:
        self.calls.append(err)
        assert self.session is not None
        self.busy_at_end = [d.job is not None and not d.job.dead for d in self.session.dirs]
        self.busy_at_end += [s._read_event.active or s._write_event.active for s in self.socks]
        for s in self.socks:
            s.close()


def start(user: socket.socket, target: socket.socket, acct: list[int],
          owner: runners.Sessions | None = None, bufsize: int = 65536) -> tuple[tcphub.HubSession, Ends]:
    ends = Ends(user, target)
    session = tcphub.HubSession(user, target, acct, 0, 1, bufsize, ends)
    ends.session = session
    in_hub(session.start, owner)
    return session, ends


def test_a_short_session_runs_and_ends_in_the_hub(pairs, greenlet_jobs):
    user_near, user_far, target_near, target_far = pairs
    acct = [0, 0]
    owner = runners.Sessions()
    session, ends = start(user_far, target_near, acct, owner)
    assert len(owner) == 1
    user_near.sendall(b"q" * 64)
    assert target_far.recv(100) == b"q" * 64
    target_far.sendall(b"a" * 100)
    assert user_near.recv(200) == b"a" * 100
    user_near.shutdown(socket.SHUT_WR)
    assert target_far.recv(10) == b""
    target_far.sendall(b"late")  # half-closed: the other way still carries data
    assert user_near.recv(10) == b"late"
    target_far.shutdown(socket.SHUT_WR)
    assert user_near.recv(10) == b""
    assert owner.join(timeout=5)
    assert session.dead and ends.calls == [None] and ends.busy_at_end == [False] * 4
    assert user_far.closed and target_near.closed
    assert acct == [104, 64]
    assert greenlet_jobs == []
    assert len(owner) == 0


def test_bulk_moves_to_a_greenlet_and_the_end_waits_for_it(pairs, greenlet_jobs):
    user_near, user_far, target_near, target_far = pairs
    payload = os.urandom(8 << 20)
    session, ends = start(user_far, target_near, [0, 0])
    got = upload(user_near, target_far, payload)
    session.join(timeout=10)
    assert got == payload
    assert ends.calls == [None] and ends.busy_at_end == [False] * 4
    assert len(greenlet_jobs) == 1


def test_a_reset_ends_the_session_with_its_error(pairs):
    user_near, user_far, target_near, target_far = pairs
    session, ends = start(user_far, target_near, [0, 0])
    user_near.sendall(b"x" * 10)
    assert target_far.recv(10) == b"x" * 10
    target_far.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    target_far.close()  # RST
    session.join(timeout=5)
    assert len(ends.calls) == 1 and isinstance(ends.calls[0], ConnectionResetError)
    assert user_near.recv(10) == b""  # the user's side is closed too


def test_killing_a_session_that_waits_in_a_greenlet_ends_both_first(pairs, greenlet_jobs):
    """A direction blocked on a full target: the kill ends its greenlet before the sockets
    are handed back (an instance that stops kills its sessions this way)."""
    user_near, user_far, target_near, _target_far = pairs
    target_near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    owner = runners.Sessions()
    session, ends = start(user_far, target_near, [0, 0], owner)
    user_near.sendall(b"y" * 200_000)
    gevent.sleep(0.2)
    assert greenlet_jobs, "no direction waits in a greenlet"
    owner.kill(block=True, timeout=5)
    assert session.dead and len(owner) == 0
    assert len(ends.calls) == 1 and isinstance(ends.calls[0], GreenletExit)
    assert ends.busy_at_end == [False] * 4


def test_killing_an_idle_session_ends_it_at_once(pairs, greenlet_jobs):
    _user_near, user_far, target_near, _target_far = pairs
    session, ends = start(user_far, target_near, [0, 0])
    session.kill(block=True)
    assert session.dead and len(ends.calls) == 1 and greenlet_jobs == []
    session.kill()  # again: nothing more
    assert len(ends.calls) == 1


def test_sessions_carry_hub_sessions_across_an_adopt(pairs):
    user_near, user_far, target_near, target_far = pairs
    old, new = runners.Sessions(), runners.Sessions()
    session, ends = start(user_far, target_near, [0, 0], old)
    new.adopt(old)
    assert len(old) == 0 and len(new) == 1 and session.owner is new
    user_near.close()
    target_far.close()
    assert new.join(timeout=5) and ends.calls


# -- the listener's hand-over -----------------------------------------------------------------
def _listeners(limit: int, start_fn) -> tuple[Listeners, Slots, list]:
    opts = dataclasses.replace(Options(), noudp=True)
    slots = Slots(limit)
    handled: list = []
    ls = Listeners(opts, slots, InstanceLog("t"), runners.Sessions().spawn)

    def handler(sock: socket.socket, addr) -> None:
        handled.append(slots.tcp)
        sock.sendall(b"greenlet")

    ls.open(HostPort("127.0.0.1", 0), handler, None, tcp_start=start_fn)  # type: ignore[arg-type]
    return ls, slots, handled


def test_the_listener_hands_a_connection_over_at_accept_with_its_slot():
    taken: list = []

    def take(sock: socket.socket, addr) -> bool:
        if len(taken) == 1:
            return False  # the second one goes to the handler
        taken.append(slots.tcp)
        sock.sendall(b"hub")
        ls.end_tcp(sock)
        return True

    ls, slots, handled = _listeners(4, take)
    try:
        port = ls.tcp.address[1]
        for want in (b"hub", b"greenlet"):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            assert recv_all(c) == want
            c.close()
        assert taken == [1] and handled == [1]
        deadline = time.monotonic() + 5
        while slots.tcp and time.monotonic() < deadline:
            gevent.sleep(0.01)
        assert slots.tcp == 0
    finally:
        ls.close()


def test_a_connection_over_the_slot_limit_is_refused_in_the_hub():
    seen: list = []
    ls, slots, handled = _listeners(1, lambda sock, addr: seen.append(sock) or True)
    try:
        port = ls.tcp.address[1]
        held = socket.create_connection(("127.0.0.1", port), timeout=5)
        refused = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert recv_all(refused) == b""  # closed at once
        assert len(seen) == 1 and slots.tcp == 1 and handled == []
        ls.end_tcp(seen[0])
        assert slots.tcp == 0
        held.close()
        refused.close()
    finally:
        ls.close()
