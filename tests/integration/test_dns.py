"""Name resolution with dnspython against a fake DNS server on loopback."""

from __future__ import annotations

import time

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import gevent
import pytest
from gevent.server import DatagramServer
from helpers import TcpEcho, echo_roundtrip, free_port, in_process

from npgevent.net.resolver import HostsFile, ResolveError, Resolver


class FakeDns:
    """Answers A/AAAA queries from a dict; records every query; can go silent."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.queries: list[tuple[str, str]] = []
        self.silent = False
        self.server = DatagramServer(("127.0.0.1", 0), self._handle)
        self.server.start()

    @property
    def addr(self) -> str:
        return "127.0.0.1:%d" % self.server.address[1]

    def _handle(self, data: bytes, addr) -> None:
        query = dns.message.from_wire(data)
        q = query.question[0]
        name = q.name.to_text().rstrip(".")
        self.queries.append((name, dns.rdatatype.to_text(q.rdtype)))
        if self.silent:
            return
        response = dns.message.make_response(query)
        if name not in self.answers:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            want = [a for a in self.answers[name] if (":" in a) == (q.rdtype == dns.rdatatype.AAAA)]
            if want:
                response.answer.append(dns.rrset.from_text(q.name, 60, "IN", q.rdtype, *want))
        self.server.sendto(response.to_wire(), addr)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def fake_dns():
    server = FakeDns({"svc.test": ["127.0.0.1"], "dual.test": ["127.0.0.1", "::1"]})
    yield server
    server.close()


@pytest.fixture
def empty_hosts(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("")
    return HostsFile(str(path))


def test_ip_literal_needs_no_query(fake_dns, empty_hosts):
    r = Resolver((fake_dns.addr,), hosts=empty_hosts)
    assert r.resolve("192.0.2.5") == ["192.0.2.5"]
    assert r.resolve("::1") == ["::1"]
    assert fake_dns.queries == []


def test_hosts_file_first(tmp_path, fake_dns):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.9  svc.test alias.test  # comment\n::1 svc.test\n")
    r = Resolver((fake_dns.addr,), hosts=HostsFile(str(hosts)))
    assert r.resolve("SVC.test.") == ["127.0.0.9", "::1"]
    assert r.resolve("alias.test") == ["127.0.0.9"]
    assert fake_dns.queries == []


def test_system_hosts_resolves_localhost_without_network():
    r = Resolver(("192.0.2.53",), timeout=1)  # unreachable server: must not be needed
    assert "127.0.0.1" in r.resolve("localhost")


def test_a_and_aaaa_ipv4_first_and_cached(fake_dns, empty_hosts):
    r = Resolver((fake_dns.addr,), ttl=60, hosts=empty_hosts)
    assert r.resolve("dual.test") == ["127.0.0.1", "::1"]
    assert sorted(fake_dns.queries) == [("dual.test", "A"), ("dual.test", "AAAA")]
    assert r.resolve("dual.test") == ["127.0.0.1", "::1"]
    assert len(fake_dns.queries) == 2  # cached


def test_re_resolved_after_ttl(fake_dns, empty_hosts):
    r = Resolver((fake_dns.addr,), ttl=0.3, hosts=empty_hosts)
    assert r.resolve("svc.test") == ["127.0.0.1"]
    fake_dns.answers["svc.test"] = ["127.0.0.2"]
    assert r.resolve("svc.test") == ["127.0.0.1"]
    gevent.sleep(0.4)
    assert r.resolve("svc.test") == ["127.0.0.2"]


def test_concurrent_lookups_share_one_query(fake_dns, empty_hosts):
    r = Resolver((fake_dns.addr,), hosts=empty_hosts)
    jobs = [gevent.spawn(r.resolve, "svc.test") for _ in range(20)]
    gevent.joinall(jobs, timeout=5)
    assert all(j.value == ["127.0.0.1"] for j in jobs)
    assert len(fake_dns.queries) == 2


def test_servers_tried_in_turn(fake_dns, empty_hosts):
    dead = "127.0.0.1:%d" % free_port()  # nothing listens: ICMP port unreachable
    r = Resolver((dead, fake_dns.addr), hosts=empty_hosts)
    assert r.resolve("svc.test") == ["127.0.0.1"]


def test_silent_server_then_working_one(fake_dns, empty_hosts):
    silent = FakeDns({})
    silent.silent = True
    try:
        r = Resolver((silent.addr, fake_dns.addr), timeout=2, hosts=empty_hosts)
        start = time.monotonic()
        assert r.resolve("svc.test") == ["127.0.0.1"]
        assert time.monotonic() - start < 2.5
    finally:
        silent.close()


def test_nxdomain_is_a_clear_error(fake_dns, empty_hosts):
    r = Resolver((fake_dns.addr,), hosts=empty_hosts)
    with pytest.raises(ResolveError, match=r"cannot resolve nope\.test: no such host"):
        r.resolve("nope.test")


def test_timeout_is_bounded_and_clear(empty_hosts):
    silent = FakeDns({})
    silent.silent = True
    try:
        r = Resolver((silent.addr,), timeout=0.5, hosts=empty_hosts)
        start = time.monotonic()
        with pytest.raises(ResolveError, match=r"cannot resolve svc\.test: .*timed out"):
            r.resolve("svc.test")
        assert time.monotonic() - start < 1.5
    finally:
        silent.close()


def test_stale_answer_kept_when_re_resolution_fails(fake_dns, empty_hosts):
    r = Resolver((fake_dns.addr,), ttl=0.2, timeout=0.5, hosts=empty_hosts)
    assert r.resolve("svc.test") == ["127.0.0.1"]
    fake_dns.silent = True
    gevent.sleep(0.3)
    assert r.resolve("svc.test") == ["127.0.0.1"]


def test_forwarder_resolves_target_name_and_follows_changes(fake_dns):
    a = TcpEcho("127.0.0.1")
    b = TcpEcho("127.0.0.3", a.port)
    port = free_port()
    fake_dns.answers["svc.test"] = ["127.0.0.1"]
    try:
        url = "client://127.0.0.1:%d/svc.test:%d?dns=%s" % (port, a.port, fake_dns.addr)
        with in_process(url, dns_caching_ttl="300ms"):
            assert echo_roundtrip(port, b"one") == b"one"
            accepted_a = a.accepted
            fake_dns.answers["svc.test"] = ["127.0.0.3"]
            gevent.sleep(0.4)
            assert echo_roundtrip(port, b"two") == b"two"
            assert b.accepted >= 1
            assert a.accepted >= accepted_a
    finally:
        a.close()
        b.close()


def test_forwarder_logs_unresolvable_target(fake_dns):
    port = free_port()
    with in_process("client://127.0.0.1:%d/nope.test:80?dns=%s" % (port, fake_dns.addr)) as r:
        from helpers import connect_retry, recv_all

        sock = connect_retry(port)
        assert recv_all(sock) == b""
        sock.close()
        r.capture.wait_for(r"ERROR  Dial target failed .*nope\.test:80: cannot resolve nope\.test: no such host")


def test_failed_lookups_leave_no_tracebacks(fake_dns):
    """A name that does not resolve (and one whose server is silent): one clear line per
    attempt (rate-limited), never gevent's unhandled-greenlet report of a resolver task."""
    from helpers import NpProcess, connect_retry, recv_all

    port = free_port()
    with NpProcess("client://127.0.0.1:%d/nope.test:80?dns=%s" % (port, fake_dns.addr)) as p:
        p.wait_for("Client started")
        for _ in range(3):
            sock = connect_retry(port)
            assert recv_all(sock) == b""
            sock.close()
        p.wait_for(r"ERROR  Dial target failed .*no such host")
        assert p.stop() == 0
        assert "Traceback" not in p.output and "ResolveError" not in p.output, p.output
