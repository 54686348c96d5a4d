"""Logging in NodePass's line format, through :mod:`logging`.

A line is ``YYYY-MM-DD HH:MM:SS.mmm  LEVEL  message`` (two spaces each side of
the level), the level ANSI-coloured only when the stream is a terminal.  Levels
are NodePass's: ``debug < info < warn < error < event``; ``none`` hides all.

Every instance logs through an :class:`InstanceLog`: its own threshold (the
URL's ``log=``) and an optional prefix, so several instances in one process (the
tests do that) keep their levels apart.  The master parses its children's
``CHECK_POINT`` lines, so :func:`checkpoint_line` is the one place that builds it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import IO, Any

DEBUG = logging.DEBUG  # 10
INFO = logging.INFO  # 20
WARN = logging.WARNING  # 30
ERROR = logging.ERROR  # 40
EVENT = 45
NONE = 100

LEVELS = {"debug": DEBUG, "info": INFO, "warn": WARN, "error": ERROR, "event": EVENT, "none": NONE}
_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARN: "WARN", ERROR: "ERROR", EVENT: "EVENT"}
_COLOURS = {DEBUG: "34", INFO: "32", WARN: "33", ERROR: "31", EVENT: "36"}

ROOT = "npgevent"


class NodePassFormatter(logging.Formatter):
    """Formats records exactly like NodePass's logger."""

    def __init__(self, colour: bool) -> None:
        super().__init__()
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        ct = record.created
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ct))
        millis = int((ct - int(ct)) * 1000)
        name = _NAMES.get(record.levelno) or record.levelname
        if self.colour:
            name = "\x1b[%sm%s\x1b[0m" % (_COLOURS.get(record.levelno, "0"), name)
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return "%s.%03d  %s  %s" % (stamp, millis, name, msg)


class JsonFormatter(logging.Formatter):
    """``log-format=json``: one JSON object per line for a log collector: ``time`` (RFC 3339,
    milliseconds), ``level``, ``message``, ``instance``, and for a ``CHECK_POINT`` line its
    fields as numbers (``mode``, ``ping_ms``, ``pool``, ``tcps``, ``udps``, ``tcprx``,
    ``tcptx``, ``udprx``, ``udptx``)."""

    def __init__(self, instance: str = "") -> None:
        super().__init__()
        self.instance = instance

    def format(self, record: logging.LogRecord) -> str:
        ct = record.created
        local = time.localtime(ct)
        offset = time.strftime("%z", local)
        zone = "Z" if offset in ("", "+0000") else offset[:3] + ":" + offset[3:]
        msg = record.getMessage()
        out: dict[str, Any] = {
            "time": "%s.%03d%s" % (time.strftime("%Y-%m-%dT%H:%M:%S", local), int((ct % 1) * 1000), zone),
            "level": _NAMES.get(record.levelno) or record.levelname,
            "message": msg,
            "instance": self.instance,
        }
        m = CHECKPOINT_RE.search(msg)
        if m:
            out.update(zip(CHECKPOINT_FIELDS, (int(v) for v in m.groups()), strict=True))
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(stream: IO[str] | None = None, colour: bool | None = None, fmt: str = "text",
          instance: str = "") -> logging.Handler:
    """Send npgevent's records to *stream* (stdout): NodePass's format, or with
    ``fmt="json"`` :class:`JsonFormatter`'s."""
    out = stream if stream is not None else sys.stdout
    if colour is None:
        try:
            colour = out.isatty()
        except (AttributeError, ValueError):
            colour = False
        # FORCE_COLOR / NO_COLOR conventions (the master sets FORCE_COLOR for its children,
        # whose lines it relays as NodePass does: coloured)
        if os.environ.get("FORCE_COLOR", "") not in ("", "0"):
            colour = True
        if os.environ.get("NO_COLOR"):
            colour = False
    logger = logging.getLogger(ROOT)
    for old in list(logger.handlers):
        if getattr(old, "_npgevent", False):
            logger.removeHandler(old)
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter(instance) if fmt == "json" else NodePassFormatter(colour))
    handler._npgevent = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(DEBUG)
    logger.propagate = False
    return handler


class Throttle:
    """Collapses a repeated log line: at most one per *key* every *window* seconds.

    ``admit(key)`` answers ``None`` while the line is to be suppressed (and counts
    it), or the number suppressed since the last one that went out (0 the first
    time), which the caller appends as ``(N more in the last 5 s)``.  Plain
    Python, no gevent: the QUIC thread uses one of its own.  Keys are a fixed set
    of message kinds chosen by the code, never data from the network, and the
    table is bounded all the same.
    """

    MAX_KEYS = 256

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self._seen: dict[str, list[float]] = {}  # key -> [time last logged, suppressed since]

    def admit(self, key: str, now: float | None = None) -> int | None:
        now = time.monotonic() if now is None else now
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.window:
            entry[1] += 1
            return None
        if entry is None and len(self._seen) >= self.MAX_KEYS:
            self._seen.clear()
        suppressed = int(entry[1]) if entry is not None else 0
        self._seen[key] = [now, 0]
        return suppressed

    def suffix(self, suppressed: int) -> str:
        return " (%d more in the last %g s)" % (suppressed, self.window) if suppressed else ""


class InstanceLog:
    """A per-instance logger: own threshold, optional ``[prefix]``, rate-limited lines."""

    __slots__ = ("_logger", "_throttle", "level", "prefix")

    def __init__(self, level: str = "info", prefix: str = "", name: str = ROOT) -> None:
        self._logger = logging.getLogger(name)
        self.level = LEVELS.get(level, INFO)
        self.prefix = "[%s] " % prefix if prefix else ""
        self._throttle = Throttle()

    def limited(self, level: int, key: str, msg: str, *args: Any) -> None:
        """Log like :meth:`log`, but a line of kind *key* at most once per 5 s; the next one
        that goes out says how many were held back (attacker-driven lines go through here)."""
        if level < self.level:
            return
        suppressed = self._throttle.admit(key)
        if suppressed is not None:
            self.log(level, (msg % args if args else msg) + self._throttle.suffix(suppressed))

    def enabled(self, level: int) -> bool:
        return level >= self.level

    def log(self, level: int, msg: str, *args: Any, exc_info: Any = None) -> None:
        if level >= self.level:
            if self.prefix:
                msg = self.prefix + msg
            self._logger.log(level, msg, *args, exc_info=exc_info)

    def debug(self, msg: str, *args: Any, exc_info: Any = None) -> None:
        if self.level <= DEBUG:
            self.log(DEBUG, msg, *args, exc_info=exc_info)

    def info(self, msg: str, *args: Any) -> None:
        if self.level <= INFO:
            self.log(INFO, msg, *args)

    def warn(self, msg: str, *args: Any) -> None:
        if self.level <= WARN:
            self.log(WARN, msg, *args)

    def error(self, msg: str, *args: Any, exc_info: Any = None) -> None:
        if self.level <= ERROR:
            self.log(ERROR, msg, *args, exc_info=exc_info)

    def event(self, msg: str, *args: Any) -> None:
        if self.level <= EVENT:
            self.log(EVENT, msg, *args)


CHECKPOINT_RE = re.compile(
    r"CHECK_POINT\|MODE=(\d+)\|PING=(\d+)ms\|POOL=(\d+)\|TCPS=(\d+)\|UDPS=(\d+)\|"
    r"TCPRX=(\d+)\|TCPTX=(\d+)\|UDPRX=(\d+)\|UDPTX=(\d+)")
CHECKPOINT_FIELDS = ("mode", "ping_ms", "pool", "tcps", "udps", "tcprx", "tcptx", "udprx", "udptx")


def checkpoint_line(mode: int, ping_ms: int, pool: int, tcps: int, udps: int,
                    tcprx: int, tcptx: int, udprx: int, udptx: int) -> str:
    """The EVENT line panels and the master parse (format fixed by NodePass)."""
    return "CHECK_POINT|MODE=%d|PING=%dms|POOL=%d|TCPS=%d|UDPS=%d|TCPRX=%d|TCPTX=%d|UDPRX=%d|UDPTX=%d" % (
        mode, ping_ms, pool, tcps, udps, tcprx, tcptx, udprx, udptx)
