"""log-format=json: one JSON object per line for a log collector (real processes)."""

from __future__ import annotations

import json
import re
import time

import gevent
import pytest
from helpers import MasterProcess, NpProcess, TcpEcho, echo_roundtrip, free_port, run_cli

pytestmark = pytest.mark.timeout(60)
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d)$")


def test_every_line_is_a_json_object_with_checkpoint_fields_as_numbers():
    echo = TcpEcho()
    port = free_port()
    url = "client://127.0.0.1:%d/127.0.0.1:%d?log=debug" % (port, echo.port)
    try:
        with NpProcess(url, env={"NP_LOG_FORMAT": "json"}) as p:
            p.wait_for(r'"message": "Client started')
            assert echo_roundtrip(port, b"json please") == b"json please"
            p.wait_for(r"CHECK_POINT\|MODE=1.*TCPRX=11")
            assert p.stop() == 0
        records = [json.loads(line) for line in p.lines if line.strip()]
        assert records and all(set(r) >= {"time", "level", "message", "instance"} for r in records)
        assert all(RFC3339_MS.match(r["time"]) for r in records)
        assert {r["level"] for r in records} <= {"DEBUG", "INFO", "WARN", "ERROR", "EVENT"}
        assert all(r["instance"] == "client://127.0.0.1:%d" % port for r in records)
        cp = next(r for r in records if "TCPRX=11" in r["message"])
        assert cp["mode"] == 1 and cp["tcprx"] == 11 and cp["tcptx"] == 11 and isinstance(cp["ping_ms"], int)
    finally:
        echo.close()


def test_the_default_stays_nodepass_text():
    echo = TcpEcho()
    port = free_port()
    try:
        with NpProcess("client://127.0.0.1:%d/127.0.0.1:%d" % (port, echo.port)) as p:
            line = p.wait_for(r"INFO  Client started").string
            assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}  INFO  Client started", line)
    finally:
        echo.close()


def test_a_bad_format_is_a_usage_error():
    rc, _out, err = run_cli("--log-format", "xml", "client://127.0.0.1:1/127.0.0.1:2")
    assert rc == 2 and "--log-format" in err and "text, json" in err and len(err.splitlines()) == 1


def test_a_json_master_still_reads_its_childrens_checkpoints(tmp_path):
    """Children inherit the master's environment, but are always started with text logs:
    the master parses their CHECK_POINT lines."""
    master = MasterProcess(tmp_path / "state", env={"NP_LOG_FORMAT": "json"})
    echo = TcpEcho()
    port = free_port()
    try:
        assert '"message": "Master started' in master.output
        r = master.api("POST", "/instances", {"url": "client://127.0.0.1:%d/127.0.0.1:%d" % (port, echo.port)})
        assert r.status == 201
        iid = r.json["id"]
        assert echo_roundtrip(port, b"counted") == b"counted"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if master.api("GET", "/instances/" + iid).json["tcprx"] >= 7:
                break
            gevent.sleep(0.3)
        assert master.api("GET", "/instances/" + iid).json["tcprx"] >= 7
    finally:
        master.stop()
        master.close()
        echo.close()
