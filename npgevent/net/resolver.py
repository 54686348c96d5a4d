"""Name resolution: ``/etc/hosts`` first, then DNS via dnspython, with a cache.

dnspython builds and parses the messages (``dns.message``); the queries travel
over gevent sockets so a lookup never blocks the hub, patched or not.  A and
AAAA are asked concurrently; the servers of ``dns=`` are tried in turn within
one overall timeout (5 s by default); a truncated UDP answer is retried over TCP.

Answers are cached for ``NP_DNS_CACHING_TTL`` and names are re-resolved when
the entry expires (Go NodePass resolves once at start).  If a re-resolution
fails, the stale answer is kept and a warning logged, so a DNS outage does not
take down a tunnel that was working.  Concurrent lookups of one name share a
single query.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import random
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent
from gevent import socket
from gevent.event import AsyncResult

from ..log import InstanceLog

if TYPE_CHECKING:
    import dns.exception
    import dns.flags
    import dns.message
    import dns.rcode
    import dns.rdatatype
else:
    dns: Any = None  # dnspython (~3 MB): imported by the first lookup that asks a DNS server


def _need_dnspython() -> None:
    global dns
    if dns is None:
        for name in ("dns.exception", "dns.flags", "dns.message", "dns.rcode", "dns.rdatatype"):
            importlib.import_module(name)
        dns = importlib.import_module("dns")

HOSTS_PATH = "/etc/hosts"


class ResolveError(OSError):
    """A name could not be resolved (message names the host and the reason)."""


@dataclass
class _Entry:
    addrs: list[str]
    expires: float


def _split_server(item: str) -> tuple[str, int]:
    if item.startswith("["):
        host, _, port = item[1:].partition("]:")
        return host, int(port or 53)
    if item.count(":") == 1:
        host, port = item.split(":")
        return host, int(port)
    return item, 53


class HostsFile:
    """``/etc/hosts`` parsed lazily and re-read when its mtime changes."""

    def __init__(self, path: str = HOSTS_PATH) -> None:
        self.path = path
        self._mtime = -1.0
        self._map: dict[str, list[str]] = {}

    def lookup(self, name: str) -> list[str]:
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            return []
        if mtime != self._mtime:
            self._map = self._parse()
            self._mtime = mtime
        return list(self._map.get(name.lower().rstrip("."), ()))

    def _parse(self) -> dict[str, list[str]]:
        table: dict[str, list[str]] = {}
        try:
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    fields = line.split("#", 1)[0].split()
                    if len(fields) < 2:
                        continue
                    try:
                        ip = str(ipaddress.ip_address(fields[0].split("%", 1)[0]))
                    except ValueError:
                        continue
                    for name in fields[1:]:
                        addrs = table.setdefault(name.lower().rstrip("."), [])
                        if ip not in addrs:
                            addrs.append(ip)
        except OSError:
            return {}
        for addrs in table.values():  # IPv4 first, as Go's resolver prefers
            addrs.sort(key=lambda a: ":" in a)
        return table


class Resolver:
    """Resolves host names to IP strings (IPv4 first)."""

    def __init__(
        self,
        servers: tuple[str, ...],
        ttl: float = 300.0,
        timeout: float = 5.0,
        log: InstanceLog | None = None,
        hosts: HostsFile | None = None,
    ) -> None:
        self.servers = tuple(_split_server(s) for s in servers)
        self.ttl = ttl
        self.timeout = timeout
        self.log = log or InstanceLog("none")
        self.hosts = hosts or HostsFile()
        self._cache: dict[str, _Entry] = {}
        self._literals: dict[str, str | None] = {}  # host -> canonical IP, or None for a name
        self._inflight: dict[str, AsyncResult] = {}

    def set_servers(self, servers: tuple[str, ...]) -> None:
        """New DNS servers (SIGHUP); the cache is dropped when they change."""
        new = tuple(_split_server(s) for s in servers)
        if new != self.servers:
            self.servers = new
            self._cache.clear()

    def listen_ip(self, host: str) -> str | None:
        """The IP to bind a listener on *host*, or None when *host* can be bound as given
        (all interfaces, an IP literal, or ``localhost``)."""
        if host == "" or host.lower() == "localhost":
            return None
        try:
            ipaddress.ip_address(host)
            return None
        except ValueError:
            return self.resolve(host)[0]

    def _literal(self, host: str) -> str | None:
        """*host* as a canonical IP, or None for a name (parsed once: every dial asks again)."""
        if host in self._literals:
            return self._literals[host]
        try:
            literal: str | None = str(ipaddress.ip_address(host))
        except ValueError:
            literal = None
        if len(self._literals) >= 1024:
            self._literals.clear()
        self._literals[host] = literal
        return literal

    def resolve_now(self, host: str) -> list[str] | None:
        """The IPs of *host* if known without a lookup (an IP literal, a fresh cache entry),
        else None: safe in a hub callback."""
        literal = self._literal(host)
        if literal is not None:
            return [literal]
        entry = self._cache.get(host.lower().rstrip("."))
        if entry is not None and entry.expires > time.monotonic():
            return entry.addrs
        return None

    def resolve(self, host: str) -> list[str]:
        """Return the IPs of *host* (an IP literal is returned as is)."""
        literal = self._literal(host)
        if literal is not None:
            return [literal]
        name = host.lower().rstrip(".")
        now = time.monotonic()
        entry = self._cache.get(name)
        if entry is not None and entry.expires > now:
            return entry.addrs
        pending = self._inflight.get(name)
        if pending is not None:
            return pending.get()
        pending = self._inflight[name] = AsyncResult()
        try:
            try:
                addrs = self._lookup(name)
            except ResolveError as exc:
                if entry is None:
                    raise
                self.log.warn("DNS re-resolution of %s failed (%s): keeping %s",
                              name, exc, ",".join(entry.addrs))
                addrs = entry.addrs
            self._cache[name] = _Entry(addrs, time.monotonic() + self.ttl)
            pending.set(addrs)
            return addrs
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        finally:
            del self._inflight[name]

    def _lookup(self, name: str) -> list[str]:
        addrs = self.hosts.lookup(name)
        if addrs:
            return addrs
        if not self.servers:
            raise ResolveError("cannot resolve %s: no DNS servers configured" % name)
        _need_dnspython()
        deadline = time.monotonic() + self.timeout
        jobs = [gevent.spawn(self._query_all, name, rdtype, deadline)
                for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)]
        gevent.joinall(jobs)
        found: list[str] = []
        reasons: list[str] = []
        for job in jobs:
            addrs, why = job.value if job.successful() else ([], str(job.exception))
            found.extend(addrs)
            if why:
                reasons.append(why)
        if found:
            self.log.debug("DNS resolved %s -> %s", name, ",".join(found))
            return found
        reason = reasons[0] if reasons else "no such host"
        raise ResolveError("cannot resolve %s: %s" % (name, reason))

    def _query_all(self, name: str, rdtype: dns.rdatatype.RdataType,
                   deadline: float) -> tuple[list[str], str]:
        """(addresses, "") or ([], reason): a task that ends by raising would be reported by
        gevent as an unhandled error, with a traceback, on every failed lookup."""
        last = "no answer"
        for index, (server, port) in enumerate(self.servers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                last = "timed out"
                break
            # share the remaining time among the servers still to try
            budget = remaining / (len(self.servers) - index)
            try:
                response = self._query(name, rdtype, server, port, budget)
            except (OSError, dns.exception.DNSException, gevent.Timeout) as exc:
                last = "%s:%d: %s" % (server, port, exc or type(exc).__name__)
                continue
            rcode = response.rcode()
            if rcode == dns.rcode.NXDOMAIN:
                return [], "no such host"
            if rcode != dns.rcode.NOERROR:
                last = "%s:%d: %s" % (server, port, dns.rcode.to_text(rcode))
                continue
            return [
                rd.address
                for rrset in response.answer
                if rrset.rdtype == rdtype
                for rd in rrset
            ], ""
        return [], last

    def _query(self, name: str, rdtype: dns.rdatatype.RdataType, server: str, port: int,
               timeout: float) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype)
        query.id = random.getrandbits(16)
        wire = query.to_wire()
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        with gevent.Timeout(timeout, socket.timeout("timed out")):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.connect((server, port))
                sock.send(wire)
                while True:
                    data = sock.recv(65535)
                    try:
                        response = dns.message.from_wire(data)
                    except dns.exception.DNSException:
                        continue  # stray or garbage datagram: keep waiting
                    if response.id == query.id and query.is_response(response):
                        break
            finally:
                sock.close()
            if response.flags & dns.flags.TC:
                response = self._query_tcp(query, wire, family, server, port)
        return response

    @staticmethod
    def _query_tcp(query: dns.message.Message, wire: bytes, family: int, server: str,
                   port: int) -> dns.message.Message:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.connect((server, port))
            sock.sendall(struct.pack("!H", len(wire)) + wire)
            head = _recv_exact(sock, 2)
            return dns.message.from_wire(_recv_exact(sock, struct.unpack("!H", head)[0]))
        finally:
            sock.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ResolveError("DNS server closed the TCP connection")
        buf += chunk
    return bytes(buf)
