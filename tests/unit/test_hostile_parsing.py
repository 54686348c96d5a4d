"""Parsers against hostile input: linear time, ASCII digits only, one-line errors (issue 10)."""

from __future__ import annotations

import time

import pytest
from helpers import run_cli

from npgevent.durations import parse_go_duration_ns
from npgevent.errors import ConfigError
from npgevent.log import Throttle
from npgevent.settings import resolve
from npgevent.url import parse_url


def timed(fn, *args):
    began = time.perf_counter()
    try:
        return fn(*args)
    finally:
        assert time.perf_counter() - began < 0.05, "took %.3fs" % (time.perf_counter() - began)


@pytest.mark.parametrize("text", ["9" * 20000 + "x", "9" * 100000 + "x", "9" * 400 + "h", "1" * 60 + "h",
                                  "2562047h47m16.854775808s", "." * 5000 + "s", "1" + "5s" * 40])
def test_durations_fail_fast_with_valueerror(text):
    with pytest.raises(ValueError):
        timed(parse_go_duration_ns, text)


def test_largest_duration_still_parses():
    assert parse_go_duration_ns("2562047h47m16.854775807s") == (1 << 63) - 1


@pytest.mark.parametrize("where", ["url", "env"])
def test_overflowing_duration_is_a_config_error(where):
    huge = "9" * 400 + "h"
    with pytest.raises(ConfigError, match=r"read|udp_read_timeout|UDP_READ"):
        if where == "url":
            resolve("client", {"read": huge}, {})
        else:
            resolve("client", {}, {"udp_read_timeout": huge})


def test_overflowing_duration_on_the_cli_exits_2():
    rc, _out, err = run_cli("--report-interval", "9" * 400 + "h", "client://127.0.0.1:1/127.0.0.1:2")
    assert rc == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("url", [
    "client://127.0.0.1:\u00b2/127.0.0.1:80",          # superscript two: isdigit() but not int()
    "client://127.0.0.1:" + "1" * 4400 + "/127.0.0.1:80",  # past int()'s digit limit
    "client://127.0.0.1:\u0663\u0663\u0663\u0663\u0663/127.0.0.1:80",  # Arabic-Indic 33333
    "client://127.0.0.1:8080/127.0.0.1:\uff18\uff10",     # fullwidth digits
])
def test_ports_take_ascii_digits_only(url):
    with pytest.raises(ConfigError, match="port"):
        timed(parse_url, url)


@pytest.mark.parametrize(("key", "value"), [("min", "\u0665"), ("slot", "1_0"), ("max", " 1_000"),
                                            ("rate", "\u00b9"), ("slot", "9" * 5000)])
def test_integers_take_ascii_digits_only(key, value):
    with pytest.raises(ConfigError, match="integer"):
        resolve("server" if key == "max" else "client", {key: value}, {})


def test_signed_integers_as_go_reads_them():
    opts, warnings = resolve("client", {"slot": "+10"}, {})
    assert opts.slot == 10 and warnings == []


def test_throttle_collapses_repeats_and_reports_the_count():
    t = Throttle(window=5.0)
    assert t.admit("k", now=0.0) == 0
    assert [t.admit("k", now=x) for x in (1.0, 2.0, 4.9)] == [None, None, None]
    assert t.admit("k", now=5.1) == 3
    assert t.suffix(3) == " (3 more in the last 5 s)"
    assert t.admit("other", now=5.2) == 0  # kinds are independent


@pytest.mark.parametrize("text", ["np://0@\u00b2/-#0", "np://0@" + "9" * 5000 + "/-#0", "np://0@\u0661\u0660/-#0"])
def test_handshake_reply_numbers_take_ascii_digits_only(text):
    from npgevent.errors import RemoteProtocolError
    from npgevent.protocol.handshake import parse_reply

    with pytest.raises(RemoteProtocolError, match="max pool capacity"):
        timed(parse_reply, text)
