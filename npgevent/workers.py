"""Workers: N processes serving one single-end forwarding instance (``workers=``).

The parent (:class:`Supervisor`) serves nothing itself.  It starts N copies of
the same command line (``python -m npgevent <argv>``, the same environment and
config file) with ``NPG_WORKER=<index>,<count>,<fd>``; each worker opens the
instance's TCP and UDP listeners with ``SO_REUSEPORT``, so the kernel spreads
new connections over them and keeps every datagram of one user address
(the 4-tuple hash) on the same worker, hence one UDP session per address.

* **Counters**: each worker writes its CHECK_POINT figures into its row of a
  shared memory block (``memfd``) every ``NP_REPORT_INTERVAL`` instead of
  logging them; the parent logs **one** CHECK_POINT line per interval with the
  counters summed (byte counters of workers that died are kept).  ``PING`` (a
  connect to the target, timed) is taken by one worker at a time, the lowest
  serving one, which the parent names in the block: the target sees one such
  connection per interval, as with one process.
* **Limits**: ``slot=`` and ``rate=`` stay the instance's totals: the group's
  live sessions and its token bucket are kept in the shared block
  (:mod:`npgevent.workerboard`), so a session is admitted wherever it lands
  while the group is below the limit, and a lone download may use the whole rate.
* **Supervision**: a worker that exits is started again after
  ``NP_SERVICE_COOLDOWN``; SIGTERM/SIGINT go to every worker, which drain
  within ``NP_SHUTDOWN_TIMEOUT``; workers die with the parent (PDEATHSIG).

Tunnels (server://, dual-end client://) run in one process: see docs/scaling.md.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.pool import Group

from .childproc import preexec
from .cli import WORKER_ENV
from .errors import ConfigError
from .log import DEBUG, InstanceLog, checkpoint_line
from .relay.limit import MBIT, Slots
from .settings import Options
from .url import TunnelSpec
from .workerboard import EMPTY, Board, SharedRateLimiter, SharedSlots

ENV = WORKER_ENV
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class WorkerRole:
    """This process is worker *index* of *count* (parsed from ``NPG_WORKER``)."""

    index: int
    count: int
    board: Board

    @classmethod
    def from_env(cls) -> WorkerRole | None:
        raw = os.environ.pop(ENV, "")
        if not raw:
            return None
        try:
            index, count, fd = (int(x) for x in raw.split(","))
            if not 0 <= index < count:
                raise ValueError("worker %d of %d" % (index, count))
            return cls(index, count, Board(count, fd))
        except (ValueError, OSError) as exc:
            raise ConfigError("%s=%r: expected <index>,<count>,<fd> from a parent npgevent (%s)"
                              % (ENV, raw, exc)) from None

    def adapt(self, runner: Any) -> None:
        """Make *runner*'s instance a part of the whole: SO_REUSEPORT listeners, ``slot=`` and
        ``rate=`` kept for the group in the board, and CHECK_POINT figures into the board
        instead of the log."""
        from .net import sockopt

        sockopt.REUSE_PORT = True
        inst = runner.inst
        runner.serve_metrics = False  # the parent serves the summed series
        board = self.board
        if board.has_live:
            inst.slots = SharedSlots(inst.opts.slot, board, self.index)
        else:  # a parent's block from before the session cells: each worker its part
            inst.slots = Slots(math.ceil(inst.opts.slot / self.count))
            runner.share = self.count
        if board.has_bucket:
            inst.new_limiter = lambda rate: SharedRateLimiter(rate, board)
        else:  # a parent's block from before the shared bucket: each worker its part
            runner.rate_share = self.count
        if inst.opts.rate > 0:
            inst.limiter = inst.new_limiter(inst.opts.rate * MBIT / runner.rate_share)
        pid = os.getpid()
        inst.checkpoint_sink = lambda row: self.board.write(self.index, (pid, *row))
        inst.probes_target = lambda: self.board.prober() in (None, self.index)


def check_single_end(spec: TunnelSpec, opts: Options, resolve_ip: str | None) -> None:
    """ConfigError unless *spec* is single-end forwarding on a local address."""
    from .net.sockopt import ListenError, probe_local

    why = ("workers=%d applies to single-end forwarding (client:// on a local address); a "
           "tunnel runs in one process (docs/scaling.md)" % opts.workers)
    if spec.scheme != "client" or opts.mode == "2":
        raise ConfigError(why)
    try:
        probe_local(spec.tunnel, resolve_ip)
    except ListenError as exc:
        if opts.mode == "1":
            raise ConfigError("workers=%d: %s" % (opts.workers, exc)) from None
        raise ConfigError("%s: %s" % (why, exc)) from None


class Supervisor:
    """The parent of N workers (see module docstring); runs under :func:`npgevent.cli.serve`."""

    def __init__(self, spec: TunnelSpec, opts: Options, log: InstanceLog, argv: Sequence[str]) -> None:
        self.spec, self.opts, self.log = spec, opts, log
        self.argv = list(argv)
        self.count = opts.workers
        self.board = Board(self.count)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * self.count
        self.dead_bytes = [0, 0, 0, 0]  # byte counters of workers that exited
        self.restarts = 0
        self.tasks = Group()
        self.metrics: Any = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self.opts.metrics is not None:  # first: an address in use fails before any worker runs
            from prometheus_client import CollectorRegistry

            from .metrics import MetricsServer

            registry = CollectorRegistry(auto_describe=False)
            registry.register(self)
            self.metrics = MetricsServer(self.opts.metrics, registry, self.log, self.opts)
            self.metrics.start()
        self.log.info("Workers: %d processes share %s (SO_REUSEPORT)", self.count, self.spec.tunnel)
        for index in range(self.count):
            self.tasks.spawn(self._keep_running, index)
        self.tasks.spawn(self._report)

    def collect(self) -> Any:
        """The workers' series, summed (a prometheus_client collector)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from .metrics import traffic_families

        _ping, tcps, udps, trx, ttx, urx, utx = self.totals()
        byts, sessions = traffic_families([([], (trx, ttx, urx, utx), (tcps, udps))])
        limit = GaugeMetricFamily("npgevent_session_limit", "The slot= limit of live sessions")
        limit.add_metric([], self.opts.slot)
        workers = GaugeMetricFamily("npgevent_workers", "Worker processes running")
        workers.add_metric([], sum(1 for p in self.procs if p is not None and p.poll() is None))
        restarts = CounterMetricFamily("npgevent_worker_restarts", "Workers started again after exiting")
        restarts.add_metric([], self.restarts)
        yield from (byts, sessions, limit, workers, restarts)

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        self.board.write(index, EMPTY)
        env = dict(os.environ, **{ENV: "%d,%d,%d" % (index, self.count, self.board.fd)})
        # the same package, installed or not (bin/npgevent from a checkout)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (PACKAGE_ROOT, env.get("PYTHONPATH"))))
        return subprocess.Popen([sys.executable, "-m", "npgevent", *self.argv], env=env,
                                stdin=subprocess.DEVNULL, pass_fds=(self.board.fd,),
                                # own process group: a terminal's Ctrl-C reaches the parent only, which
                                # passes one signal on (a second one would skip the drain)
                                preexec_fn=preexec(setpgid=True))

    def _keep_running(self, index: int) -> None:
        while not self._stopping:
            try:
                proc = self.procs[index] = self._spawn(index)
            except OSError as exc:
                self.log.error("Worker %d: cannot start: %s", index, exc)
                gevent.sleep(self.opts.service_cooldown)
                continue
            self.log.debug("Worker %d started: pid %d", index, proc.pid)
            status = proc.wait()
            self._bank(index)
            if self._stopping:
                return
            self.restarts += 1
            self.log.error("Worker %d (pid %d) exited with status %d: restart in %gs", index, proc.pid,
                           status, self.opts.service_cooldown)
            gevent.sleep(self.opts.service_cooldown)

    def _bank(self, index: int) -> None:
        """Keep the byte counters of a worker that exited in the totals; its sessions are gone
        (no longer counted against slot= for the others)."""
        row = self.board.read(index)
        for i in range(4):
            self.dead_bytes[i] += row[4 + i]
        self.board.write(index, EMPTY)
        self.board.set_live(index, 0)

    def totals(self) -> tuple[int, ...]:
        """(ping, tcps, udps, tcp_rx, tcp_tx, udp_rx, udp_tx) over every worker, living or not."""
        rows = [self.board.read(i)[1:] for i in range(self.count)]
        ping = max((r[0] for r in rows), default=0)
        sums = [sum(r[i] for r in rows) for i in range(1, 7)]
        for i in range(4):
            sums[2 + i] += self.dead_bytes[i]
        return (ping, *sums)

    def _report(self) -> None:
        serving = [0] * self.count
        while True:
            gevent.sleep(self.opts.report_interval)
            for i in range(self.count):  # a worker writes its row once its listeners are open
                pid = self.board.read(i)[0]
                if pid and pid != serving[i]:
                    serving[i] = pid
                    self.log.info("Worker %d serving: pid %d", i, pid)
            self.board.set_prober(self._prober())
            ping, tcps, udps, trx, ttx, urx, utx = self.totals()
            self.log.event(checkpoint_line(1, ping, 0, tcps, udps, trx, ttx, urx, utx))
            if self.log.enabled(DEBUG):
                self.log.debug("Workers: %s", "; ".join(self._row_text(i) for i in range(self.count)))

    def _prober(self) -> int:
        """The worker that times PING's connect: the lowest one running and serving (its row
        names its pid), else worker 0, whose replacement takes it up once it serves."""
        for i, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is None and self.board.read(i)[0] == proc.pid:
                return i
        return 0

    def _row_text(self, index: int) -> str:
        proc = self.procs[index]
        _pid, _ping, tcps, udps, trx, ttx, urx, utx = self.board.read(index)
        return "%d pid %s TCPS=%d UDPS=%d TCPRX=%d TCPTX=%d UDPRX=%d UDPTX=%d" % (
            index, proc.pid if proc is not None else "-", tcps, udps, trx, ttx, urx, utx)

    def stop(self, timeout: float | None = None) -> None:
        """Signal every worker to drain, wait for them (SIGKILL after the grace), and exit."""
        grace = self.opts.shutdown_timeout if timeout is None else timeout
        if self._stopping:
            self._signal(signal.SIGKILL if timeout == 0 else signal.SIGTERM)
            return
        self._stopping = True
        self._signal(signal.SIGTERM)
        live = [p for p in self.procs if p is not None]
        with gevent.Timeout(grace + 2, False):
            for p in live:
                p.wait()
        self._signal(signal.SIGKILL)
        for p in live:
            p.wait()
        self.tasks.kill(block=True, timeout=2)
        if self.metrics is not None:
            self.metrics.close()
        self.board.close()
        self.log.info("Client shutdown complete")

    def reload(self) -> None:
        """SIGHUP: each worker reads its settings again (the parent keeps its own)."""
        live = sum(1 for p in self.procs if p is not None and p.poll() is None)
        self.log.info("Reload: SIGHUP passed on to %d workers", live)
        self._signal(signal.SIGHUP)

    def _signal(self, signum: int) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                try:
                    p.send_signal(signum)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop(0)
