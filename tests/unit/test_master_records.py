"""Pure master rules: URL normalisation (section 11), counters (section 10), Go JSON, SSE time."""

from __future__ import annotations

import re

import pytest

from npgevent.log import CHECKPOINT_RE
from npgevent.master.events import frame, rfc3339nano
from npgevent.master.records import (
    MasterTLS,
    Record,
    URLFormatError,
    config_url,
    enhance_url,
    go_json,
    split_url,
)

M = MasterTLS(log="info", tls="1")


def test_example_from_the_spec():
    url = enhance_url("server://0.0.0.0:10101/127.0.0.1:8080", M)
    assert url == "server://0.0.0.0:10101/127.0.0.1:8080?log=info&tls=1"
    assert config_url(url, M) == (
        "server://0.0.0.0:10101/127.0.0.1:8080?dial=auto&dns=1.1.1.1%2C8.8.8.8&log=info&max=1024&mode=0"
        "&notcp=0&noudp=0&proxy=0&quic=0&rate=0&read=0s&slot=65536&tls=1")


def test_client_urls_only_get_log_and_min():
    url = enhance_url("client://k@h:1/a:2,b:3?tls=2", M)
    assert url == "client://k@h:1/a:2,b:3?log=info&tls=2"
    assert "&min=64&" in config_url(url, M) and "max=" not in config_url(url, M)


def test_existing_values_kept_empty_log_filled_repeats_kept_sorted():
    assert enhance_url("server://:1/x:2?log=debug&tls=0", M) == "server://:1/x:2?log=debug&tls=0"
    assert enhance_url("server://:1/x:2?log=&b=1&a=2&a=1", M) == "server://:1/x:2?a=2&a=1&b=1&log=info&tls=1"
    assert enhance_url("client://:1/x:2", MasterTLS()) == "client://:1/x:2"  # no query: no "?"
    assert config_url("client://:1/x:2?read=&rate=5", MasterTLS()).count("read=0s") == 1


def test_code_2_adds_crt_and_key_when_given():
    m2 = MasterTLS(log="", tls="2", crt="/c.pem", key="")
    assert enhance_url("server://:1/x:2", m2) == "server://:1/x:2?crt=%2Fc.pem&tls=2"


@pytest.mark.parametrize("bad", ["client://[::1/x", "client://h:nope/x:1", "client://h:1/%zz", "client://h:1/\x01"])
def test_url_format_errors(bad):
    with pytest.raises(URLFormatError):
        split_url(bad)


def _cp(**kw):
    v = {"mode": 2, "ping": 3, "pool": 4, "tcps": 1, "udps": 0, "tcprx": 0, "tcptx": 0, "udprx": 0, "udptx": 0}
    v.update(kw)
    line = ("2026-01-01 00:00:00.000  \x1b[36mEVENT\x1b[0m  CHECK_POINT|MODE=%(mode)d|PING=%(ping)dms|POOL=%(pool)d|"
            "TCPS=%(tcps)d|UDPS=%(udps)d|TCPRX=%(tcprx)d|TCPTX=%(tcptx)d|UDPRX=%(udprx)d|UDPTX=%(udptx)d" % v)
    m = CHECKPOINT_RE.search(line)
    assert m is not None
    return m


def test_counters_carry_over_restarts_and_reset_correctly():
    r = Record("abcd0001")
    r.on_start()
    r.apply_checkpoint(_cp(tcprx=100))
    assert r.counters["tcprx"].value == 100 and (r.mode, r.pool) == (2, 4)
    r.on_start()  # the child restarted: its own counter starts from 0 again
    r.apply_checkpoint(_cp(tcprx=30))
    assert r.counters["tcprx"].value == 130
    r.reset_counters()
    assert r.counters["tcprx"].value == 0
    r.apply_checkpoint(_cp(tcprx=50))
    assert r.counters["tcprx"].value == 20
    r.reset_counters()  # a second reset without a restart (Go over-counts here)
    r.apply_checkpoint(_cp(tcprx=55))
    assert r.counters["tcprx"].value == 5
    r.apply_checkpoint(_cp(tcprx=3))  # the child started over under us
    assert r.counters["tcprx"].value == 3


def test_state_round_trip_keeps_hidden_counters():
    r = Record("abcd0002", type="client", status="running", url="u", config="c", alias="a", restart=True,
               tags={"k": "v"})
    r.on_start()
    r.apply_checkpoint(_cp(udptx=7))
    back = Record.from_state(r.to_state())
    assert back.to_api() == r.to_api()
    assert back.counters["udptx"].last == 7


def test_go_json():
    assert go_json({"a": "x&y<z>", "b": None, "c": "é"}) == '{"a":"x\\u0026y\\u003cz\\u003e","b":null,"c":"é"}\n'.encode()


def test_sse_frame_and_time():
    t = rfc3339nano(1_700_000_000_123_456_789)
    assert re.fullmatch(r"2023-11-\d\dT\d\d:\d\d:20\.123456789(Z|[+-]\d\d:\d\d)", t)
    assert re.fullmatch(r".*:20(Z|[+-]\d\d:\d\d)", rfc3339nano(1_700_000_000_000_000_000))
    assert rfc3339nano(1_700_000_000_500_000_000).split("+")[0].split("Z")[0].endswith(".5")
    f = frame("update", {"id": "x"}, "")
    assert f.startswith(b"event: instance\ndata: {\"type\":\"update\",\"time\":\"") and f.endswith(b"\"logs\":\"\"}\n\n")
    assert f.count(b"\n") == 3


def test_the_master_passes_auth_through_to_its_instances():
    for url in ("server://k@:10101/:8080?auth=2", "client://k@h:10101/x:80?auth=0&log=debug"):
        assert "auth=" + url.split("auth=")[1][0] in enhance_url(url, M)
