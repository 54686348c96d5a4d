"""The master's instances: records, their child processes, statistics and events.

Each instance runs as a child process of npgevent itself
(``sys.executable -m npgevent <url>``), watched by gevent's subprocess support:

* its output is read line by line: a ``CHECK_POINT`` line updates mode, ping,
  pool, slot counts and byte counters (and turns ``error`` back into
  ``running``); a ``Server error:`` / ``Client error:`` line sets ``error``;
  every other line is echoed as ``<line> [<id>]`` and published as an SSE
  ``log`` event;
* stop sends SIGTERM and waits ``NP_SHUTDOWN_TIMEOUT`` + 1 s (the child drains
  its sessions meanwhile) before it kills; a child that exits by itself goes to
  ``error`` (non-zero status) or ``stopped``;
* the child asks the kernel for SIGTERM if the master dies (``PR_SET_PDEATHSIG``),
  so a killed master leaves no orphan tunnels;
* every ``NP_REPORT_INTERVAL`` a running instance whose last CHECK_POINT is older
  than three intervals goes to ``error``; every ``NP_RELOAD_INTERVAL`` the state
  file is backed up and errored instances are restarted.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable

import gevent
from gevent import subprocess
from gevent.lock import RLock

from ..childproc import preexec
from ..log import CHECKPOINT_RE, InstanceLog
from .events import EventHub
from .metrics import CHILD_METRICS
from .records import KEY_ID, MasterTLS, Record, config_url, enhance_url, split_url
from .store import StateStore

METRICS_LINE = re.compile(r"Metrics: http://(127\.0\.0\.1:\d+)/metrics")



class Managed:
    """A record plus its running child (if any)."""

    __slots__ = ("deleting", "last_checkpoint", "lock", "metrics_addr", "proc", "rec", "start_pending",
                 "stopping")

    def __init__(self, rec: Record) -> None:
        self.rec = rec
        self.lock = RLock()  # start/stop/restart of one instance never interleave
        self.start_pending = False  # a background start was asked for and has not run yet
        self.proc: subprocess.Popen | None = None
        self.last_checkpoint = 0.0
        self.deleting = False
        self.stopping = False
        self.metrics_addr = ""  # where the running child serves /metrics (from its log line)


class Instances:
    def __init__(self, log: InstanceLog, hub: EventHub, store: StateStore, mtls: MasterTLS,
                 report_interval: float, grace: float, echo: Callable[[str], None] | None = None) -> None:
        self.log = log
        self.hub = hub
        self.store = store
        self.mtls = mtls
        self.report_interval = report_interval
        self.grace = grace
        self.echo = echo or _stdout
        self.items: dict[str, Managed] = {}
        self.key: Record | None = None
        self._save_timer: gevent.Greenlet | None = None
        self.child_env = dict(os.environ)
        self.child_env["FORCE_COLOR"] = "1"  # NodePass children always colour their lines
        self.child_env["NP_LOG_FORMAT"] = "text"  # the master parses its children's lines
        # each child serves its series on an ephemeral loopback port, the master gathers them
        # (and a metrics= of the master's own environment is never inherited)
        self.child_env["NP_METRICS"] = CHILD_METRICS
        pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (pkg_parent, self.child_env.get("PYTHONPATH", "")) if p)

    # -- records ------------------------------------------------------------------------
    def all_records(self) -> list[Record]:
        out = [self.key] if self.key is not None else []
        return out + [m.rec for m in self.items.values()]

    def metrics_address(self, rid: str) -> str:
        """``host:port`` of a running instance's own /metrics ('' if none)."""
        m = self.items.get(rid)
        return m.metrics_addr if m is not None and m.proc is not None else ""

    def get(self, rid: str) -> Record | None:
        if rid == KEY_ID:
            return self.key
        m = self.items.get(rid)
        return m.rec if m is not None else None

    def load(self, records: list[Record]) -> None:
        for rec in records:
            if rec.id == KEY_ID:
                self.key = rec
                continue
            rec.status = "stopped"
            rec.zero_live()
            if not rec.config:
                rec.config = config_url(rec.url, self.mtls)
            self.items[rec.id] = Managed(rec)

    def new_record(self, url: str) -> Record:
        """A stopped record for *url* (already checked for format and scheme)."""
        scheme = split_url(url)[0]
        rid = os.urandom(4).hex()
        if rid in self.items or rid == KEY_ID:
            raise KeyError(rid)
        enhanced = enhance_url(url, self.mtls)
        rec = Record(id=rid, type=scheme, status="stopped", url=enhanced,
                     config=config_url(enhanced, self.mtls), restart=True)
        self.items[rid] = Managed(rec)
        return rec

    def set_url(self, rec: Record, url: str) -> None:
        rec.url = url
        rec.type = split_url(url)[0]
        rec.config = config_url(url, self.mtls)

    def save_now(self) -> None:
        self.store.save(self.all_records())

    def save_soon(self, delay: float = 0.1) -> None:
        if self._save_timer is None or self._save_timer.dead:
            self._save_timer = gevent.spawn_later(delay, self.save_now)

    def publish(self, kind: str, rec: Record, logs: str = "") -> None:
        self.hub.publish(kind, rec.to_api(), logs)

    # -- children -----------------------------------------------------------------------
    def start(self, rid: str) -> None:
        m = self.items.get(rid)
        if m is None:
            return
        with m.lock:
            m.start_pending = False
            self._start(m)

    def start_soon(self, rid: str) -> None:
        """Start in the background; :meth:`busy` is true from now until the start is done."""
        m = self.items.get(rid)
        if m is None:
            return
        m.start_pending = True
        gevent.spawn(self.start, rid)

    def busy(self, rid: str) -> bool:
        """A start or stop of *rid* is pending or in progress (its status may not show it yet)."""
        m = self.items.get(rid)
        return m is not None and (m.start_pending or m.lock.locked())

    def _start(self, m: Managed) -> None:
        if m.proc is not None or m.deleting:
            return
        rec, rid = m.rec, m.rec.id
        rec.on_start()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "npgevent", rec.url], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.child_env,
                                    # own session: a Ctrl-C or a signal to the master's process group
                                    # does not hit the children; the master stops them itself
                                    start_new_session=True,
                                    preexec_fn=preexec())
        except OSError as exc:
            rec.status = "error"
            self.log.error("Instance start failed: %s [%s]", exc, rid)
            self.publish("update", rec)
            return
        m.proc = proc
        m.metrics_addr = ""
        m.last_checkpoint = 0.0
        rec.status = "running"
        self.log.info("Instance starting: %s [%s]", rec.url, rid)
        self.publish("update", rec)
        gevent.spawn(self._read, m, proc)
        gevent.spawn(self._monitor, m, proc)

    def _read(self, m: Managed, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        rec = m.rec
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            match = CHECKPOINT_RE.search(line)
            if match:
                rec.apply_checkpoint(match)
                m.last_checkpoint = time.monotonic()
                if rec.status == "error":
                    rec.status = "running"
                if not m.deleting:
                    self.publish("update", rec)
                continue
            if not m.metrics_addr and "Metrics: http://" in line:
                found = METRICS_LINE.search(line)
                m.metrics_addr = found.group(1) if found else ""
            self.echo("%s [%s]" % (line, rec.id))
            if "Server error:" in line or "Client error:" in line:
                rec.status = "error"
                rec.zero_live()
            if not m.deleting:
                self.publish("log", rec, line)

    def _monitor(self, m: Managed, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if m.proc is not proc or m.stopping:
            return
        m.proc = None
        rec = m.rec
        if code != 0:
            rec.status = "error"
            self.log.error("monitorInstance: instance error: exit status %d [%s]", code, rec.id)
        else:
            rec.status = "stopped"
        rec.zero_live()
        self.save_soon()
        if not m.deleting:
            self.publish("update", rec)

    def stop(self, rid: str) -> None:
        """Stop synchronously (SIGTERM, grace, kill); no-op if already stopped."""
        m = self.items.get(rid)
        if m is None:
            return
        with m.lock:
            self._stop(m)

    def _stop(self, m: Managed) -> None:
        rec, rid = m.rec, m.rec.id
        proc = m.proc
        if proc is None and rec.status == "stopped":
            return
        m.stopping = True
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self.grace)
                    self.log.info("Instance stopped [%s]", rid)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    self.log.warn("Instance force killed [%s]", rid)
        finally:
            m.proc = None
            m.stopping = False
        rec.status = "stopped"
        rec.zero_live()
        self.save_now()
        if not m.deleting:
            self.publish("update", rec)

    def restart(self, rid: str) -> None:
        m = self.items.get(rid)
        if m is None:
            return
        with m.lock:
            self._stop(m)
            gevent.sleep(0.1)
            self._start(m)

    def delete(self, rid: str) -> Record | None:
        m = self.items.get(rid)
        if m is None:
            return None
        with m.lock:
            m.deleting = True
            self._stop(m)
        del self.items[rid]
        self.save_now()
        return m.rec

    def stop_all(self) -> None:
        jobs = [gevent.spawn(self.stop, rid) for rid, m in self.items.items() if m.proc is not None]
        gevent.joinall(jobs, timeout=self.grace + 2)

    def pids(self) -> dict[str, int]:
        return {rid: m.proc.pid for rid, m in self.items.items() if m.proc is not None}

    # -- periodic tasks -----------------------------------------------------------------
    def check_stale(self) -> None:
        limit = 3 * self.report_interval
        now = time.monotonic()
        for m in self.items.values():
            rec = m.rec
            if m.proc is not None and m.last_checkpoint and now - m.last_checkpoint > limit:
                if rec.status != "error":
                    self.log.warn("Instance silent for %ds: error [%s]", int(now - m.last_checkpoint), rec.id)
                rec.status = "error"
                rec.zero_live()
                self.publish("update", rec)

    def restart_errored(self) -> None:
        for rid, m in list(self.items.items()):
            if m.rec.status == "error":
                self.restart(rid)

    def autostart(self) -> None:
        for rid, m in list(self.items.items()):
            if m.rec.restart and m.proc is None:
                self.log.info("Auto-starting instance: %s [%s]", m.rec.url, rid)
                self.start(rid)
                gevent.sleep(0.1)


def _stdout(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

