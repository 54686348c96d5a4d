"""gevent sockets made and closed with less around them (npgevent.net.lightsock): they behave
as gevent's own in everything a relay uses, a close with nothing waiting releases the
descriptor at once, and a close under a waiting greenlet still fails that greenlet as gevent's
close does."""

from __future__ import annotations

import os
import socket as stdsocket

import gevent
import pytest
from gevent import socket
from helpers import tcp_pair

from npgevent.net import lightsock

pytestmark = pytest.mark.timeout(30)


def _light_pair() -> tuple[socket.socket, socket.socket]:
    """(light dialled socket, its accepted peer as a light socket too)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = lightsock.tcp_socket(stdsocket.AF_INET)
    client.settimeout(5)
    client.connect(listener.getsockname())
    fd, _addr = listener._accept()
    server = lightsock.accepted(fd, listener.family, listener.type, listener.proto)
    listener.close()
    return client, server


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_light_sockets_are_gevent_sockets_that_wait_in_greenlets():
    client, server = _light_pair()
    assert lightsock.USABLE and type(client) is lightsock.LightSocket
    assert isinstance(server, socket.socket) and server.gettimeout() is None
    reader = gevent.spawn(server.recv, 100)  # waits in the hub, not in the kernel
    gevent.sleep(0.01)
    assert not reader.ready()
    client.sendall(b"x" * 3_000_000)  # more than the buffers hold: sendall waits too
    got = bytearray(reader.get(timeout=5))
    while len(got) < 3_000_000:
        got += server.recv(1 << 20)
    assert bytes(got) == b"x" * 3_000_000
    server.settimeout(0.05)
    with pytest.raises(socket.timeout):
        server.recv(10)
    client.close()
    server.close()


def test_a_close_with_nothing_waiting_releases_the_descriptor_at_once():
    client, server = _light_pair()
    fds = client.fileno(), server.fileno()
    client.close()
    server.close()
    assert not any(_fd_open(fd) for fd in fds)  # no loop turn needed
    assert client.fileno() == -1 and "closed" in repr(client)
    with pytest.raises(OSError):
        client.send(b"after")
    client.close()  # twice: nothing happens


def test_a_close_under_a_waiting_greenlet_fails_it_as_gevents_does():
    client, server = _light_pair()
    reader = gevent.spawn(server.recv, 100)
    gevent.sleep(0.01)
    fd = server.fileno()
    server.close()  # a greenlet waits on its read watcher: gevent's way
    with pytest.raises(OSError):
        reader.get(timeout=5)
    gevent.sleep(0.05)
    assert not _fd_open(fd)
    client.close()


def test_a_makefile_reference_keeps_the_socket_open_until_it_closes():
    client, server = _light_pair()
    f = server.makefile("rb")
    server.close()
    client.sendall(b"line\n")
    assert f.readline() == b"line\n"
    f.close()
    assert server.fileno() == -1
    client.close()


def test_without_the_fields_it_relies_on_it_builds_plain_gevent_sockets(monkeypatch):
    monkeypatch.setattr(lightsock, "USABLE", False)
    client, server = _light_pair()
    assert type(client) is socket.socket and type(server) is socket.socket
    client.sendall(b"ping")
    assert server.recv(4) == b"ping"
    client.close()
    server.close()


def test_a_relay_between_light_and_gevent_sockets():
    """The hub relay reads and writes the raw sockets under both kinds alike."""
    from npgevent.relay.tcphub import relay_in_hub

    user_far, user = _light_pair()
    target, target_far = tcp_pair()
    acct = [0, 0]
    g = gevent.spawn(relay_in_hub, user, target, acct, 0, 1, 65536, False)
    user_far.sendall(b"request")
    assert target_far.recv(100) == b"request"
    target_far.sendall(b"response")
    assert user_far.recv(100) == b"response"
    user_far.shutdown(socket.SHUT_WR)
    target_far.shutdown(socket.SHUT_WR)
    assert g.get(timeout=5) is None
    assert acct == [8, 7]
    for s in (user_far, user, target, target_far):
        s.close()


def test_the_user_and_pool_listeners_accept_light_sockets():
    """Single-end and tunnel user listeners (``_TcpServer``) and the tunnel's pool listener
    (``KeepingStreamServer``) are made from ``LightStreamServer``: what they accept is light."""
    from npgevent.cores.tunnel import KeepingStreamServer
    from npgevent.relay.listeners import _TcpServer

    assert issubclass(_TcpServer, lightsock.LightStreamServer)
    assert issubclass(KeepingStreamServer, lightsock.LightStreamServer)
    got: list[type] = []

    def handle(sock: socket.socket, _addr: object) -> None:
        got.append(type(sock))
        sock.close()

    server = lightsock.LightStreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        with socket.create_connection(server.address, timeout=5) as client:
            assert client.recv(1) == b""  # the handler closed its end
        assert got == [lightsock.LightSocket]
    finally:
        server.stop()
