"""Deployment samples: etc/npgevent.conf, etc/supervisord.conf with a real supervisord, generated docs."""

from __future__ import annotations

import configparser
import os
import shutil
import sys
import time

import gevent
import pytest
from gevent import subprocess
from helpers import ROOT, echo_roundtrip, free_port

from npgevent import _docgen


def test_generated_docs_and_sample_config_are_current():
    for path, build in _docgen.TARGETS.items():
        assert path.read_text() == build(), "%s is stale: run python -m npgevent._docgen" % path


def _supervisor(*args: str, conf: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", conf, *args],
                          capture_output=True, text=True, timeout=timeout)


def _npgevent_command() -> str:
    exe = shutil.which("npgevent")
    if exe:
        return exe
    return "%s %s" % (sys.executable, ROOT / "bin" / "npgevent")


@pytest.mark.timeout(90)
def test_supervisord_runs_forwarder_from_sample_config(tmp_path, tcp_echo):
    pytest.importorskip("supervisor")
    port = free_port()
    # npgevent.conf: the shipped sample with only the URL pointed at loopback ports
    sample = (ROOT / "etc" / "npgevent.conf").read_text()
    assert "\nurl = " in sample
    conf = tmp_path / "npgevent.conf"
    conf.write_text(sample.replace("url = client://127.0.0.1:8080/127.0.0.1:9000",
                                   "url = client://127.0.0.1:%d/127.0.0.1:%d" % (port, tcp_echo.port)))
    # supervisord.conf: the shipped sample with only file locations moved into tmp_path
    sup = configparser.RawConfigParser()
    sup.read(ROOT / "etc" / "supervisord.conf")
    sock = tmp_path / "s.sock"
    sup["unix_http_server"]["file"] = str(sock)
    sup["supervisord"]["logfile"] = str(tmp_path / "supervisord.log")
    sup["supervisord"]["pidfile"] = str(tmp_path / "supervisord.pid")
    sup["supervisorctl"]["serverurl"] = "unix://%s" % sock
    program = sup["program:npgevent"]
    assert program["command"] == "npgevent -c /etc/npgevent.conf"
    program["command"] = program["command"].replace("npgevent", _npgevent_command(), 1).replace(
        "/etc/npgevent.conf", str(conf))
    program["stdout_logfile"] = str(tmp_path / "npgevent.log")
    program["environment"] += ',PYTHONPATH="%s"' % ROOT
    sup_conf = tmp_path / "supervisord.conf"
    with open(sup_conf, "w") as fh:
        sup.write(fh)

    daemon = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(sup_conf)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        status = ""
        while time.monotonic() < deadline:
            status = _supervisor("status", "npgevent", conf=str(sup_conf)).stdout
            if "RUNNING" in status:
                break
            gevent.sleep(0.3)
        assert "RUNNING" in status, status
        pid = int(status.split("pid ")[1].split(",")[0])
        assert echo_roundtrip(port, b"through supervisord") == b"through supervisord"

        stop = _supervisor("stop", "npgevent", conf=str(sup_conf))
        assert "npgevent: stopped" in stop.stdout, stop.stdout + stop.stderr
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        log = (tmp_path / "npgevent.log").read_text()
        assert "Client started: client://" in log
        assert log.rstrip().endswith("Client shutdown complete")
        assert "Traceback" not in log
        sup_log = (tmp_path / "supervisord.log").read_text()
        assert "stopped: npgevent (exit status 0)" in sup_log, sup_log
    finally:
        _supervisor("shutdown", conf=str(sup_conf))
        try:
            daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=5)
