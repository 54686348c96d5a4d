"""Property-based fuzzing of everything that parses outside input (issue 10).

Properties: only the documented error types escape, every input is handled in
linear time (none over 50 ms), and round trips hold where they apply.  The
default suite runs a few hundred examples per target; ``pytest -m slow`` runs
each target with at least 100,000 (see docs/robustness.md for the last run).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npgevent.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from npgevent.master.api import BadBody, Request
from npgevent.master.records import Record
from npgevent.protocol.handshake import Reply, check_hello, client_hello, read_reply, server_reply
from npgevent.protocol.proxyproto import parse_proxy_v1, proxy_v1
from npgevent.protocol.signals import LineDecoder, decode_line, encode_line
from npgevent.protocol.udpframe import MAX_DATAGRAM, Deframer, frame
from npgevent.settings import resolve
from npgevent.url import parse_url

FAST = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=100_000, deadline=None, suppress_health_check=list(HealthCheck))
LIMIT = 0.05  # seconds per input


def _timed(fn: Callable[[], Any], allowed: tuple[type[BaseException], ...]) -> tuple[Any, float]:
    began = time.thread_time()  # CPU time of this thread: preemption by other processes does not count
    try:
        return fn(), time.thread_time() - began
    except allowed:
        return None, time.thread_time() - began


def quick(fn: Callable[[], Any], allowed: tuple[type[BaseException], ...]) -> Any:
    """*fn()* (None if it raised one of *allowed*), which must take under LIMIT: an input over
    it is run again, since a slow input is slow every time and a pause (GC) happens once."""
    value, took = _timed(fn, allowed)
    if took >= LIMIT:
        value, took = _timed(fn, allowed)
        assert took < LIMIT, "one input took %.3fs of CPU, twice" % took
    return value


URL_ALPHABET = st.sampled_from([*"0123456789:/@?&=.,[]%-_ abcxyzAZ", "\u00b2", "\u0663", "\ud800", "\u00b5"])
url_text = st.one_of(
    st.text(URL_ALPHABET, max_size=300),
    st.builds(lambda s, h, q: "%s://%s/%s" % (s, h, q), st.sampled_from(["server", "client", "master", "x"]),
              st.text(URL_ALPHABET, max_size=60), st.text(URL_ALPHABET, max_size=120)),
)
setting_keys = st.sampled_from(["log", "tls", "min", "max", "mode", "quic", "dial", "read", "rate", "slot",
                                "proxy", "notcp", "noudp", "dns", "crt", "key"])
tunable_keys = st.sampled_from(["report_interval", "udp_read_timeout", "semaphore_limit", "pool_get_timeout",
                                "quic_datagram_size", "http_max_conns_per_ip", "http_idle_timeout"])
values = st.text(URL_ALPHABET, max_size=80)


def check_url(text: str) -> None:
    quick(lambda: parse_url(text), (ConfigError,))


def check_settings(role: str, query: dict[str, str], env: dict[str, str]) -> None:
    quick(lambda: resolve(role, query, env), (ConfigError,))


def check_control_lines(key: bytes, chunks: list[bytes]) -> None:
    decoder = LineDecoder(key)
    for chunk in chunks:
        out = quick(lambda c=chunk: decoder.feed(c), ())
        assert all(not isinstance(x, BaseException) or isinstance(x, RemoteProtocolError) for x in out)
    for chunk in chunks:
        quick(lambda c=chunk: decode_line(c, key), (RemoteProtocolError,))


def check_line_round_trip(key: bytes, message: bytes) -> None:
    assert decode_line(encode_line(message, key), key) == message


def check_handshake(key: bytes, line: bytes) -> None:
    quick(lambda: check_hello(line, key), (RemoteProtocolError,))
    quick(lambda: read_reply(line, key), (RemoteProtocolError,))
    assert check_hello(client_hello(key), key).key_ok


def check_reply_round_trip(key: bytes, quic: bool, cap: int, flow: str, tls: str, npg: int) -> None:
    reply = Reply(quic=quic, max=cap, flow=flow, tls=tls, npg=npg)
    assert read_reply(server_reply(reply, key), key) == reply


def check_deframer(chunks: list[bytes]) -> None:
    d = Deframer()
    for chunk in chunks:
        quick(lambda c=chunk: d.feed(c), ())
    assert d.pending <= sum(len(c) for c in chunks)


def check_frame_round_trip(datagrams: list[bytes], cut: int) -> None:
    wire = b"".join(frame(x) for x in datagrams)
    d = Deframer()
    got = d.feed(wire[:cut]) + d.feed(wire[cut:])
    assert got == datagrams and d.pending == 0


ip_text = st.one_of(st.ip_addresses().map(str), st.text(URL_ALPHABET, max_size=40))
ports = st.integers(min_value=-5, max_value=70000)


def check_proxy(src: str, sport: int, dst: str, dport: int) -> None:
    line = quick(lambda: proxy_v1((src, sport), (dst, dport)), (LocalProtocolError,))
    if line is not None:
        family, s, d = parse_proxy_v1(line)
        assert s[1] == sport and d[1] == dport and family in ("TCP4", "TCP6")


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)


def check_request_body(body: bytes) -> None:
    import io

    environ = {"REQUEST_METHOD": "POST", "QUERY_STRING": "", "CONTENT_LENGTH": str(len(body)),
               "wsgi.input": io.BytesIO(body)}
    obj = quick(lambda: Request(environ, "").json_object(), (BadBody,))
    if obj is not None:  # whatever came in can be stored: encodable, and JSON again
        json.dumps(obj, ensure_ascii=False).encode("utf-8")


def check_state_record(item: Any) -> None:
    rec = quick(lambda: Record.from_state(item), (ValueError,))
    if rec is not None:
        assert Record.from_state(json.loads(json.dumps(rec.to_state()))).to_state() == rec.to_state()


TARGETS: dict[str, tuple[Any, Callable[..., None]]] = {
    "url": ((url_text,), check_url),
    "settings": ((st.sampled_from(["server", "client", "master"]), st.dictionaries(setting_keys, values, max_size=5),
                  st.dictionaries(tunable_keys, values, max_size=3)), check_settings),
    "control_lines": ((st.binary(min_size=1, max_size=16), st.lists(st.binary(max_size=200), max_size=8)),
                      check_control_lines),
    "control_round_trip": ((st.binary(min_size=1, max_size=16), st.binary(max_size=300).filter(
        lambda m: b"\n" not in m)), check_line_round_trip),
    "handshake": ((st.binary(min_size=1, max_size=16), st.binary(max_size=300)), check_handshake),
    "reply_round_trip": ((st.binary(min_size=1, max_size=16), st.booleans(), st.integers(1, 65536),
                          st.sampled_from(["-", "+"]), st.sampled_from(["0", "1", "2"]), st.sampled_from([0, 1])),
                         check_reply_round_trip),
    "deframer": ((st.lists(st.binary(max_size=300), max_size=10),), check_deframer),
    "frame_round_trip": ((st.lists(st.binary(max_size=MAX_DATAGRAM // 256), max_size=6),
                          st.integers(0, 2000)), check_frame_round_trip),
    "proxy_line": ((ip_text, ports, ip_text, ports), check_proxy),
    "request_body": ((st.one_of(st.binary(max_size=400), json_values.map(lambda v: json.dumps(v).encode())),),
                     check_request_body),
    "state_record": ((st.one_of(json_values, st.fixed_dictionaries(
        {"id": st.text(min_size=1, max_size=10), "url": st.just("client://127.0.0.1:1/127.0.0.1:2")},
        optional={"meta": json_values, "mode": json_values, "restart": json_values, "counters": json_values,
                  "alias": json_values})),), check_state_record),
}


def _make(name: str, strategies: tuple[Any, ...], check: Callable[..., None], profile: Any) -> Any:
    @profile
    @given(st.tuples(*strategies))
    def run(args: tuple[Any, ...]) -> None:
        check(*args)

    run.__name__ = "fuzz_%s" % name
    return run


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz(name):
    strategies, check = TARGETS[name]
    _make(name, strategies, check, FAST)()


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_100k(name):
    strategies, check = TARGETS[name]
    _make(name, strategies, check, SLOW)()
