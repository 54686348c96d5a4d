"""SIGHUP reload: real processes, real signals, a config file edited between them."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import gevent
import pytest
from gevent import socket
from helpers import (
    EchoPair,
    NpProcess,
    children,
    echo_exact,
    exchange,
    free_port,
    make_ca_and_cert,
    ppid,
    served_of_held,
    wait_serving,
)

pytestmark = pytest.mark.timeout(120)


def write_conf(path: Path, **items: str) -> None:
    path.write_text("".join("%s = %s\n" % (k.replace("_", "-"), v) for k, v in items.items()))


def hup(proc: NpProcess) -> int:
    mark = len(proc.lines)
    proc.signal(signal.SIGHUP)
    proc.wait_for(r"Reload: SIGHUP received", start=mark)
    return mark


def test_live_settings_apply_without_dropping_a_session(tmp_path):
    old, new = EchoPair(), EchoPair()
    port = free_port()
    conf = tmp_path / "npgevent.conf"
    write_conf(conf, url="client://127.0.0.1:%d/127.0.0.1:%d" % (port, old.port), log="info", slot="100")
    proc = NpProcess("-c", str(conf))
    live = None
    try:
        wait_serving(port)
        live = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert exchange(live, b"before the reload") == b"before the reload"
        accepted = old.tcp.accepted
        write_conf(conf, url="client://127.0.0.1:%d/127.0.0.1:%d" % (port, new.port), log="debug", slot="50",
                   rate="100")
        mark = hup(proc)
        proc.wait_for(r"INFO\s+Reload: applied (?=.*log)(?=.*slot)(?=.*rate)(?=.*targets)", start=mark)
        assert exchange(live, b"after the reload, same session") == b"after the reload, same session"
        for _ in range(3):
            assert echo_exact(port, b"new sessions go to the new target") == b"new sessions go to the new target"
        assert new.tcp.accepted >= 3 and old.tcp.accepted == accepted
        proc.wait_for(r"DEBUG\s+Target connection: .* <-> 127\.0\.0\.1:%d" % new.port, start=mark)  # log=debug
        assert proc.count(r"Client restart") == 0 and proc.proc.poll() is None
    finally:
        if live is not None:
            live.close()
        assert proc.stop() == 0
        proc.close()
        old.close()
        new.close()


def test_a_structural_change_restarts_the_core_and_live_sessions_carry_on(tmp_path):
    echo = EchoPair()
    port, port2 = free_port(), free_port()
    conf = tmp_path / "npgevent.conf"
    write_conf(conf, url="client://127.0.0.1:%d/127.0.0.1:%d" % (port, echo.port))
    proc = NpProcess("-c", str(conf))
    live = None
    try:
        wait_serving(port)
        live = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert exchange(live, b"one") == b"one"
        write_conf(conf, url="client://127.0.0.1:%d/127.0.0.1:%d" % (port2, echo.port))
        mark = hup(proc)
        proc.wait_for(r"Reload: tunnel address or key changed: the core restarts after the cooldown", start=mark)
        proc.wait_for(r"Client reload: settings changed", start=mark)
        proc.wait_for(r"Client restart: client://.*@127\.0\.0\.1:%d/" % port2, start=mark)
        wait_serving(port2)
        assert exchange(live, b"two: the session survived") == b"two: the session survived"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert proc.count(r"ERROR") == 0
    finally:
        if live is not None:
            live.close()
        proc.close()
        echo.close()


def test_a_reload_that_fails_validation_keeps_the_old_settings(tmp_path):
    echo = EchoPair()
    port = free_port()
    conf = tmp_path / "npgevent.conf"
    write_conf(conf, url="client://127.0.0.1:%d/127.0.0.1:%d" % (port, echo.port))
    proc = NpProcess("-c", str(conf))
    try:
        wait_serving(port)
        write_conf(conf, url="client://127.0.0.1:%d/127.0.0.1:%d" % (port, echo.port), slot="lots")
        mark = hup(proc)
        proc.wait_for(r"ERROR\s+Reload failed: invalid --slot/NP_SLOT 'lots': expected an integer.*: keeping "
                      r"the current settings", start=mark)
        wait_serving(port)
        conf.unlink()  # a config file that went away: also refused, still serving
        mark = hup(proc)
        proc.wait_for(r"ERROR\s+Reload failed: .*: keeping the current settings", start=mark)
        wait_serving(port)
        assert "Traceback" not in proc.output and proc.proc.poll() is None
    finally:
        assert proc.stop() == 0
        proc.close()
        echo.close()


def test_tls2_certificate_files_are_read_again(tmp_path):
    echo = EchoPair()
    first, second = make_ca_and_cert(tmp_path / "a", cn="first"), make_ca_and_cert(tmp_path / "b", cn="second")
    crt, key = tmp_path / "server.crt", tmp_path / "server.key"
    crt.write_bytes(first["crt"].read_bytes())
    key.write_bytes(first["key"].read_bytes())
    tport, uport = free_port(), free_port()
    proc = NpProcess("server://k@127.0.0.1:%d/127.0.0.1:%d?mode=1&tls=2&crt=%s&key=%s" % (tport, uport, crt, key))
    try:
        proc.wait_for(r"TLS code-2: first with TLS 1\.3")
        proc.wait_for(r"Server started")
        crt.write_bytes(second["crt"].read_bytes())
        key.write_bytes(second["key"].read_bytes())
        mark = hup(proc)
        m = proc.wait_for(r"TLS cert reloaded: second (sha256:\S+) \(was (sha256:\S+)\)", start=mark)
        assert m.group(1) != m.group(2)
        proc.wait_for(r"Reload: no setting changed", start=mark)
        key.write_text("not a key")  # a broken pair on the next reload: the current one stays
        mark = hup(proc)
        proc.wait_for(r"ERROR\s+TLS cert reload failed .*: keeping the current certificate", start=mark)
        assert proc.proc.poll() is None
    finally:
        proc.close()
        echo.close()


def test_the_master_reloads_its_own_settings_and_not_its_children(tmp_path):
    echo = EchoPair()
    conf = tmp_path / "master.conf"
    mport = free_port()
    write_conf(conf, log="info")
    proc = NpProcess("-c", str(conf), "master://127.0.0.1:%d/api" % mport,
                     env={"NP_STATE_DIR": str(tmp_path / "state")})
    try:
        proc.wait_for(r"Master started")
        key = proc.wait_for(r"API Key (?:created|loaded): ([0-9a-f]{32})").group(1)
        from helpers import http

        port = free_port()
        r = http("POST", mport, "/api/v1/instances", {"url": "client://127.0.0.1:%d/127.0.0.1:%d" % (port, echo.port)},
                 key=key)
        assert r.status == 201, r.body
        wait_serving(port)
        kids = children(proc.pid)
        assert len(kids) == 1
        child = kids[0]
        write_conf(conf, log="debug", http_idle_timeout="30s")
        mark = hup(proc)
        proc.wait_for(r"Reload: master settings applied \(log=debug\); instances not signalled", start=mark)
        gevent.sleep(1)
        assert ppid(child) == proc.pid  # the same child, untouched
        assert not any("Reload" in line and "[" in line for line in proc.lines[mark:])  # no child reloaded
        wait_serving(port)
        assert http("GET", mport, "/api/v1/instances", key=key).status == 200
    finally:
        assert proc.stop(20) == 0
        proc.close()
        echo.close()



def test_workers_pass_sighup_on(tmp_path):
    echo = EchoPair()
    port = free_port()
    conf = tmp_path / "npgevent.conf"
    write_conf(conf, url="client://127.0.0.1:%d/127.0.0.1:%d?workers=2" % (port, echo.port), log="info")
    proc = NpProcess("-c", str(conf))
    try:
        proc.wait_for(r"Worker 1 serving")
        proc.wait_for(r"Worker 0 serving")
        write_conf(conf, url="client://127.0.0.1:%d/127.0.0.1:%d?workers=2" % (port, echo.port), log="debug",
                   slot="10")
        mark = len(proc.lines)
        proc.signal(signal.SIGHUP)
        proc.wait_for(r"Reload: SIGHUP passed on to 2 workers", start=mark)
        deadline = time.monotonic() + 10
        while proc.count(r"Reload: applied") < 2:  # one per worker
            assert time.monotonic() < deadline, proc.output[-2000:]
            gevent.sleep(0.1)
        wait_serving(port)
    finally:
        assert proc.stop() == 0
        proc.close()
        echo.close()


def test_a_reloaded_slot_stays_the_instances_total_over_workers(tmp_path):
    """slot=64 -> 4 by SIGHUP with two workers: twelve held connections get exactly 4
    sessions in all (up to 8 if each worker took the whole 4 for itself)."""
    echo = EchoPair()
    port = free_port()
    conf = tmp_path / "npgevent.conf"
    url = "client://127.0.0.1:%d/127.0.0.1:%d?workers=2" % (port, echo.port)
    write_conf(conf, url=url, slot="64")
    proc = NpProcess("-c", str(conf))
    socks: list[socket.socket] = []
    try:
        proc.wait_for(r"Worker 1 serving")
        proc.wait_for(r"Worker 0 serving")
        wait_serving(port)
        write_conf(conf, url=url, slot="4")
        mark = len(proc.lines)
        proc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while proc.count(r"Reload: applied") < 2:  # one per worker
            assert time.monotonic() < deadline, proc.output[-2000:]
            gevent.sleep(0.1)
        gevent.sleep(0.3)  # the readiness probe's session is over
        served = served_of_held(port, 12, socks)
        assert served == 4, (served, "\n".join(proc.lines[mark:]))
    finally:
        for sock in socks:
            sock.close()
        assert proc.stop() == 0
        proc.close()
        echo.close()
