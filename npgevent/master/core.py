"""The master (``master://host:port/prefix``): a REST API managing tunnel instances.

:class:`Master` ties the parts together and owns their lifecycle
(``start``/``stop``/``close``, context manager):

* the HTTP server (gevent ``pywsgi``) serving :class:`~npgevent.master.api.Api`
  on ``<prefix>/v1``, plain or TLS 1.3 (``tls=1`` in-memory self-signed,
  ``tls=2`` the ``crt``/``key`` files re-read every ``NP_RELOAD_INTERVAL``,
  falling back to code 1 when they cannot be loaded; ``quic=1`` alone also
  selects code 1, as in NodePass);
* the API key record (``********``), created on first start and kept in the
  state file with every instance;
* the instances (child processes) and the SSE hub;
* periodic work: stale CHECK_POINT detection every ``NP_REPORT_INTERVAL``; a
  state backup and a restart of errored instances every ``NP_RELOAD_INTERVAL``.

Stopping sends ``shutdown`` to SSE subscribers, stops every child (in
parallel, each with its grace period), saves the state and closes the server.
"""

from __future__ import annotations

import os
import ssl as stdssl
import tempfile
import time
from typing import Any

import gevent
import gevent.event
from gevent import ssl as gssl

from ..errors import CoreError
from ..log import InstanceLog
from ..net.resolver import Resolver
from ..net.sockopt import ListenError, format_addr, listen_tcp
from ..settings import Options
from ..url import TunnelSpec
from .api import Api
from .events import EventHub
from .httpserver import ApiServer, DebugLog
from .instances import Instances
from .records import KEY_ID, MasterTLS, Record
from .request import MAX_BODY
from .store import StateStore, default_state_dir


def _context_from(cert: Any, key: Any) -> Any:
    """A gevent SSLContext (TLS 1.3 only) for a cryptography certificate and key."""
    from cryptography.hazmat.primitives import serialization

    ctx = gssl.SSLContext(stdssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = stdssl.TLSVersion.TLSv1_3
    with tempfile.TemporaryDirectory(prefix="npgevent-tls-") as tmp:
        crt_path, key_path = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
        with open(crt_path, "wb") as fh:
            fh.write(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        ctx.load_cert_chain(crt_path, key_path)
    return ctx


class Master:
    def __init__(self, spec: TunnelSpec, opts: Options, log: InstanceLog) -> None:
        self.spec, self.opts, self.log = spec, opts, log
        self.prefix = spec.prefix
        q = spec.query_map
        self.raw_log = q.get("log", "")
        self.raw_crt, self.raw_key = q.get("crt", ""), q.get("key", "")
        self.resolver = Resolver(opts.dns, ttl=opts.dns_caching_ttl, log=log)
        self.hub = EventHub()
        self.store = StateStore(opts.state_dir or default_state_dir(), log)
        self.tls_code = "0"
        self._tls: Any = None  # ServerTLS for codes 1/2
        self._ctx: Any = None
        self._ctx_cert: Any = None
        self.mtls = MasterTLS(self.raw_log, "0", self.raw_crt, self.raw_key)
        self.instances = Instances(log, self.hub, self.store, self.mtls, opts.report_interval,
                                   grace=opts.shutdown_timeout + 1.0)
        self.server: ApiServer | None = None
        self.tasks: list[gevent.Greenlet] = []
        self.started_at = time.monotonic()
        self.address = ""
        self.running = gevent.event.Event()
        self._metrics_registry: Any = None
        self.metrics_server: Any = None  # MetricsServer on metrics= (no key), when set

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._setup_tls()
        self.instances.mtls = self.mtls
        host = self.spec.tunnel
        try:
            listener = listen_tcp(host, self.resolver.listen_ip(host.host))
        except ListenError as exc:
            raise CoreError(str(exc)) from None
        except OSError as exc:
            raise CoreError("newMaster: resolve host failed: %s" % exc) from None
        records = self.store.load()
        self.instances.load(records)
        self.log.info("Loaded %d instances from %s", len(records), self.store.path)
        self._load_key()
        app = Api(self)
        self.server = ApiServer(listener, app, self.opts, DebugLog(self.log), MAX_BODY)
        if self.tls_code != "0":
            self.server.context_for = self._current_context
        self.server.start()
        self.address = format_addr(listener.getsockname())
        self.log.info("Master started: %s%s/v1", self.address, self.prefix)
        if self.opts.metrics is not None:
            from ..metrics import MetricsServer

            self.metrics_server = MetricsServer(self.opts.metrics, self.metrics_registry(), self.log,
                                                self.opts)
            try:
                self.metrics_server.start()
            except OSError as exc:
                self.server.stop(timeout=0.1)
                raise CoreError(str(exc)) from None
        self.tasks = [gevent.spawn(self._every, self.opts.report_interval, self.instances.check_stale),
                      gevent.spawn(self._every, self.opts.reload_interval, self._hourly),
                      gevent.spawn(self.instances.autostart)]
        self.running.set()

    def stop(self, timeout: float | None = None) -> None:
        grace = self.opts.shutdown_timeout if timeout is None else timeout
        self.hub.shutdown_all()
        tasks, self.tasks = self.tasks, []  # a periodic task already due ends at its wake-up
        for task in tasks:
            task.kill(block=False)
        self.instances.stop_all()
        self.instances.save_now()
        self.log.info("Instances saved: %s", self.store.path)
        if self.server is not None:
            self.server.stop(timeout=max(0.1, min(grace, 2.0)))
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.running.clear()
        self.log.info("Master shutdown complete")

    def close(self) -> None:
        self.stop(0)

    def reload(self, spec: TunnelSpec, opts: Options) -> None:
        """SIGHUP: the master's own settings.  Its children are not signalled (each instance
        is reloaded, stopped or restarted through the API).  Applied: the log level, the
        HTTP deadlines and per-address cap, and the crt/key files (tls=2); the address,
        prefix, TLS code, state directory and metrics address need a new process."""
        from ..log import LEVELS

        fixed = [name for name, old, new in (
            ("scheme", self.spec.scheme, spec.scheme), ("address", self.spec.tunnel, spec.tunnel),
            ("prefix", self.spec.prefix, spec.prefix), ("tls", self.spec.query_map.get("tls", ""),
                                                        spec.query_map.get("tls", "")),
            ("crt/key paths", (self.raw_crt, self.raw_key), (spec.query_map.get("crt", ""),
                                                             spec.query_map.get("key", ""))),
            ("state_dir", self.opts.state_dir, opts.state_dir), ("metrics", self.opts.metrics, opts.metrics),
            ("log_format", self.opts.log_format, opts.log_format)) if old != new]
        if fixed:
            self.log.warn("Reload: %s can't change in a running master: kept (restart it to apply)",
                          ", ".join(fixed))
        self.opts = opts.with_(state_dir=self.opts.state_dir, metrics=self.opts.metrics,
                               log_format=self.opts.log_format)
        self.log.level = LEVELS.get(opts.log, self.log.level)
        if self.server is not None:
            self.server.configure(self.opts)
        if self._tls is not None:
            self._tls.reload_now()
        self.log.info("Reload: master settings applied (log=%s); instances not signalled", opts.log)

    def metrics_registry(self) -> Any:
        """The prometheus_client registry of every instance's series (made on first use)."""
        if self._metrics_registry is None:
            from .metrics import registry_for

            self._metrics_registry = registry_for(self)
        return self._metrics_registry

    def __enter__(self) -> Master:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- API key --------------------------------------------------------------------------
    def _load_key(self) -> None:
        insts = self.instances
        key = insts.key
        if key is None or not key.url:  # never run without a key: make one
            if key is None:
                key = insts.key = Record(id=KEY_ID, config=os.urandom(8).hex())
            else:
                self.log.warn("API Key record in the state has no key: a new key is created")
            key.url = os.urandom(16).hex()
            insts.save_now()
            self.log.info("API Key created: %s", key.url)
            return
        self.log.info("API Key loaded: %s", key.url)
        if not key.config:
            key.config = os.urandom(8).hex()
            insts.save_now()
            self.log.info("Master ID created: %s", key.config)

    def regenerate_key(self) -> None:
        key = self.instances.key
        assert key is not None
        key.url = os.urandom(16).hex()
        self.log.info("API Key regenerated: %s", key.url)
        self.instances.save_now()
        self.hub.shutdown_all()
        self.hub.publish("update", key.to_api())

    # -- TLS ------------------------------------------------------------------------------
    def _setup_tls(self) -> None:
        q = self.spec.query_map
        code = q.get("tls", "")
        if code not in ("1", "2"):
            code = "1" if q.get("quic") == "1" else "0"
        if code == "0":
            self.log.warn("TLS code-0: unencrypted")
        else:
            from ..net.tlsctx import ServerTLS

            try:
                self._tls = ServerTLS(code, self.raw_crt, self.raw_key, self.opts.reload_interval, self.log)
                code = self._tls.code
                self._current_context()
            except (OSError, ValueError, stdssl.SSLError) as exc:
                self.log.error("TLS setup failed (%s): serving plain HTTP", exc)
                code = "0"
        self.tls_code = code
        self.mtls = MasterTLS(self.raw_log, code, self.raw_crt, self.raw_key)

    def _current_context(self) -> Any:
        tls = self._tls
        tls.current()  # re-reads code-2 files when NP_RELOAD_INTERVAL has passed
        if tls.cert is not self._ctx_cert:
            self._ctx = _context_from(tls.cert, tls.pkey)
            self._ctx_cert = tls.cert
        return self._ctx

    # -- periodic -------------------------------------------------------------------------
    def _every(self, interval: float, fn: Any) -> None:
        me = gevent.getcurrent()
        while True:
            gevent.sleep(interval)
            if me not in self.tasks:
                # stopped while this wake-up was already due: stop()'s kill lands only at this
                # greenlet's next switch, after the call this loop would make now
                return
            fn()

    def _hourly(self) -> None:
        if self.store.backup():
            self.log.info("State backup saved: %s", self.store.backup_path)
        self.instances.restart_errored()

