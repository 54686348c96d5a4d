"""NodePass's log line format and the CHECK_POINT line."""

import io
import logging
import re

from npgevent.log import EVENT, InstanceLog, NodePassFormatter, checkpoint_line, setup


def _record(level, msg):
    return logging.LogRecord("npgevent", level, __file__, 1, msg, (), None)


def test_line_format_plain_and_coloured():
    plain = NodePassFormatter(colour=False).format(_record(logging.WARNING, "TLS code-0: unencrypted"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}  WARN  TLS code-0: unencrypted", plain)
    coloured = NodePassFormatter(colour=True).format(_record(EVENT, "CHECK_POINT|x"))
    assert re.fullmatch(r".{23}  \x1b\[36mEVENT\x1b\[0m  CHECK_POINT\|x", coloured)
    info = NodePassFormatter(colour=True).format(_record(logging.INFO, "m"))
    assert "\x1b[32mINFO\x1b[0m" in info


def test_checkpoint_line_exact():
    assert checkpoint_line(2, 12, 64, 3, 1, 10, 20, 30, 40) == (
        "CHECK_POINT|MODE=2|PING=12ms|POOL=64|TCPS=3|UDPS=1|TCPRX=10|TCPTX=20|UDPRX=30|UDPTX=40")


def test_master_regex_matches_our_line():
    rx = re.compile(r"CHECK_POINT\|MODE=(\d+)\|PING=(\d+)ms\|POOL=(\d+)\|TCPS=(\d+)\|UDPS=(\d+)\|"
                    r"TCPRX=(\d+)\|TCPTX=(\d+)\|UDPRX=(\d+)\|UDPTX=(\d+)")
    assert rx.search(checkpoint_line(1, 0, 0, 0, 0, 1, 2, 3, 4)).groups() == tuple("100001234")


def test_instance_levels_and_prefix():
    out = io.StringIO()
    handler = setup(out, colour=False)
    try:
        warn = InstanceLog("warn", prefix="inst1")
        warn.info("hidden")
        warn.warn("shown %d", 1)
        warn.event("event shown")
        none = InstanceLog("none")
        none.event("never")
        text = out.getvalue()
        assert "hidden" not in text and "never" not in text
        assert "  WARN  [inst1] shown 1" in text
        assert "  EVENT  [inst1] event shown" in text
    finally:
        logging.getLogger("npgevent").removeHandler(handler)


def test_not_a_tty_means_no_colour():
    out = io.StringIO()
    handler = setup(out)
    try:
        InstanceLog("info").info("plain")
        assert "\x1b[" not in out.getvalue()
    finally:
        logging.getLogger("npgevent").removeHandler(handler)
