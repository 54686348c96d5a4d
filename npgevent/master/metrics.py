"""The master's Prometheus metrics: every instance's series, labelled by id and alias.

Served at ``<prefix>/v1/metrics`` behind the API key (like every other API path),
and, when the master has ``metrics=host:port``, also on that address without a
key (bind it to an address only the scraper can reach).

Where the series come from:

* each instance process serves its own ``/metrics`` on an ephemeral loopback port
  (the master starts it with ``NP_METRICS=127.0.0.1:0`` and reads the port from
  its ``Metrics: http://...`` line); a scrape of the master fetches them all
  concurrently (:data:`CHILD_TIMEOUT` each) and adds ``instance_id`` and ``alias``
  to every sample: ping histogram, restarts, handshake/auth/pool-admission
  failures, dial failures, UDP drops, TLS handshakes, slot limit, pool capacity;
* bytes, live sessions and idle pool come from the instance records, the same
  figures the API and the panels show (they survive the instance's restarts);
* ``npgevent_instance_running`` is the master's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import gevent

if TYPE_CHECKING:
    from .core import Master

LABELS = ["instance_id", "alias"]
CHILD_TIMEOUT = 2.0  # s: a child that does not answer in time is left out of that scrape
FROM_RECORDS = {"npgevent_bytes", "npgevent_sessions", "npgevent_pool_idle"}
CHILD_METRICS = "127.0.0.1:0"  # NP_METRICS of every instance the master starts


def fetch(address: str) -> str:
    """One child's exposition text ('' if it can't be had)."""
    import urllib.request

    try:
        with urllib.request.urlopen("http://%s/metrics" % address, timeout=CHILD_TIMEOUT) as resp:
            return str(resp.read(4 << 20).decode("utf-8", "replace"))
    except (OSError, ValueError):
        return ""


class MasterCollector:
    def __init__(self, master: Master) -> None:
        self.master = master

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily, Metric
        from prometheus_client.parser import text_string_to_metric_families

        from ..metrics import traffic_families

        instances = self.master.instances
        records = [r for r in instances.all_records() if r.type in ("server", "client")]
        families: dict[str, Any] = {}
        jobs = {rec.id: gevent.spawn(fetch, addr) for rec in records
                if (addr := instances.metrics_address(rec.id))}
        gevent.joinall(list(jobs.values()), timeout=CHILD_TIMEOUT + 0.5)
        for rec in records:
            job = jobs.get(rec.id)
            text = job.value if job is not None and job.successful() else ""
            if not text:
                continue
            try:
                parsed = list(text_string_to_metric_families(text))
            except ValueError:
                continue
            for fam in parsed:
                if fam.name in FROM_RECORDS:
                    continue
                out = families.get(fam.name)
                if out is None:
                    out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                for s in fam.samples:
                    out.add_sample(s.name, {**s.labels, "instance_id": rec.id, "alias": rec.alias}, s.value)
        pool = GaugeMetricFamily("npgevent_pool_idle", "Idle pool connections", labels=LABELS)
        up = GaugeMetricFamily("npgevent_instance_running", "1 while the instance's process runs",
                               labels=LABELS)
        for rec in records:
            pool.add_metric([rec.id, rec.alias], rec.pool)
            up.add_metric([rec.id, rec.alias], 1 if rec.status == "running" else 0)
        byts, sessions = traffic_families(
            (([rec.id, rec.alias], [rec.counters[k].value for k in ("tcprx", "tcptx", "udprx", "udptx")],
              (rec.tcps, rec.udps)) for rec in records), LABELS)
        yield from (byts, sessions, pool, up)
        yield from families.values()


def registry_for(master: Master) -> Any:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(MasterCollector(master))
    return registry


def exposition(registry: Any) -> tuple[bytes, str]:
    """(body, content type) of a scrape."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST
