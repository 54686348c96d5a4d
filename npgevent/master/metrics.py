"""The master's Prometheus metrics: every instance's series, labelled by id and alias.

Served at ``<prefix>/v1/metrics`` behind the API key (like every other API path),
and, when the master's URL or settings have ``metrics=host:port``, also on that
address without a key (bind it to an address only the scraper can reach).  The
master knows what its children log: the CHECK_POINT figures (bytes, sessions,
pool, the last ping) and their error lines (restarts, by reason).  The series
names are the standalone ones (:mod:`npgevent.metrics`), with the last ping as a
gauge since the master sees no individual round trips.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core import Master

LABELS = ["instance_id", "alias"]


class MasterCollector:
    def __init__(self, master: Master) -> None:
        self.master = master

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        byts = CounterMetricFamily("npgevent_bytes", "Bytes relayed on the target side, as CHECK_POINT "
                                   "counts", labels=[*LABELS, "protocol", "direction"])
        sessions = GaugeMetricFamily("npgevent_sessions", "Live user sessions", labels=[*LABELS, "protocol"])
        pool = GaugeMetricFamily("npgevent_pool_idle", "Idle pool connections", labels=LABELS)
        ping = GaugeMetricFamily("npgevent_control_ping_last_seconds", "Last control ping round trip",
                                 labels=LABELS)
        up = GaugeMetricFamily("npgevent_instance_running", "1 while the instance's process runs",
                               labels=LABELS)
        restarts = CounterMetricFamily("npgevent_tunnel_restarts", "Core restarts after an error, by "
                                       "reason", labels=[*LABELS, "reason"])
        instances = self.master.instances
        for rec in instances.all_records():
            if rec.type not in ("server", "client"):
                continue
            labels = [rec.id, rec.alias]
            c = rec.counters
            for proto in ("tcp", "udp"):
                byts.add_metric([*labels, proto, "rx"], c[proto + "rx"].value)
                byts.add_metric([*labels, proto, "tx"], c[proto + "tx"].value)
            sessions.add_metric([*labels, "tcp"], rec.tcps)
            sessions.add_metric([*labels, "udp"], rec.udps)
            pool.add_metric(labels, rec.pool)
            ping.add_metric(labels, rec.ping / 1000.0)
            up.add_metric(labels, 1 if rec.status == "running" else 0)
            for reason, n in instances.restarts_of(rec.id).items():
                restarts.add_metric([*labels, reason], n)
        yield from (byts, sessions, pool, ping, up, restarts)


def registry_for(master: Master) -> Any:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(MasterCollector(master))
    return registry


def exposition(registry: Any) -> tuple[bytes, str]:
    """(body, content type) of a scrape."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST
