"""The npgevent command line as a real process: errors, help, precedence, signals."""

from __future__ import annotations

import re
import signal
import time

import gevent
import pytest
from gevent import socket
from helpers import ROOT, NpProcess, echo_roundtrip, free_port, run_cli

from npgevent.settings import SETTINGS

# {p} and {q} become free loopback ports at run time (nothing binds them: parsing fails first)
BAD_INPUTS = [
    # (argument, what the one-line error must mention)
    ("client://127.0.0.1:{p}/127.0.0.1:{q}?min=abc", r"min= 'abc': expected an integer"),
    ("client://127.0.0.1:{p}/127.0.0.1:{q}?read=5x", r"read= '5x': expected a Go duration"),
    ("client://127.0.0.1:{p}/127.0.0.1:{q}?mode=7", r"mode= '7': expected one of 0, 1, 2"),
    ("server://:{p}/127.0.0.1:{q}?tls=9", r"tls= '9': expected one of 0, 1, 2"),
    ("server://:{p}/127.0.0.1:{q}?log=loud", r"log= 'loud': expected one of none, debug"),
    ("server://:{p}/127.0.0.1:{q}?quic=2", r"quic= '2': expected 0 or 1"),
    ("server://:{p}/127.0.0.1:{q}?dns=1.1.1.1,nope", r"'nope' is not an IP address"),
    ("client://127.0.0.1:{p}/127.0.0.1:{q}?dial=notanip", r"dial= 'notanip': expected 'auto' or a local IP"),
    ("ftp://host:21/x:1", r"invalid URL scheme 'ftp'"),
    ("not a url", r"expected server://, client:// or master://"),
    ("client://127.0.0.1:{p}", r"missing target address"),
    ("client://127.0.0.1:{p}/", r"missing target address"),
    ("client://127.0.0.1:70000/127.0.0.1:{q}", r"port '70000': expected a number from 1 to 65535"),
    ("client://127.0.0.1:{p}/127.0.0.1:0", r"port '0': expected a number from 1 to 65535"),
    ("client://127.0.0.1:{p}/localhost", r"invalid target address 'localhost': expected host:port"),
    ("client://127.0.0.1:{p}/127.0.0.1:{p}", r"tunnel port {p} conflicts with target address"),
    ("server://:{p}/10.1.2.3:{p}", r"tunnel port {p} conflicts with target address 10\.1\.2\.3:{p}"),
]


@pytest.mark.parametrize(("arg", "expect"), BAD_INPUTS)
def test_bad_input_is_one_line_exit_2(arg, expect):
    ports = {"p": free_port(), "q": free_port()}
    arg, expect = arg.format(**ports), expect.format(**ports)
    rc, out, err = run_cli(arg)
    assert rc == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("npgevent: error: ")
    assert re.search(expect, lines[0]), lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(("env", "expect"), [
    ({"NP_TCP_DIAL_TIMEOUT": "abc"}, r"--tcp-dial-timeout/NP_TCP_DIAL_TIMEOUT 'abc': expected a Go duration"),
    ({"NP_SEMAPHORE_LIMIT": "1.5"}, r"NP_SEMAPHORE_LIMIT '1.5': expected an integer"),
])
def test_bad_env_value_exit_2(env, expect):
    rc, _out, err = run_cli("client://127.0.0.1:%d/127.0.0.1:%d" % (free_port(), free_port()), env=env)
    assert rc == 2
    assert re.search(expect, err.strip()), err
    assert len(err.splitlines()) == 1


def test_unknown_flag_one_line():
    rc, _out, err = run_cli("--no-such-flag", "client://127.0.0.1:%d/127.0.0.1:%d" % (free_port(), free_port()))
    assert rc == 2
    assert err.splitlines() == ["npgevent: error: unrecognized arguments: --no-such-flag"]


def test_missing_url():
    rc, _out, err = run_cli()
    assert rc == 2
    assert "missing NodePass URL" in err


def test_help_lists_every_option_with_default_and_env():
    rc, out, _err = run_cli("--help")
    assert rc == 0
    flat = " ".join(out.split())
    for s in SETTINGS:
        assert s.flag in flat, s.flag
        assert s.env in flat, s.env
        assert ("default %s" % (s.fmt(s.default) or "''")) in flat, s.name
    assert "-c CONFIG" in flat or "--config" in flat
    assert "(default:" not in flat  # each default once, from the settings table (not the formatter)


def test_version():
    rc, out, _err = run_cli("--version")
    assert rc == 0
    assert re.match(r"npgevent \d+\.\d+\.\d+ \(NodePass v1\.11\.0 compatible\)", out)


def test_out_of_range_values_keep_go_default_and_warn(tcp_echo, port):
    url = "client://127.0.0.1:%d/127.0.0.1:%d?min=0&rate=-1&slot=0&read=-5s" % (port, tcp_echo.port)
    with NpProcess(url) as np:
        line = np.wait_for(r"Client started: (.*)").group(1)
        assert "&min=64&" in line and "&rate=0&" in line and "&slot=65536" in line and "&read=0s&" in line
        for key, raw, default in (("min", "0", "64"), ("rate", "-1", "0"), ("slot", "0", "65536"),
                                  ("read", "-5s", "0s")):
            assert np.count(r"WARN  URL parameter %s= '%s' is out of range .*using default %s"
                            % (key, re.escape(raw), default)) == 1
        assert echo_roundtrip(port, b"works") == b"works"
        assert np.stop() == 0


def test_sigterm_clean_exit_with_live_connection(tcp_echo, port):
    with NpProcess("client://127.0.0.1:%d/127.0.0.1:%d" % (port, tcp_echo.port),
                   env={"NP_SHUTDOWN_TIMEOUT": "1s"}) as np:
        np.wait_for("Client started")
        held = socket.create_connection(("127.0.0.1", port), timeout=5)
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        start = time.monotonic()
        np.signal(signal.SIGTERM)
        assert np.wait(10) == 0
        assert time.monotonic() - start < 4  # NP_SHUTDOWN_TIMEOUT plus start-up slack
        assert np.lines[-1].endswith("INFO  Client shutdown complete")
        assert "Traceback" not in np.output
        held.close()


def test_sigint_clean_exit(tcp_echo, port):
    with NpProcess("client://127.0.0.1:%d/127.0.0.1:%d" % (port, tcp_echo.port)) as np:
        np.wait_for("Client started")
        np.signal(signal.SIGINT)
        assert np.wait(10) == 0
        assert "Client shutdown complete" in np.output


def test_address_in_use_is_one_clear_line_and_retries(tcp_echo, port):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen(1)
    try:
        with NpProcess("client://127.0.0.1:%d/127.0.0.1:%d?mode=1" % (port, tcp_echo.port)) as np:
            np.wait_for(r"ERROR  Client error: listen tcp 127\.0\.0\.1:%d: address already in use$" % port)
            np.wait_for(r"INFO  Client restart: client://")  # Go's restart loop
            blocker.close()
            np.wait_for(r"CHECK_POINT\|MODE=1", timeout=10)
            assert echo_roundtrip(port, b"after") == b"after"
            assert np.stop() == 0
            assert "Traceback" not in np.output
    finally:
        blocker.close()


CHECKPOINT = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}  EVENT  "
    r"CHECK_POINT\|MODE=1\|PING=\d+ms\|POOL=0\|TCPS=\d+\|UDPS=\d+\|TCPRX=\d+\|TCPTX=\d+\|UDPRX=\d+\|UDPTX=\d+$")


def test_checkpoint_line_format_and_interval(tcp_echo, port):
    with NpProcess("client://127.0.0.1:%d/127.0.0.1:%d" % (port, tcp_echo.port),
                   env={"NP_REPORT_INTERVAL": "300ms"}) as np:
        np.wait_for("Client started")
        assert echo_roundtrip(port, b"12345") == b"12345"
        np.wait_for(r"TCPRX=5\|TCPTX=5\|")
        gevent.sleep(1.0)
        lines = [line for line in np.lines if "CHECK_POINT" in line]
        assert len(lines) >= 3
        for line in lines:
            assert CHECKPOINT.match(line), line
        assert np.stop() == 0


def test_start_line_matches_go_format(tcp_echo, port):
    with NpProcess("client://secret@127.0.0.1:%d/127.0.0.1:%d?log=debug&min=2" % (port, tcp_echo.port)) as np:
        np.wait_for("Client started")
        assert np.lines[0].endswith("DEBUG  Init log level: DEBUG")
        line = np.wait_for(r"INFO  Client started: (.*)$").group(1)
        assert line == ("client://secret@127.0.0.1:%d/127.0.0.1:%d?dns=1.1.1.1,8.8.8.8&min=2&mode=0&quic=0"
                        "&dial=auto&read=0s&rate=0&slot=65536&proxy=0&notcp=0&noudp=0" % (port, tcp_echo.port))
        assert np.stop() == 0


def test_colour_only_on_a_tty(tcp_echo, port):
    with NpProcess("client://127.0.0.1:%d/127.0.0.1:%d" % (port, tcp_echo.port)) as np:
        np.wait_for("Client started")
        np.stop()
    # NpProcess strips ANSI codes for matching; read the raw bytes with a pipe again
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "npgevent", "client://127.0.0.1:1/x"],
                          capture_output=True, cwd=str(ROOT), timeout=20)
    assert b"\x1b[" not in proc.stdout + proc.stderr


def test_precedence_cli_env_config_url(tmp_path, tcp_echo, port):
    conf = tmp_path / "npgevent.conf"
    conf.write_text("# sample\nslot = 100\nrate = 1\nmin = 10\nread = 10s\nurl = client://127.0.0.1:%d/127.0.0.1:%d\n"
                    % (port, tcp_echo.port))
    env = {"NP_RATE": "2", "NP_MIN": "20", "NP_READ": "20s"}
    # config only: slot=100; env beats config: rate=2; CLI beats env: min=30; URL beats CLI: read=40s
    url = "client://127.0.0.1:%d/127.0.0.1:%d?read=40s" % (port, tcp_echo.port)
    with NpProcess("-c", str(conf), "--min", "30", "--read", "30s", url, env=env) as np:
        line = np.wait_for(r"Client started: (.*)").group(1)
        assert "&min=30&" in line
        assert "&read=40s&" in line
        assert "&rate=2&" in line
        assert "&slot=100&" in line
        assert np.stop() == 0
    # the URL itself may come from the config file
    with NpProcess("-c", str(conf), env=env) as np:
        line = np.wait_for(r"Client started: (.*)").group(1)
        assert "&min=20&" in line and "&read=20s&" in line and "&slot=100&" in line
        assert echo_roundtrip(port, b"conf") == b"conf"
        assert np.stop() == 0


def test_np_tunables_from_env_and_config(tmp_path, tcp_echo, port):
    conf = tmp_path / "c.conf"
    conf.write_text("report-interval = 200ms\n")
    with NpProcess("-c", str(conf), "client://127.0.0.1:%d/127.0.0.1:%d?log=debug" % (port, tcp_echo.port),
                   env={"NP_REPORT_INTERVAL": "", "NP_UDP_READ_TIMEOUT": "7s"}) as np:
        line = np.wait_for(r"DEBUG  Tunables: (.*)").group(1)
        assert "NP_REPORT_INTERVAL=200ms" in line
        assert "NP_UDP_READ_TIMEOUT=7s" in line
        np.wait_for("CHECK_POINT")
        np.wait_for("CHECK_POINT")
        assert np.stop() == 0
