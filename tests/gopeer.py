"""Scripted peers that behave like Go NodePass v1.11.0 on the wire (per the captures).

They are deliberately simple and literal: a Go client sends ``encode(key) + "\\n"``
and never anything npgevent-specific; a Go server answers
``np://<quic>@<max>/<flow>#<tls>`` without a query.  Tests use them to check
what npgevent sends to a Go peer, byte for byte, and to replay captured lines.
"""

from __future__ import annotations

import json
from typing import Any

import gevent
from gevent import socket, ssl
from gevent.queue import Queue
from helpers import DATA

from npgevent.protocol.signals import LineDecoder, Ping, Pong, Signal, decode_line, encode_line, parse_signal


def load_vector(name: str) -> dict[str, Any]:
    return json.loads((DATA / "vectors" / (name + ".json")).read_text())


def read_line(sock: socket.socket, limit: int = 70000) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        c = sock.recv(1)
        if not c:
            return buf
        buf += c
        if len(buf) > limit:
            break
    return buf


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        c = sock.recv(n - len(buf))
        if not c:
            raise ConnectionError("EOF after %d bytes" % len(buf))
        buf += c
    return buf


class Control:
    """A Go-style control connection: answers pings, records every signal received."""

    def __init__(self, sock: socket.socket, key: bytes, answer_pings: bool = True) -> None:
        self.sock = sock
        self.key = key
        self.signals: Queue = Queue()
        self.raw_lines: list[bytes] = []
        self.answer_pings = answer_pings
        self.reader = gevent.spawn(self._read)

    def _read(self) -> None:
        buf = b""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    self.signals.put(None)
                    return
                buf += data
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    self.raw_lines.append(line + b"\n")
                    sig = LineDecoder(self.key).feed(line + b"\n")[0]
                    if isinstance(sig, Ping) and self.answer_pings:
                        self.send(Pong().encode())
                    self.signals.put(sig)
        except OSError:
            self.signals.put(None)

    def send(self, message: str) -> None:
        self.sock.sendall(encode_line(message, self.key))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_signal(self, kind: type, timeout: float = 10.0) -> Signal:
        with gevent.Timeout(timeout, AssertionError("no %s signal" % kind.__name__)):
            while True:
                sig = self.signals.get()
                if sig is None:
                    raise AssertionError("control connection closed")
                if isinstance(sig, kind):
                    return sig

    def close(self) -> None:
        self.reader.kill()
        self.sock.close()


class GoClient:
    """Connects to an npgevent server the way the Go client does."""

    def __init__(self, port: int, key: bytes, host: str = "127.0.0.1") -> None:
        self.port, self.key, self.host = port, key, host
        self.control: Control | None = None
        self.pool: dict[str, socket.socket] = {}

    def handshake(self, key_line: bytes | None = None) -> bytes:
        sock = socket.create_connection((self.host, self.port), timeout=10)
        sock.sendall(key_line if key_line is not None else encode_line(self.key, self.key))
        reply = read_line(sock)
        if reply:
            self.control = Control(sock, self.key)
        else:
            sock.close()
        return reply

    def open_pool(self, n: int, tls: bool = False) -> list[str]:
        """Open *n* pool connections in order (TLS 1.3 without verification, as the Go client
        does for tls=1, when *tls*); return their ids, oldest first."""
        ids = []
        for _ in range(n):
            s = socket.create_connection((self.host, self.port), timeout=10)
            if tls:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                ctx.minimum_version = ssl.TLSVersion.TLSv1_3
                s = ctx.wrap_socket(s)
            cid = recv_exact(s, 4).hex()
            self.pool[cid] = s
            ids.append(cid)
        return ids

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        for s in self.pool.values():
            s.close()


class GoServer:
    """Accepts an npgevent client the way the Go server does (replay-friendly)."""

    def __init__(self, key: bytes, reply: str, ids: list[str] | None = None) -> None:
        self.key = key
        self.reply = reply
        self.ids = list(ids or [])
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.hello_lines: list[bytes] = []
        self.control: Control | None = None
        self.pool: dict[str, socket.socket] = {}
        self.pool_arrivals: Queue = Queue()
        self.accepter = gevent.spawn(self._accept)
        self.answer_pings = True

    def _accept(self) -> None:
        import os

        while True:
            sock, _ = self.listener.accept()
            if self.control is None:
                line = read_line(sock)
                self.hello_lines.append(line)
                try:
                    ok = decode_line(line, self.key) == self.key  # Go's check (\r is ignored)
                except Exception:
                    ok = False
                if not ok:
                    sock.close()
                    continue
                sock.sendall(encode_line(self.reply, self.key))
                self.control = Control(sock, self.key, self.answer_pings)
                continue
            cid = self.ids.pop(0) if self.ids else os.urandom(4).hex()
            sock.sendall(bytes.fromhex(cid))
            self.pool[cid] = sock
            self.pool_arrivals.put(cid)

    def wait_pool(self, n: int, timeout: float = 10.0) -> list[str]:
        got = []
        with gevent.Timeout(timeout, AssertionError("only %d pool connections" % len(got))):
            while len(got) < n:
                got.append(self.pool_arrivals.get())
        return got

    def close(self) -> None:
        self.accepter.kill()
        if self.control is not None:
            self.control.close()
        for s in self.pool.values():
            s.close()
        self.listener.close()


__all__ = ["Control", "GoClient", "GoServer", "load_vector", "parse_signal", "read_line", "recv_exact"]
