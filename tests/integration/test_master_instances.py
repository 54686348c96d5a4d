"""Master instances: real child tunnels, statistics, SSE, persistence, restarts, failures."""

from __future__ import annotations

import json
import os
import re
import signal
import stat

import gevent
import pytest
from helpers import (
    EchoPair,
    MasterProcess,
    SSEReader,
    echo_roundtrip,
    free_port,
    http,
    in_process,
    paused,
    udp_roundtrip,
    wait_until,
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _children(master_pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as fh:
                    fields = fh.read().split(")")[-1].split()
                if int(fields[1]) == master_pid and fields[0] != "Z":
                    out.add(int(entry))
            except OSError:
                continue
    return out


def _create(master, url):
    res = master.api("POST", "/instances", {"url": url})
    assert res.status == 201, res.body
    return res.json["id"]


def test_single_end_instance_carries_bytes_and_reports_stats(tmp_path):
    echo = EchoPair()
    port = free_port()
    with MasterProcess(tmp_path / "s") as m:
        sse = SSEReader(m.port, "/api/v1/events", m.key)
        try:
            assert sse.wait(lambda e: "retry" in e)["retry"] == "retry: 3000"
            sse.wait(lambda e: e.get("type") == "initial" and e["instance"]["id"] == "********")
            assert sse.status == 200 and sse.headers["content-type"] == "text/event-stream"
            rid = _create(m, "client://127.0.0.1:%d/127.0.0.1:%d?mode=1" % (port, echo.port))
            created = sse.wait(lambda e: e.get("type") == "create")
            assert created["instance"]["id"] == rid and created["logs"] == ""
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)", created["time"])
            sse.wait(lambda e: e.get("type") == "update" and e["instance"]["status"] == "running")
            log = sse.wait(lambda e: e.get("type") == "log" and "Client started" in e["logs"])
            assert "\x1b[32mINFO\x1b[0m" in log["logs"]  # children colour their lines, as Go's do
            m.wait_for(r"Client started: .* \[%s\]$" % rid)  # echoed with the id suffix
            assert echo_roundtrip(port, b"x" * 5000) == b"x" * 5000
            assert udp_roundtrip(port, b"udp!") == b"udp!"
            upd = sse.wait(lambda e: e.get("type") == "update" and e["instance"]["tcprx"] >= 5000
                           and e["instance"]["udptx"] >= 4)
            assert upd["instance"]["mode"] == 1 and upd["instance"]["pool"] == 0
            rec = m.api("GET", "/instances/" + rid).json
            assert rec["status"] == "running" and rec["tcprx"] >= 5000 and rec["tcptx"] >= 5000
            # no CHECK_POINT line is echoed or sent as a log event
            assert not any("CHECK_POINT" in e.get("logs", "") for e in sse.events if e.get("type") == "log")
            assert "CHECK_POINT" not in m.output
        finally:
            sse.close()
    echo.close()


def test_dual_end_pair_created_through_the_api(tmp_path):
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    with MasterProcess(tmp_path / "s", query="log=info&tls=1") as m:
        sid = _create(m, "server://k@127.0.0.1:%d/127.0.0.1:%d?mode=1" % (tport, uport))
        cid = _create(m, "client://k@127.0.0.1:%d/127.0.0.1:%d?mode=2" % (tport, echo.port))
        server = m.api("GET", "/instances/" + sid).json
        assert "tls=1" in server["url"]  # the master's TLS code is added to server URLs
        assert "tls=" not in m.api("GET", "/instances/" + cid).json["url"]
        wait_until(lambda: m.api("GET", "/instances/" + sid).json["pool"] > 0)
        assert echo_roundtrip(uport, b"through a managed tunnel") == b"through a managed tunnel"
        srv = wait_until(lambda: (lambda r: r if r["tcprx"] > 0 else None)(m.api("GET", "/instances/" + sid).json))
        assert srv["mode"] == 1 and srv["status"] == "running"
        cli = m.api("GET", "/instances/" + cid).json
        assert cli["mode"] == 2 and cli["pool"] > 0
    echo.close()


def test_stop_restart_delete_kill_the_child(tmp_path):
    with MasterProcess(tmp_path / "s") as m:
        rid = _create(m, "client://127.0.0.1:%d/127.0.0.1:9?mode=1" % free_port())
        pid = wait_until(lambda: next(iter(_children(m.pid)), None))
        assert m.api("PATCH", "/instances/" + rid, {"action": "stop"}).status == 200
        wait_until(lambda: not _alive(pid))
        wait_until(lambda: m.api("GET", "/instances/" + rid).json["status"] == "stopped")
        m.wait_for(r"INFO  Instance stopped \[%s\]" % rid)
        m.api("PATCH", "/instances/" + rid, {"action": "start"})
        pid2 = wait_until(lambda: next(iter(_children(m.pid)), None))
        assert pid2 != pid
        m.api("PATCH", "/instances/" + rid, {"action": "restart"})
        pid3 = wait_until(lambda: next(iter(_children(m.pid) - {pid2}), None))
        wait_until(lambda: not _alive(pid2))
        assert m.api("DELETE", "/instances/" + rid).status == 204
        wait_until(lambda: not _alive(pid3))
        assert _children(m.pid) == set()
        assert m.stop() == 0


def test_a_stop_right_after_start_is_not_lost(tmp_path):
    """A panel that creates (or starts) an instance and stops it at once: the stop must win
    even while the child is still being spawned (its status not yet "running"), and leave
    no child behind and the record "stopped"."""
    with MasterProcess(tmp_path / "s") as m:
        for _ in range(5):
            rid = _create(m, "client://127.0.0.1:%d/127.0.0.1:9?mode=1" % free_port())
            assert m.api("PATCH", "/instances/" + rid, {"action": "stop"}).status == 200
            wait_until(lambda: not _children(m.pid))
            wait_until(lambda rid=rid: m.api("GET", "/instances/" + rid).json["status"] == "stopped")
            gevent.sleep(0.5)  # a start that slipped past the stop would show up by now
            assert _children(m.pid) == set()
            assert m.api("GET", "/instances/" + rid).json["status"] == "stopped"
            assert m.api("PATCH", "/instances/" + rid, {"action": "start"}).status == 200
            assert m.api("PATCH", "/instances/" + rid, {"action": "stop"}).status == 200
            wait_until(lambda: not _children(m.pid))
            assert m.api("DELETE", "/instances/" + rid).status == 204


def test_sse_events_key_in_query_keepalive_and_regeneration(tmp_path):
    with MasterProcess(tmp_path / "s") as m:
        assert SSEReader(m.port, "/api/v1/events", "wrong", in_query=True).reader.join(5) is None
        q = SSEReader(m.port, "/api/v1/events", m.key, in_query=True)  # EventSource-friendly
        h = SSEReader(m.port, "/api/v1/events", m.key)
        try:
            q.wait(lambda e: e.get("type") == "initial")
            h.wait(lambda e: e.get("type") == "initial")
            # ?key= is accepted on /events only
            assert http("GET", m.port, "/api/v1/instances?key=" + m.key).status == 401
            rid = _create(m, "client://127.0.0.1:%d/127.0.0.1:9?mode=1" % free_port())
            m.api("PATCH", "/instances/" + rid, {"alias": "a1"})
            upd = h.wait(lambda e: e.get("type") == "update" and e["instance"]["alias"] == "a1")
            assert set(upd) == {"type", "time", "instance", "logs"}
            m.api("DELETE", "/instances/" + rid)
            gone = h.wait(lambda e: e.get("type") == "delete")
            assert gone["instance"]["id"] == rid
            # regenerating the key ends every stream with "shutdown" and invalidates the old key
            old = m.key
            res = m.api("PATCH", "/instances/********", {"action": "restart"})
            assert res.status == 200 and re.fullmatch(r"[0-9a-f]{32}", res.json["url"]) and res.json["url"] != old
            for reader in (q, h):
                assert reader.wait(lambda e: e.get("type") == "shutdown")["instance"] is None
                wait_until(lambda reader=reader: reader.closed, 5)
            assert m.api("GET", "/instances").status == 401
            m.key = res.json["url"]
            assert m.api("GET", "/instances").status == 200
            m.wait_for("API Key regenerated: " + m.key)
        finally:
            q.close()
            h.close()


def test_sse_keepalive_comment_in_process(tmp_path, monkeypatch):
    from npgevent.master import events

    monkeypatch.setattr(events, "KEEPALIVE", 0.3)
    monkeypatch.setenv("NP_STATE_DIR", str(tmp_path))
    port = free_port()
    from npgevent.log import InstanceLog
    from npgevent.master.core import Master
    from npgevent.settings import resolve
    from npgevent.url import parse_url

    spec = parse_url("master://127.0.0.1:%d/admin" % port)
    opts, _ = resolve("master", spec.query_map, {"state_dir": str(tmp_path)})
    master = Master(spec, opts, InstanceLog("none"))
    master.start()
    try:
        key = master.instances.key.url
        reader = SSEReader(port, "/admin/v1/events", key)
        reader.wait(lambda e: e.get("type") == "initial")
        assert reader.wait(lambda e: "comment" in e, timeout=3)["comment"] == ": keepalive"
        reader.close()
    finally:
        master.stop(0)


def test_master_restart_reloads_and_autostarts(tmp_path):
    state = tmp_path / "s"
    echo = EchoPair()
    port = free_port()
    with MasterProcess(state) as m:
        key = m.key
        auto = _create(m, "client://127.0.0.1:%d/127.0.0.1:%d?mode=1" % (port, echo.port))
        manual = _create(m, "client://127.0.0.1:%d/127.0.0.1:9?mode=1" % free_port())
        m.api("PATCH", "/instances/" + manual, {"restart": False})
        assert echo_roundtrip(port, b"before") == b"before"
        wait_until(lambda: m.api("GET", "/instances/" + auto).json["tcprx"] >= 6)
        assert m.stop() == 0
        assert "Instances saved: " in m.output
    path = state / "npgevent.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    saved = json.loads(path.read_text())
    assert {r["id"] for r in saved["records"]} == {"********", auto, manual}
    with MasterProcess(state) as m2:
        assert m2.key == key
        m2.wait_for(r"INFO  API Key loaded: " + key)
        m2.wait_for(r"Loaded 3 instances from ")
        m2.wait_for(r"Auto-starting instance: .* \[%s\]" % auto)
        wait_until(lambda: m2.api("GET", "/instances/" + auto).json["status"] == "running")
        assert echo_roundtrip(port, b"after restart") == b"after restart"
        rec = wait_until(lambda: (lambda r: r if r["tcprx"] >= 6 + 13 else None)(
            m2.api("GET", "/instances/" + auto).json))
        assert rec["tcprx"] >= 19  # counters carried over the master restart
        assert m2.api("GET", "/instances/" + manual).json["status"] == "stopped"
        # reset: reads 0, then grows with new traffic only
        m2.api("PATCH", "/instances/" + auto, {"action": "reset"})
        assert m2.api("GET", "/instances/" + auto).json["tcprx"] == 0
        assert echo_roundtrip(port, b"12345") == b"12345"
        wait_until(lambda: m2.api("GET", "/instances/" + auto).json["tcprx"] == 5)
        m2.api("PATCH", "/instances/" + auto, {"action": "reset"})  # a second reset works too
        assert echo_roundtrip(port, b"123") == b"123"
        wait_until(lambda: m2.api("GET", "/instances/" + auto).json["tcprx"] == 3)
    echo.close()


def test_corrupt_state_file_is_moved_aside(tmp_path):
    state = tmp_path / "s"
    state.mkdir()
    (state / "npgevent.json").write_text("{this is not json")
    with MasterProcess(state) as m:
        m.wait_for(r"ERROR  State file .*npgevent\.json is unreadable .*moved to .*corrupt-")
        assert m.wait_for(r"API Key created: ")
        assert m.api("GET", "/instances").status == 200
    aside = [p.name for p in state.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and (state / aside[0]).read_text() == "{this is not json"


def test_backup_is_used_when_the_state_file_is_corrupt(tmp_path):
    state = tmp_path / "s"
    with MasterProcess(state, env={"NP_RELOAD_INTERVAL": "1s"}) as m:
        key = m.key
        m.wait_for(r"State backup saved: ")
    (state / "npgevent.json").write_text("garbage")
    with MasterProcess(state) as m2:
        m2.wait_for(r"WARN  Loaded the backup ")
        assert m2.key == key


def test_stale_checkpoint_and_error_lines_set_error(tmp_path):
    with MasterProcess(tmp_path / "s") as m:
        rid = _create(m, "client://127.0.0.1:%d/127.0.0.1:9?mode=1" % free_port())
        wait_until(lambda: m.api("GET", "/instances/" + rid).json["mode"] == 1)
        pid = next(iter(_children(m.pid)))
        with paused(pid):  # the child goes silent
            wait_until(lambda: m.api("GET", "/instances/" + rid).json["status"] == "error", timeout=10)
        wait_until(lambda: m.api("GET", "/instances/" + rid).json["status"] == "running", timeout=10)
        # a tunnel client whose server is not there logs "Client error:" lines
        bad = _create(m, "client://127.0.0.1:%d/127.0.0.1:9?mode=2" % free_port())
        wait_until(lambda: m.api("GET", "/instances/" + bad).json["status"] == "error", timeout=10)


def test_child_exit_sets_error_and_no_orphans_after_master_sigkill(tmp_path):
    with MasterProcess(tmp_path / "s") as m:
        rid = _create(m, "client://127.0.0.1:%d/127.0.0.1:9?mode=1" % free_port())
        pid = wait_until(lambda: next(iter(_children(m.pid)), None))
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: m.api("GET", "/instances/" + rid).json["status"] == "error")
        m.wait_for(r"ERROR  monitorInstance: instance error: exit status -9 \[%s\]" % rid)
        m.api("PATCH", "/instances/" + rid, {"action": "restart"})
        pid2 = wait_until(lambda: next(iter(_children(m.pid)), None))
        m.signal(signal.SIGKILL)
        m.wait(5)
        wait_until(lambda: not _alive(pid2), timeout=10)  # PR_SET_PDEATHSIG: the child follows its master


def test_master_tls_api(tmp_path):
    with MasterProcess(tmp_path / "s", query="log=info&tls=1") as m:
        m.wait_for(r"INFO  TLS code-1: RAM cert with TLS 1\.3")
        res = m.api("GET", "/info", tls=True)
        assert res.status == 200 and res.json["tls"] == "1"
        from http.client import HTTPException

        with pytest.raises((OSError, HTTPException)):
            http("GET", m.port, "/api/v1/info", key=m.key)  # plain HTTP is not served


def test_master_listen_failure_is_one_clear_line(tmp_path):
    from gevent import socket
    from helpers import run_cli

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        rc, out, _err = run_cli("master://127.0.0.1:%d/api" % port, env={"NP_STATE_DIR": str(tmp_path)})
        assert rc == 1
        assert re.search(r"ERROR  listen tcp 127\.0\.0\.1:%d: address already in use" % port, out)
        assert "Traceback" not in out
    finally:
        blocker.close()


def test_in_process_master_serves_api(tmp_path):
    port = free_port()
    with in_process("master://127.0.0.1:%d/api?log=info" % port, state_dir=str(tmp_path),
                    wait_running=False) as master:
        master.running.wait(5)
        key = master.instances.key.url
        assert http("GET", port, "/api/v1/instances", key=key).status == 200
        assert http("GET", port, "/api/v1/info", key="bad").status == 401


def test_master_tls2_files_and_fallback(tmp_path):
    from helpers import make_ca_and_cert

    certs = make_ca_and_cert(tmp_path / "certs", cn="master-cert")
    q = "log=info&tls=2&crt=%s&key=%s" % (certs["crt"], certs["key"])
    with MasterProcess(tmp_path / "s", query=q) as m:
        m.wait_for(r"INFO  TLS code-2: master-cert with TLS 1\.3")
        info = m.api("GET", "/info").json
        assert (info["tls"], info["crt"], info["key"]) == ("2", str(certs["crt"]), str(certs["key"]))
        rid = _create(m, "server://127.0.0.1:%d/127.0.0.1:9?mode=2" % free_port())
        url = m.api("GET", "/instances/" + rid).json["url"]
        assert "tls=2" in url and "crt=" in url and "key=" in url  # code-2 settings passed on to servers
    q = "log=info&tls=2&crt=%s&key=%s" % (tmp_path / "missing.crt", tmp_path / "missing.key")
    with MasterProcess(tmp_path / "s2", query=q) as m:
        m.wait_for(r"ERROR  TLS code-2: cannot load .*falling back to code-1")
        assert m.api("GET", "/info").json["tls"] == "1"


def test_errored_instances_are_restarted_periodically(tmp_path):
    with MasterProcess(tmp_path / "s", env={"NP_RELOAD_INTERVAL": "2s"}) as m:
        m.wait_for(r"API Key")
        rid = _create(m, "client://127.0.0.1:%d/127.0.0.1:9?mode=1" % free_port())
        pid = wait_until(lambda: next(iter(_children(m.pid)), None))
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: m.api("GET", "/instances/" + rid).json["status"] == "error")
        new_pid = wait_until(lambda: next(iter(_children(m.pid) - {pid}), None), timeout=10)
        assert new_pid != pid
        wait_until(lambda: m.api("GET", "/instances/" + rid).json["status"] == "running")
        m.wait_for(r"State backup saved: ")
