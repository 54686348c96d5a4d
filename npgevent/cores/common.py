"""What every core shares: instance state, the Core lifecycle and the Runner.

An *instance* is one NodePass URL being served.  Its :class:`Instance` state
(options, byte counters, slots, rate limiter, DNS cache, logger) lives as long
as the process, so counters keep growing across restarts, as in Go.

A :class:`Core` is one attempt at running the instance (single-end forwarder,
tunnel server or client).  :class:`Runner` drives cores the way NodePass's
``Run`` does: log the start line, start a core, and when it fails log
``<Role> error: ...``, tear it down, wait ``NP_SERVICE_COOLDOWN``, log
``<Role> restart: ...`` and start a new one.  ``stop(timeout)`` stops accepting,
lets live sessions drain for up to *timeout* seconds, then closes what is left
and logs ``<Role> shutdown complete``.

Every long-lived object here has ``start``/``stop``/``close`` and is a
context manager.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import gevent
from gevent.event import AsyncResult, Event
from gevent.pool import Group

from ..durations import format_go_duration
from ..errors import CoreError
from ..log import InstanceLog
from ..metrics import Events
from ..net.resolver import Resolver
from ..relay.limit import RateLimiter, Slots
from ..relay.runners import Sessions
from ..relay.stats import Traffic
from ..settings import Options
from ..url import TunnelSpec
from .reload import Reloading, apply_live, keep_process_only, plan


def _always() -> bool:
    return True


class Instance:
    """State of one instance that survives core restarts."""

    def __init__(self, spec: TunnelSpec, opts: Options, log: InstanceLog) -> None:
        self.spec = spec
        self.opts = opts
        self.log = log
        self.traffic = Traffic()
        self.slots = Slots(opts.slot)
        self.limiter = RateLimiter.from_mbps(opts.rate)
        self.resolver = Resolver(opts.dns, ttl=opts.dns_caching_ttl, log=log)
        self.title = spec.scheme.capitalize()  # "Server" / "Client"
        self.events = Events()  # counters for the metrics (npgevent.metrics)
        #: a worker process (npgevent.workers) hands its CHECK_POINT figures to its parent:
        #: (ping, tcps, udps, tcp_rx, tcp_tx, udp_rx, udp_tx)
        self.checkpoint_sink: Callable[[tuple[int, ...]], None] | None = None
        #: whether this process times a connect to the target for PING (single-end): one
        #: worker of a ``workers=`` group does at a time, so the target sees one per interval
        self.probes_target: Callable[[], bool] = _always
        #: a rate= bucket of this many bytes/s (a worker's draws on its group's shared one)
        self.new_limiter: Callable[[float], RateLimiter] = RateLimiter

    def start_url(self, mode: str | int | None = None) -> str:
        """The URL of the ``started``/``restart`` line, in NodePass's order."""
        o = self.opts
        cap = ("min=%d" % o.min) if self.spec.scheme == "client" else ("max=%d" % o.max)
        return "%s?dns=%s&%s&mode=%s&quic=%s&dial=%s&read=%s&rate=%d&slot=%d&proxy=%s&notcp=%s&noudp=%s" % (
            self.spec.base_url(), ",".join(o.dns), cap, o.mode if mode is None else mode,
            "1" if o.quic else "0", o.dial, format_go_duration(o.read), o.rate, o.slot,
            "1" if o.proxy else "0", "1" if o.notcp else "0", "1" if o.noudp else "0")


class Core:
    """One run of an instance.  Subclasses implement :meth:`_start` and :meth:`_close`.

    ``wait()`` blocks until the core fails (raising the error) or is stopped
    (returning).  Sessions are spawned into :attr:`sessions` so that ``stop``
    can drain and then kill them.
    """

    #: NodePass run mode once resolved (client: 1 single-end, 2 dual-end; server: 1 reverse, 2 forward)
    mode = 0

    def __init__(self, inst: Instance) -> None:
        self.inst = inst
        self.log = inst.log
        self.opts = inst.opts
        self.sessions = Sessions()  # user sessions' handlers, on parked workers
        self.tasks = Group()  # background loops (reporter, pool manager...)
        self._outcome: AsyncResult = AsyncResult()
        self._closed = False

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def wait(self) -> None:
        self._outcome.get()

    def hub_sessions(self) -> bool:
        """Whether a TCP session may start and run in hub callbacks alone (single-end
        forwarding, tunnels: tls=0, and framed sessions on reused TLS pools): not with ``read=``
        or ``rate=`` (the greenlet relay keeps those), ``proxy=1`` (a PROXY line goes out first)
        or debug logs (a line per exchange)."""
        opts = self.opts
        return not (opts.proxy or opts.read > 0 or self.inst.limiter is not None
                    or self.log.enabled(10))

    def fail(self, exc: BaseException) -> None:
        """Report a fatal runtime error: ``wait()`` raises it and the runner restarts."""
        if not self._outcome.ready():
            self._outcome.set_exception(exc if isinstance(exc, CoreError) else CoreError(str(exc)))

    def stop(self, grace: float = 0.0) -> None:
        """Stop accepting, drain sessions for up to *grace* seconds, then close."""
        if self._closed:
            return
        self._stop_accepting()
        if grace > 0 and len(self.sessions):
            self.sessions.join(timeout=grace)
        self.close()

    def close(self, keep_sessions: bool = False) -> Sessions | None:
        """Release everything.  With *keep_sessions* (a restart after a failure), live sessions
        are not killed: their own connections may still be healthy, so they carry on and the
        group holding them is returned to the caller, which drains them on shutdown."""
        if self._closed:
            return None
        self._closed = True
        self.tasks.kill(block=False)
        self._stop_accepting()
        kept = None
        if keep_sessions and len(self.sessions):
            kept = self.sessions
        else:
            self.sessions.kill(block=True, timeout=2)
        self._close()
        if not self._outcome.ready():
            self._outcome.set(None)
        return kept

    def spawn_task(self, func: Callable[..., Any], *args: Any) -> gevent.Greenlet:
        """Run a background loop; if it raises, the core fails (and restarts)."""

        def guarded() -> None:
            try:
                func(*args)
            except gevent.GreenletExit:
                raise
            except Exception as exc:
                self.fail(exc)

        return self.tasks.spawn(guarded)

    # -- to implement ---------------------------------------------------------
    def _start(self) -> None:
        raise NotImplementedError

    def _stop_accepting(self) -> None:
        """Close listeners (idempotent)."""

    def _close(self) -> None:
        """Release everything else (idempotent)."""

    def __enter__(self) -> Core:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Runner:
    """Runs an instance's cores with NodePass's restart loop."""

    def __init__(self, inst: Instance, factory: Callable[[Instance], Core]) -> None:
        self.inst = inst
        self.factory = factory
        self.log = inst.log
        self.core: Core | None = None
        self.mode: str | int = inst.opts.mode
        self.starts = 0
        self.survivors = Sessions()  # sessions of failed cores that carry on (see Core.close)
        self._stopping = False
        self._wake = Event()
        self._greenlet: gevent.Greenlet | None = None
        self.running = Event()  # set while a core is started
        self.metrics: Any = None  # MetricsServer when metrics= is set
        self.serve_metrics = True  # False in a worker: its parent serves the sum
        self.share = 1  # worker processes the instance's slot= is split over
        self.rate_share = 1  # ... and its rate= (1 when they share one bucket)

    def start(self) -> None:
        from ..metrics import serve_instance

        if self.serve_metrics:  # metrics=host:port, before the first core
            self.metrics = serve_instance(self)
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        inst = self.inst
        while not self._stopping:
            verb = "started" if self.starts == 0 else "restart"
            self.starts += 1
            try:
                core = self.core = self.factory(inst)
            except (CoreError, OSError) as exc:
                self.log.error("%s error: %s", inst.title, _one_line(exc))
                self._wake.wait(inst.opts.service_cooldown)
                continue
            self.log.info("%s %s: %s", inst.title, verb, inst.start_url(self.mode))
            try:
                core.start()
                self.mode = core.mode or self.mode
                self.running.set()
                core.wait()
            except (CoreError, OSError) as exc:
                if isinstance(exc, Reloading):
                    self.log.info("%s reload: %s", inst.title, _one_line(exc))
                elif not self._stopping:
                    self.log.error("%s error: %s", inst.title, _one_line(exc))
                    inst.events.restart(str(exc))
            except gevent.GreenletExit:
                raise
            except Exception as exc:  # a bug: log it with the traceback, keep the daemon alive
                self.log.error("%s error: internal error: %r", inst.title, exc, exc_info=True)
            finally:
                self.running.clear()
                if not self._stopping:
                    self._keep(core.close(keep_sessions=True))
            if self._stopping:
                break
            self._wake.wait(inst.opts.service_cooldown)

    def stop(self, timeout: float | None = None) -> None:
        """Stop within *timeout* (default ``NP_SHUTDOWN_TIMEOUT``), draining sessions."""
        grace = self.inst.opts.shutdown_timeout if timeout is None else timeout
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        core = self.core
        if core is not None:
            with gevent.Timeout(grace + 2, False):
                core.stop(grace=max(0.0, grace - 0.5))
            core.close()
        if len(self.survivors):  # sessions kept across restarts drain like the core's own
            self.survivors.join(timeout=max(0.0, grace - 0.5))
            self.survivors.kill(block=True, timeout=2)
        if self._greenlet is not None:
            self._greenlet.join(timeout=2)
            self._greenlet.kill(block=True, timeout=1)
        if self.metrics is not None:
            self.metrics.close()
        self.log.info("%s shutdown complete", self.inst.title)

    def reload(self, spec: TunnelSpec, opts: Options) -> None:
        """SIGHUP: apply re-read settings (:mod:`npgevent.cores.reload`)."""
        inst, log, core = self.inst, self.log, self.core
        listens = core is None or bool(getattr(core, "receives", False))
        p = plan(inst.spec, inst.opts, spec, opts, listens_on_target=listens)
        if p.process:
            log.warn("Reload: %s can't change in a running process: kept (restart npgevent to apply)",
                     ", ".join(p.process))
            if "scheme" in p.process:
                return
        opts = keep_process_only(inst.opts, opts)
        tls_changed = any(name in p.restart for name in ("tls", "crt", "key", "quic"))
        apply_live(self, spec, opts, self.share, self.rate_share)
        if p.restart:
            if tls_changed:
                inst.server_tls = None  # type: ignore[attr-defined]  # made again by the next core
                inst.tls_logged = False  # type: ignore[attr-defined]
            self.mode = opts.mode
            log.info("Reload: %s changed: the core restarts after the cooldown, live sessions carry on",
                     ", ".join(p.restart))
            if core is not None:
                core.fail(Reloading("settings changed: " + ", ".join(p.restart)))
        else:
            log.info("Reload: %s", ("applied " + ", ".join(p.live)) if p.live else "no setting changed")
        tls = getattr(inst, "server_tls", None)
        if tls is not None and not tls_changed:
            tls.reload_now()

    def _keep(self, sessions: Sessions | None) -> None:
        if sessions is not None:
            self.log.info("%d live sessions carry on across the restart", len(sessions))
            self.survivors.adopt(sessions)

    def close(self) -> None:
        self.stop(0)

    def __enter__(self) -> Runner:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(0)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
