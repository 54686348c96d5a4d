"""Segmentation offload for the QUIC thread: runs of datagrams per system call (GSO, GRO).

The grouping and splitting are sans-IO and tested in memory; the transport is tested on real
loopback sockets: what the receiver's protocol gets must be exactly the datagrams sent, in
order, whether the kernel takes the runs whole, segments them, or refuses them."""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npgevent.quic import offload
from npgevent.quic.loop import DRAIN, NativeLoop, tune

pytestmark = pytest.mark.timeout(60)

A, B = ("127.0.0.1", 1), ("127.0.0.1", 2)


def _flatten(runs):
    return [(d, addr) for run, addr, _ in runs for d in run]


# -- sans-IO: grouping and splitting --------------------------------------------------------


def test_a_run_is_one_size_with_a_shorter_last_datagram_for_one_address():
    grams = [(b"a" * 1452, A)] * 3 + [(b"b" * 700, A), (b"c" * 1452, A), (b"d" * 1452, B)]
    runs = list(offload.runs(grams))
    assert [(len(r), addr, size) for r, addr, size in runs] == [(4, A, 1452), (1, A, 1452), (1, B, 1452)]
    assert _flatten(runs) == grams


def test_a_longer_datagram_starts_a_new_run():
    grams = [(b"x" * 100, A), (b"y" * 1452, A), (b"z" * 1452, A)]
    assert [(len(r), s) for r, _, s in offload.runs(grams)] == [(1, 100), (2, 1452)]


def test_runs_stay_within_the_kernels_segment_and_byte_limits():
    many = [(b"s" * 100, A)] * (offload.MAX_SEGMENTS + 5)
    assert [len(r) for r, _, _ in offload.runs(many)] == [offload.MAX_SEGMENTS, 5]
    big = [(b"B" * 16000, A)] * 9
    runs = list(offload.runs(big))
    assert [len(r) for r, _, _ in runs] == [4, 4, 1]
    assert all(sum(map(len, r)) <= offload.MAX_BYTES for r, _, _ in runs)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2000), st.sampled_from([A, B])), max_size=150))
def test_runs_keep_every_datagram_in_order_and_each_run_is_sendable(spec):
    grams = [(bytes([i % 251]) * n, addr) for i, (n, addr) in enumerate(spec)]
    runs = list(offload.runs(grams))
    assert _flatten(runs) == grams
    for run, _addr, size in runs:
        assert run and len(run) <= offload.MAX_SEGMENTS and sum(map(len, run)) <= offload.MAX_BYTES
        assert all(len(d) == size for d in run[:-1]) and len(run[-1]) <= size


def test_split_cuts_a_coalesced_run_and_leaves_a_single_datagram_alone():
    assert offload.split(b"aaabbbc", 3) == [b"aaa", b"bbb", b"c"]
    assert offload.split(b"aaabbb", 3) == [b"aaa", b"bbb"]
    assert offload.split(b"aa", 3) == [b"aa"]
    assert offload.split(b"aa", 0) == [b"aa"]


def test_gro_size_reads_the_kernels_control_message_only():
    assert offload.gro_size([(offload.SOL_UDP, offload.UDP_GRO, struct.pack("=i", 1452))]) == 1452
    assert offload.gro_size([]) == 0
    assert offload.gro_size([(socket.SOL_SOCKET, offload.UDP_GRO, struct.pack("=i", 9))]) == 0
    assert offload.gro_size([(offload.SOL_UDP, offload.UDP_GRO, b"\x01")]) == 0  # too short


# -- the transport on real loopback sockets -------------------------------------------------


def _kernel_has_gso() -> bool:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        b.bind(("127.0.0.1", 0))
        a.sendmsg([b"x" * 20, b"y" * 20], offload.segment_cmsg(20), 0, b.getsockname())
        return True
    except OSError:
        return False
    finally:
        a.close()
        b.close()


needs_gso = pytest.mark.skipif(not _kernel_has_gso(), reason="this kernel has no UDP_SEGMENT")


class Collector:
    def __init__(self) -> None:
        self.got: list[tuple[bytes, object]] = []
        self.errors: list[OSError] = []

    def connection_made(self, transport) -> None:
        pass

    def datagram_received(self, data, addr) -> None:
        self.got.append((bytes(data), addr))

    def error_received(self, exc) -> None:
        self.errors.append(exc)


class Ends:
    """A sending and a receiving transport of one NativeLoop (not run: the test calls them)."""

    def __init__(self, offload_on: bool = True, sock_class=socket.socket, connected: bool = False,
                 family: int = socket.AF_INET) -> None:
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        self.loop = NativeLoop()
        self.loop.offload = offload_on
        self.rx_sock = socket.socket(family, socket.SOCK_DGRAM)
        self.rx_sock.bind((host, 0))
        tune(self.rx_sock)  # as the QUIC thread does: room for bursts
        self.rx_sock.setblocking(False)
        self.tx_sock = sock_class(family, socket.SOCK_DGRAM)
        self.tx_sock.bind((host, 0))
        if connected:
            self.tx_sock.connect(self.rx_sock.getsockname())
        self.tx_sock.setblocking(False)
        self.addr = self.rx_sock.getsockname()
        self.received = Collector()
        self.rx = self.loop._make_datagram_transport(self.rx_sock, self.received)
        self.tx = self.loop._make_datagram_transport(self.tx_sock, Collector())

    def read_all(self, count: int, timeout: float = 5.0) -> list[bytes]:
        end = time.monotonic() + timeout
        while len(self.received.got) < count and time.monotonic() < end:
            self.rx._read_ready()
            time.sleep(0.005)
        return [d for d, _ in self.received.got]

    def close(self) -> None:
        self.rx_sock.close()
        self.tx_sock.close()
        self.loop.close()


def _mixed() -> list[bytes]:
    sizes = [1452] * 10 + [700] + [1200] * 5 + [100] + [1452] * 3 + [1452] * 50
    return [os.urandom(n) for n in sizes]


@needs_gso
@pytest.mark.parametrize("connected", [False, True])
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_runs_cross_the_kernel_whole_and_arrive_as_the_datagrams_sent(connected, family):
    ends = Ends(connected=connected, family=family)
    try:
        grams = _mixed()
        ends.tx.send_batch([(d, ends.addr) for d in grams])
        assert ends.read_all(len(grams)) == grams
        assert ends.tx.runs_sent >= 4 and ends.tx.gso
        assert ends.rx.gro and ends.rx.runs_read >= 1  # loopback hands a GSO run over whole
        assert not ends.received.errors
    finally:
        ends.close()


@needs_gso
def test_a_dual_stack_socket_sends_runs_to_a_mapped_ipv4_address():
    """The server's socket on an empty host is IPv6 with IPv4 mapped in: its runs to an IPv4
    client go out through the IPv4 stack."""
    ends = Ends()
    dual = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        dual.bind(("::", 0))
        dual.setblocking(False)
        tx = ends.loop._make_datagram_transport(dual, Collector())
        grams = _mixed()
        tx.send_batch([(d, ("::ffff:127.0.0.1", ends.addr[1], 0, 0)) for d in grams])
        assert ends.read_all(len(grams)) == grams
        assert tx.runs_sent >= 4 and tx.gso and ends.rx.runs_read >= 1
    finally:
        dual.close()
        ends.close()


@needs_gso
def test_a_receiver_without_gro_gets_the_same_datagrams():
    ends = Ends()
    try:
        # a peer that reads one datagram per call (quic-go, say): the kernel cuts the runs
        ends.rx_sock.setsockopt(offload.SOL_UDP, offload.UDP_GRO, 0)
        ends.rx.gro = False
        grams = _mixed()
        ends.tx.send_batch([(d, ends.addr) for d in grams])
        assert ends.read_all(len(grams)) == grams
        assert ends.tx.runs_sent >= 4 and ends.rx.runs_read == 0
    finally:
        ends.close()


def test_offload_off_sends_and_reads_one_datagram_per_call():
    ends = Ends(offload_on=False)
    try:
        assert not ends.tx.gso and not ends.rx.gro
        grams = _mixed()
        ends.tx.send_batch([(d, ends.addr) for d in grams])
        assert ends.read_all(len(grams)) == grams
        assert ends.tx.runs_sent == 0 and ends.rx.runs_read == 0
    finally:
        ends.close()


class RefusingSocket(socket.socket):
    """A socket whose kernel refuses segmentation offload (as a device without checksum
    offload does: EIO), or whose send buffer is full once (EAGAIN)."""

    refuse = errno.EIO
    calls = 0

    def sendmsg(self, *args):  # type: ignore[override]
        type(self).calls += 1
        raise OSError(self.refuse, os.strerror(self.refuse))


class FullOnceSocket(socket.socket):
    calls = 0

    def sendmsg(self, *args):  # type: ignore[override]
        type(self).calls += 1
        if type(self).calls == 1:
            raise BlockingIOError(errno.EAGAIN, "full")
        return super().sendmsg(*args)


@pytest.mark.parametrize("code", [errno.EIO, errno.EINVAL, errno.EMSGSIZE])
def test_a_refused_run_is_sent_one_datagram_at_a_time_and_offload_stops_on_that_socket(code, monkeypatch):
    monkeypatch.setattr(RefusingSocket, "refuse", code)
    RefusingSocket.calls = 0
    ends = Ends(sock_class=RefusingSocket)
    try:
        grams = _mixed()
        ends.tx.send_batch([(d, ends.addr) for d in grams])
        assert ends.read_all(len(grams)) == grams  # nothing lost, nothing reordered
        assert not ends.tx.gso and RefusingSocket.calls == 1
        ends.tx.send_batch([(d, ends.addr) for d in grams])
        assert ends.read_all(2 * len(grams))[len(grams):] == grams
        assert RefusingSocket.calls == 1  # not asked again
        assert not ends.received.errors
    finally:
        ends.close()


@needs_gso
def test_a_full_send_buffer_keeps_offload_and_loses_nothing():
    FullOnceSocket.calls = 0
    ends = Ends(sock_class=FullOnceSocket)
    try:
        grams = _mixed()
        ends.tx.send_batch([(d, ends.addr) for d in grams])
        assert ends.read_all(len(grams)) == grams
        assert ends.tx.gso and FullOnceSocket.calls >= 2
    finally:
        ends.close()


@needs_gso
def test_a_flood_of_runs_is_read_a_bounded_amount_per_wakeup():
    """An attacker's runs are datagrams like any other: one wake-up reads at most DRAIN of
    them and the run it is in, and the rest waits for the next wake-up."""
    ends = Ends()
    try:
        attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for _ in range(10):
                attacker.sendmsg([b"\x40" * 1000] * 60, offload.segment_cmsg(1000), 0, ends.addr)
        finally:
            attacker.close()
        time.sleep(0.05)
        ends.rx._read_ready()
        first = len(ends.received.got)
        assert DRAIN <= first < DRAIN + offload.MAX_SEGMENTS
        assert ends.read_all(600) == [b"\x40" * 1000] * 600
    finally:
        ends.close()


class ScriptedSocket:
    """What ``recvmsg`` returns, scripted: the kernel's answers a test cannot provoke on
    loopback (a run longer than the buffer, a size that does not fit the data)."""

    def __init__(self, answers: list[tuple[bytes, list, int]]) -> None:
        self.answers = answers

    def recvmsg(self, bufsize: int, ancbufsize: int):
        if not self.answers:
            raise BlockingIOError(errno.EAGAIN, "empty")
        data, ancdata, flags = self.answers.pop(0)
        return data[:bufsize], ancdata, flags, A


def _gro(size: int) -> list:
    return [(offload.SOL_UDP, offload.UDP_GRO, struct.pack("=i", size))]


def test_cut_short_reads_keep_only_whole_datagrams():
    """A truncated run keeps its whole datagrams and drops the cut one; a truncated single
    datagram is dropped; a segment size larger than the data is a single datagram."""
    from npgevent.quic.loop import _MSG_TRUNC

    ends = Ends(offload_on=False)
    try:
        received = Collector()
        sock = ScriptedSocket([
            (b"a" * 1000 + b"b" * 1000 + b"c" * 500, _gro(1000), _MSG_TRUNC),  # c was cut
            (b"x" * 700, [], _MSG_TRUNC),
            (b"y" * 300, _gro(1000), 0),
            (b"d" * 1000 + b"e" * 10, _gro(1000), 0),
        ])
        ends.rx._read_runs(sock, received)
        assert [d for d, _ in received.got] == [b"a" * 1000, b"b" * 1000, b"y" * 300, b"d" * 1000, b"e" * 10]
        assert ends.rx.runs_read == 2 and not received.errors
    finally:
        ends.close()
