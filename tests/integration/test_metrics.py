"""Prometheus metrics: metrics=host:port on an instance, /metrics on the master, and a real
Prometheus server scraping npgevent (skipped with the reason where the package is missing)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse

import gevent
import pytest
from helpers import (
    EchoPair,
    MasterProcess,
    NpProcess,
    echo_exact,
    free_port,
    http,
    in_process,
    tunnel_urls,
    udp_roundtrip,
    wait_pool,
    wait_serving,
)

pytestmark = pytest.mark.timeout(120)


class Denied(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status

SERIES = ("npgevent_bytes_total", "npgevent_sessions", "npgevent_session_limit", "npgevent_pool_idle",
          "npgevent_pool_capacity", "npgevent_control_ping_seconds_bucket", "npgevent_tunnel_restarts_total",
          "npgevent_handshake_failures_total", "npgevent_dial_failures_total", "npgevent_udp_dropped_total")


def scrape(port: int, path: str = "/metrics", key: str | None = None) -> dict[str, float]:
    r = http("GET", port, path, key=key)  # a gevent socket: in-process daemons keep running
    if r.status != 200:
        raise Denied(r.status)
    assert r.headers["content-type"].startswith("text/plain")
    text = r.body.decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@contextlib.contextmanager
def metrics_tunnel(pool: int = 1):
    """A tls=0 tunnel whose server has metrics=; yields (server runner, user port, metrics port)."""
    echo = EchoPair()
    tport, uport, mport = free_port(), free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "0", tport, uport, echo.port, key="metrics-key",
                                         extra_server="&metrics=127.0.0.1:%d" % mport)
    try:
        with in_process(server_url) as s, in_process(client_url):
            s.capture.wait_for(r"Metrics: http://127\.0\.0\.1:%d/metrics" % mport)
            wait_pool(lambda: s.core.pool.active, pool)
            yield s, uport, mport
    finally:
        echo.close()


def test_a_tunnel_server_exposes_every_series_and_they_move():
    with metrics_tunnel(pool=4) as (s, uport, mport):
        for _ in range(5):
            assert echo_exact(uport, b"m" * 1000) == b"m" * 1000
        assert udp_roundtrip(uport, b"u" * 100) == b"u" * 100
        s.capture.wait_for(r"CHECK_POINT.*PING", timeout=5)
        m = scrape(mport)
        for name in SERIES:
            assert any(k.startswith(name) for k in m), name
        assert m['npgevent_bytes_total{direction="rx",protocol="tcp"}'] >= 5000
        assert m['npgevent_bytes_total{direction="tx",protocol="udp"}'] >= 100
        assert m["npgevent_session_limit"] == 65536
        assert m["npgevent_pool_capacity"] == 1024 and m["npgevent_pool_idle"] >= 1
        assert m["npgevent_control_ping_seconds_count"] >= 1
        assert m['npgevent_handshake_failures_total{kind="auth"}'] == 0


def test_failures_and_restarts_are_counted_by_kind_and_reason():
    """A wrong key (handshake failure), a dial to a dead target and a restart, as counters."""
    tport, uport, mport = free_port(), free_port(), free_port()
    dead = free_port()
    server_url, _ = tunnel_urls("rev", "0", tport, uport, dead, key="the-right-key-1",
                                extra_server="&metrics=127.0.0.1:%d" % mport)
    _, wrong_client = tunnel_urls("rev", "0", tport, uport, dead, key="the-wrong-key-1")
    _, client_url = tunnel_urls("rev", "0", tport, uport, dead, key="the-right-key-1")
    with in_process(server_url) as s:
        with in_process(wrong_client, wait_running=False) as c:
            c.capture.wait_for(r"Client error: tunnel handshake", timeout=15)
        s.capture.wait_for(r"tunnelHandshake: access denied", timeout=10)
        with in_process(client_url) as c:
            wait_pool(lambda: s.core.pool.active, 1)
            from gevent import socket as std

            user = std.create_connection(("127.0.0.1", uport), timeout=5)
            user.settimeout(10)
            assert user.recv(10) == b""  # the client could not dial the dead target
            user.close()
            c.capture.wait_for(r"Dial target failed", timeout=10)
            cm = c.core.inst.events
            assert cm.dial_failures >= 1
        s.capture.wait_for(r"Server error: control connection", timeout=15)
        gevent.sleep(0.2)
        m = scrape(mport)
        assert m['npgevent_handshake_failures_total{kind="auth"}'] >= 1
        assert sum(v for k, v in m.items() if k.startswith("npgevent_tunnel_restarts_total")) >= 1
        assert m['npgevent_tunnel_restarts_total{reason="control_closed"}'] >= 1


def test_metrics_address_in_use_or_bad_is_a_clear_error():
    echo = EchoPair()
    port = free_port()
    proc = NpProcess("client://127.0.0.1:%d/127.0.0.1:%d?metrics=nonsense" % (port, echo.port))
    try:
        assert proc.wait(15) == 2
        assert "invalid URL parameter metrics= 'nonsense': expected host:port" in proc.output
        assert "Traceback" not in proc.output
    finally:
        proc.close()
        echo.close()


def test_master_metrics_behind_the_key_labelled_by_instance(tmp_path):
    echo = EchoPair()
    master = MasterProcess(tmp_path)
    try:
        port = free_port()
        r = master.api("POST", "/instances", {"url": "client://127.0.0.1:%d/127.0.0.1:%d" % (port, echo.port)})
        assert r.status == 201, r.body
        rid = r.json["id"]
        assert master.api("PATCH", "/instances/" + rid, {"alias": "web"}).status == 200
        wait_serving(port, payload=b"through the master's instance")
        with pytest.raises(Denied) as denied:
            scrape(master.port, "/api/v1/metrics")
        assert denied.value.status == 401
        deadline = time.monotonic() + 10
        key = 'npgevent_bytes_total{alias="web",direction="rx",instance_id="%s",protocol="tcp"}' % rid
        while True:
            m = scrape(master.port, "/api/v1/metrics", key=master.key)
            child_series = 'npgevent_session_limit{alias="web",instance_id="%s"}' % rid
            if m.get(key, 0) >= len(b"through the master's instance") and child_series in m:
                break
            assert time.monotonic() < deadline, m
            gevent.sleep(0.3)
        assert m['npgevent_instance_running{alias="web",instance_id="%s"}' % rid] == 1
        # the instance's own series, gathered from its process and labelled
        labels = '{alias="web",instance_id="%s"}' % rid
        assert m["npgevent_session_limit" + labels] == 65536
        assert m["npgevent_dial_failures_total" + labels] == 0
        assert m['npgevent_udp_dropped_total{alias="web",cause="slot_limit",instance_id="%s"}' % rid] == 0
        assert sum(1 for k in m if k.startswith("npgevent_bytes_total{")) == 4  # one set, from the record
    finally:
        master.stop()
        master.close()
        echo.close()


# -- a real Prometheus server ---------------------------------------------------------------

def prometheus_binary() -> str | None:
    return shutil.which("prometheus") or (os.path.exists("/usr/bin/prometheus") and "/usr/bin/prometheus") or None


@pytest.mark.skipif(prometheus_binary() is None,
                    reason="no prometheus binary (Debian package 'prometheus'; .ci/run installs it)")
def test_a_real_prometheus_scrapes_a_series_that_moved(tmp_path):
    echo = EchoPair()
    port, mport, pport = free_port(), free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: npgevent\n"
                      "    static_configs:\n      - targets: ['127.0.0.1:%d']\n" % mport)
    inst = NpProcess("client://127.0.0.1:%d/127.0.0.1:%d?metrics=127.0.0.1:%d" % (port, echo.port, mport))
    prom = subprocess.Popen([prometheus_binary(), "--config.file=%s" % config,
                             "--storage.tsdb.path=%s" % (tmp_path / "data"),
                             "--web.listen-address=127.0.0.1:%d" % pport],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        inst.wait_for(r"Metrics: http://")
        payload = b"p" * 4096
        wait_serving(port, payload=payload)
        query = 'npgevent_bytes_total{job="npgevent",protocol="tcp",direction="tx"}'
        deadline = time.monotonic() + 40
        value = None
        while time.monotonic() < deadline:
            try:
                r = http("GET", pport, "/api/v1/query?query=%s" % urllib.parse.quote(query), timeout=3)
                data = json.loads(r.body)
                result = data["data"]["result"]
                if result and float(result[0]["value"][1]) >= len(payload):
                    value = float(result[0]["value"][1])
                    break
            except (OSError, ValueError, KeyError):
                pass
            gevent.sleep(0.5)
        assert value is not None and value >= len(payload), "Prometheus never saw the bytes move"
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait(5)
        if prom.stderr is not None:
            prom.stderr.close()
        inst.close()
        echo.close()


def test_series_names_are_stable():
    """The dashboard in etc/ and operators' alerts depend on these names."""
    from npgevent.metrics import FAILURE_KINDS, RESTART_REASONS

    assert FAILURE_KINDS == ("handshake", "auth", "pool_admission")
    assert "control_closed" in RESTART_REASONS and "other" in RESTART_REASONS
    assert all(re.fullmatch(r"[a-z_]+", r) for r in RESTART_REASONS)


def test_the_grafana_dashboard_is_valid_json_and_queries_only_existing_series():
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parents[2] / "etc" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 8 and all(p["datasource"]["type"] == "prometheus" for p in dashboard["panels"])
    with metrics_tunnel() as (_s, _uport, mport):
        scraped = scrape(mport)
    names = {k.split("{")[0] for k in scraped}
    labels = {m for k in scraped for m in re.findall(r"(\w+)=", k.partition("{")[2])} | {"le", "job", "instance"}
    for expr in exprs:
        used = set(re.findall(r"\bnpgevent_[a-z_]+", expr))
        assert used and used <= names, (expr, used - names)
        for group in re.findall(r"by \(([^)]*)\)", expr):
            assert {g.strip() for g in group.split(",")} <= labels, expr


def test_the_metrics_port_holds_against_idle_and_garbage_connections():
    """An attacker who reaches metrics=: connections that never send a request are closed
    after the header deadline, more than the per-address cap are refused at once, garbage
    gets a 400, and a scrape still answers (the master API's limits, http_* settings)."""
    from gevent import socket as gsocket

    echo = EchoPair()
    port, mport = free_port(), free_port()
    url = "client://127.0.0.1:%d/127.0.0.1:%d?metrics=127.0.0.1:%d" % (port, echo.port, mport)
    idle: list = []
    try:
        with in_process(url, http_header_timeout="1s", http_max_conns_per_ip="16") as c:
            for _ in range(40):
                idle.append(gsocket.create_connection(("127.0.0.1", mport), timeout=5))
            gevent.sleep(0.3)
            refused = 0
            for sock in idle[16:]:  # over the cap: closed by the server at once
                sock.settimeout(2)
                if sock.recv(100) == b"":
                    refused += 1
            assert refused == 24
            gevent.sleep(1.5)  # the first 16 passed their header deadline meanwhile
            garbage = gsocket.create_connection(("127.0.0.1", mport), timeout=5)
            garbage.settimeout(5)
            garbage.sendall(b"\x16\x03\x01 not HTTP at all\r\n\r\n")
            assert garbage.recv(100).startswith(b"HTTP/1.1 400")
            garbage.close()
            for sock in idle[:16]:
                sock.settimeout(2)
                assert sock.recv(100) in (b"", b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                                          b"Content-Length: 0\r\n\r\n")
            wait_serving(port)
            assert scrape(mport)["npgevent_session_limit"] == 65536
            assert c.core is not None
    finally:
        for sock in idle:
            sock.close()
        echo.close()
