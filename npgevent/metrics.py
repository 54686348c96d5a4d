"""Prometheus metrics: ``metrics=host:port`` serves ``/metrics`` (off by default).

The cores count events in plain integers (:class:`Events`, always present and
free when nobody scrapes); the state (bytes, sessions, pool) is read from the
instance at scrape time by :class:`InstanceCollector`.  prometheus_client is
imported only when metrics are on.  The master exposes the same series for each
of its instances, labelled ``instance_id`` and ``alias`` (:mod:`npgevent.master.metrics`).

Series (all prefixed ``npgevent_``):

====================================  =========  ===========================================
name                                  type       labels
====================================  =========  ===========================================
bytes_total                           counter    protocol (tcp/udp), direction (rx/tx)
sessions                              gauge      protocol
session_limit                         gauge
pool_idle / pool_capacity             gauge
control_ping_seconds                  histogram  (tunnels: the ping/pong round trip)
tunnel_restarts_total                 counter    reason (:data:`RESTART_REASONS`)
handshake_failures_total              counter    kind (:data:`FAILURE_KINDS`)
dial_failures_total                   counter
udp_dropped_total                     counter    cause (slot_limit/session_backlog/socket_buffer)
pool_tls_handshakes_total             counter    kind (full/resumed): the client's TLS pool dials
====================================  =========  ===========================================
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

PING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
RESTART_REASONS = ("control_closed", "control_silent", "control_error", "handshake", "auth",
                   "listen", "dial", "quic", "other")
FAILURE_KINDS = ("handshake", "auth", "pool_admission")
_RESTART_RULES = (  # (substring of the error, reason): first match wins
    ("silent", "control_silent"), ("EOF", "control_closed"), ("closed by the peer", "control_closed"),
    ("control", "control_error"), ("authenticat", "auth"), ("auth=", "auth"), ("proved the key", "auth"),
    ("handshake", "handshake"), ("access denied", "handshake"), ("listen", "listen"),
    ("QUIC", "quic"), ("dial", "dial"), ("connect", "dial"), ("tunnel ", "dial"),
)


def restart_reason(message: str) -> str:
    """The fixed-set reason label for a core error message."""
    for needle, reason in _RESTART_RULES:
        if needle in message:
            return reason
    return "other"


class Events:
    """Event counters of one instance (survive core restarts)."""

    __slots__ = ("dial_failures", "failures", "ping_buckets", "ping_count", "ping_sum", "restarts",
                 "tls_handshakes")

    def __init__(self) -> None:
        self.restarts = dict.fromkeys(RESTART_REASONS, 0)
        self.failures = dict.fromkeys(FAILURE_KINDS, 0)
        self.dial_failures = 0
        self.ping_buckets = [0] * len(PING_BUCKETS)  # not cumulative: one count per bucket
        self.ping_count = 0
        self.ping_sum = 0.0
        self.tls_handshakes = {"full": 0, "resumed": 0}  # the client's TLS pool connections

    def tls_handshake(self, resumed: bool) -> None:
        self.tls_handshakes["resumed" if resumed else "full"] += 1

    def restart(self, message: str) -> None:
        self.restarts[restart_reason(message)] += 1

    def failure(self, kind: str) -> None:
        self.failures[kind] += 1

    def ping(self, seconds: float) -> None:
        i = bisect.bisect_left(PING_BUCKETS, seconds)
        if i < len(PING_BUCKETS):
            self.ping_buckets[i] += 1
        self.ping_count += 1
        self.ping_sum += seconds

    def ping_cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip(PING_BUCKETS, self.ping_buckets, strict=True):
            total += n
            out.append(("%g" % bound, total))
        out.append(("+Inf", self.ping_count))
        return out


def traffic_families(rows: Iterable[tuple[list[str], Sequence[int], Sequence[int]]],
                     labels: Sequence[str] = ()) -> tuple[Any, Any]:
    """``npgevent_bytes_total`` and ``npgevent_sessions`` from *rows* of (label values,
    (tcp_rx, tcp_tx, udp_rx, udp_tx), (tcp sessions, udp sessions)): one instance, a master's
    instances, or a workers parent's sum."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    byts = CounterMetricFamily("npgevent_bytes", "Bytes relayed on the target side, as CHECK_POINT "
                               "counts", labels=[*labels, "protocol", "direction"])
    sessions = GaugeMetricFamily("npgevent_sessions", "Live user sessions", labels=[*labels, "protocol"])
    for values, (trx, ttx, urx, utx), (tcps, udps) in rows:
        for proto, rx, tx, live in (("tcp", trx, ttx, tcps), ("udp", urx, utx, udps)):
            byts.add_metric([*values, proto, "rx"], rx)
            byts.add_metric([*values, proto, "tx"], tx)
            sessions.add_metric([*values, proto], live)
    return byts, sessions


def instance_families(inst: Any, core: Any) -> Iterator[Any]:
    """The metric families of one running instance (*core* may be None between restarts)."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    t, slots, ev = inst.traffic, inst.slots, inst.events
    yield from traffic_families([([], t.bytes, (slots.tcp, slots.udp))])
    yield _gauge("npgevent_session_limit", "The slot= limit of live sessions", slots.limit)
    pool = getattr(core, "pool", None)
    yield _gauge("npgevent_pool_idle", "Idle pool connections", pool.active if pool is not None else 0)
    yield _gauge("npgevent_pool_capacity", "Pool capacity (server: max=; client: its adaptive target)",
                 _capacity(inst, core))
    hist = HistogramMetricFamily("npgevent_control_ping_seconds", "Control channel ping round trip")
    hist.add_metric([], ev.ping_cumulative(), ev.ping_sum)
    yield hist
    yield _by_label("npgevent_tunnel_restarts", "Core restarts after an error, by reason", "reason",
                    ev.restarts)
    yield _by_label("npgevent_handshake_failures", "Refused handshakes, authentications and pool "
                    "admissions", "kind", ev.failures)
    fam = CounterMetricFamily("npgevent_dial_failures", "Target dials that failed")
    fam.add_metric([], ev.dial_failures)
    yield fam
    yield _by_label("npgevent_pool_tls_handshakes", "TLS handshakes of the client's pool connections: "
                    "full, or resumed from a session ticket", "kind", ev.tls_handshakes)
    yield _by_label("npgevent_udp_dropped", "UDP datagrams dropped, by cause", "cause", udp_drops(core))


def _gauge(name: str, doc: str, value: float) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, doc, value=value)


def _by_label(name: str, doc: str, label: str, counts: dict[str, int]) -> Any:
    """A counter with one sample per key of *counts*, the key as *label*."""
    from prometheus_client.core import CounterMetricFamily

    fam = CounterMetricFamily(name, doc, labels=[label])
    for key, n in counts.items():
        fam.add_metric([key], n)
    return fam


def _capacity(inst: Any, core: Any) -> int:
    if inst.spec.scheme == "server":
        return int(inst.opts.max)
    adaptive = getattr(getattr(core, "pool", None), "adaptive", None)
    return int(adaptive.capacity) if adaptive is not None else 0


def udp_drops(core: Any) -> dict[str, int]:
    """Cumulative UDP drops of the core's user listener, by cause."""
    table = getattr(getattr(core, "listeners", None), "table", None)
    if table is None:
        return {"slot_limit": 0, "session_backlog": 0, "socket_buffer": 0}
    from .relay.udplistener import kernel_drops

    return {"slot_limit": table.total_slot_drops, "session_backlog": table.total_backlog_drops,
            "socket_buffer": kernel_drops(table.inode) + table.total_send_drops}


class InstanceCollector:
    """A prometheus_client collector over a :class:`~npgevent.cores.common.Runner`."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def collect(self) -> Iterator[Any]:
        yield from instance_families(self.runner.inst, self.runner.core)


class MetricsServer:
    """``/metrics`` over HTTP on *address* (``host:port``), from *registry*.  The master API's
    hardened server carries it: header, idle and body deadlines and the per-address connection
    cap (``http_*`` in the settings table), so a scraper's port can't be held open by anyone."""

    def __init__(self, address: Any, registry: Any, log: Any, opts: Any) -> None:
        self.address, self.registry, self.log, self.opts = address, registry, log, opts
        self.server: Any = None

    def start(self) -> None:
        from prometheus_client import make_wsgi_app

        from .master.httpserver import ApiServer, DebugLog
        from .net.sockopt import format_addr, listen_tcp

        sock = listen_tcp(self.address)
        self.server = ApiServer(sock, make_wsgi_app(self.registry), self.opts, DebugLog(self.log), max_body=0)
        self.server.start()
        self.log.info("Metrics: http://%s/metrics", format_addr(sock.getsockname()))

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=1)
            self.server = None

    def close(self) -> None:
        self.stop()


def serve_instance(runner: Any) -> MetricsServer | None:
    """Start ``/metrics`` for *runner* if its instance has ``metrics=``; else None."""
    address = runner.inst.opts.metrics
    if address is None:
        return None
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(InstanceCollector(runner))
    server = MetricsServer(address, registry, runner.log, runner.inst.opts)
    server.start()
    return server
