"""Test helpers: loopback servers, npgevent processes and in-process runners.

Everything here uses gevent's APIs explicitly (no monkey-patching in the test
process), so an in-process core and the test's own clients share one hub.
Ports come from binding port 0; every wait has a timeout.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import re
import signal
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
from gevent import socket
from gevent import subprocess as gsubprocess
from gevent.server import DatagramServer, StreamServer

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=512)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free for both TCP and UDP on *host* right now, and not one of the last
    ports handed out (the kernel may hand a just-closed port out again at once: a test that
    asks for two ports before binding either could get the same one twice)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        t = socket.socket(family, socket.SOCK_STREAM)
        t.bind((host, 0))
        port = t.getsockname()[1]
        u = socket.socket(family, socket.SOCK_DGRAM)
        try:
            u.bind((host, port))
        except OSError:
            continue
        finally:
            u.close()
            t.close()
        if port in _HANDED_OUT:
            continue
        _HANDED_OUT.append(port)
        return int(port)
    raise RuntimeError("no free port")


# -- loopback servers ----------------------------------------------------------------


class TcpEcho:
    """Echo server; ``prefix`` bytes are sent before echoing; records PROXY lines."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, first_line: bool = False) -> None:
        self.first_lines: list[bytes] = []
        self.first_line = first_line
        self.accepted = 0
        self.server = StreamServer((host, port), self._handle)
        self.server.start()

    @property
    def port(self) -> int:
        return int(self.server.address[1])

    def _handle(self, sock: socket.socket, addr: Any) -> None:
        self.accepted += 1
        buf = b""
        if self.first_line:
            while b"\r\n" not in buf:
                chunk = sock.recv(256)
                if not chunk:
                    return
                buf += chunk
            line, _, buf = buf.partition(b"\r\n")
            self.first_lines.append(line + b"\r\n")
        if buf:
            sock.sendall(buf)
        while True:
            data = sock.recv(65536)
            if not data:
                break
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.stop(timeout=1)

    def __enter__(self) -> TcpEcho:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ByteSource:
    """A TCP server that sends the same block forever to whoever connects (download tests)."""

    def __init__(self, block: bytes = b"s" * 65536) -> None:
        self.block = block
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()

    @property
    def port(self) -> int:
        return int(self.server.address[1])

    def _handle(self, sock: socket.socket, _addr: Any) -> None:
        try:
            while True:
                sock.sendall(self.block)
        except OSError:
            pass

    def close(self) -> None:
        self.server.stop(timeout=1)


class UdpEcho:
    """UDP echo server (handles datagrams up to 64 KiB)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.count = 0
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((host, port))
        self.server = _BigDatagramServer(sock, self._handle)
        self.server.start()

    @property
    def port(self) -> int:
        return int(self.server.address[1])

    def _handle(self, data: bytes, addr: Any) -> None:
        self.count += 1
        self.server.sendto(data, addr)

    def close(self) -> None:
        self.server.close()

    def __enter__(self) -> UdpEcho:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _BigDatagramServer(DatagramServer):  # type: ignore[misc]
    def do_read(self) -> Any:
        try:
            return self._socket.recvfrom(65535)
        except BlockingIOError:
            return None


# -- clients -------------------------------------------------------------------------


def connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def connect_retry(port: int, host: str = "127.0.0.1", deadline: float = 10.0) -> socket.socket:
    end = time.monotonic() + deadline
    while True:
        try:
            return connect(port, host)
        except OSError:
            if time.monotonic() > end:
                raise
            gevent.sleep(0.05)


class NowaitStream:
    """A plain socket with a TLS stream's reads and writes without waiting: the relay starts
    its sessions in hub callbacks on it (npgevent.relay.framedhub), as on a TLS pool."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        return self.sock.recv_into(buffer, nbytes)

    def sendall(self, data) -> None:
        self.sock.sendall(data)

    def settimeout(self, value) -> None:
        self.sock.settimeout(value)

    def gettimeout(self):
        return self.sock.gettimeout()

    def has_buffered(self) -> bool:
        return False

    def recv_into_nowait(self, buffer) -> int | None:
        try:
            return self.sock._sock.recv_into(buffer)
        except BlockingIOError:
            return None

    def send_nowait(self, data) -> int:
        try:
            return self.sock._sock.send(data)
        except BlockingIOError:
            return 0


def track_instances(monkeypatch: Any, cls: type) -> list[Any]:
    """Weak references to every *cls* object made from now on (its ``__init__`` patched)."""
    made: list[Any] = []
    real_init = cls.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(cls, "__init__", init)
    return made


@contextlib.contextmanager
def left_to_the_collector() -> Iterator[list[Any]]:
    """Run the block with the cyclic garbage collector off; then the list holds the objects of
    npgevent classes that only the collector could have freed (reference cycles)."""
    import gc

    gc.collect()
    gc.disable()
    found: list[Any] = []
    try:
        yield found
        gevent.sleep(0.2)  # the hub drops what it held for the last callbacks
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            found += [o for o in gc.garbage if type(o).__module__.startswith("npgevent")]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    finally:
        gc.enable()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one loopback TCP connection (the first has a 5 s timeout)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    near = socket.create_connection(lst.getsockname(), timeout=5)
    far, _ = lst.accept()
    lst.close()
    return near, far


def read_frames(stream: Any, reader: Any) -> tuple[bytes, int]:
    """A framed session's bytes (npgevent.protocol.sessionframe) read from *stream* through
    *reader* up to its terminal frame, and which terminal it was; the reader keeps what came
    after it."""
    from npgevent.protocol.sessionframe import DATA, NEED

    data = bytearray()
    while True:
        kind, chunk = reader.next()
        if kind == DATA:
            data += chunk
        elif kind == NEED:
            room = reader.room()
            n = stream.recv_into(room, len(room))
            assert n, "pool connection closed before the terminal frame"
            reader.filled(n)
        else:
            return bytes(data), kind


def recv_all(sock: socket.socket, limit: int | None = None) -> bytes:
    chunks = []
    total = 0
    while True:
        data = sock.recv(1 << 20)
        if not data:
            break
        chunks.append(data)
        total += len(data)
        if limit is not None and total >= limit:
            break
    return b"".join(chunks)


def upload(near: socket.socket, far: socket.socket, payload: bytes) -> bytes:
    """Send *payload* and a FIN from *near* while reading *far* to its end; then half-close
    *far* too.  What *far* received."""
    sender = gevent.spawn(lambda: (near.sendall(payload), near.shutdown(socket.SHUT_WR)))
    got = recv_all(far)
    sender.get(timeout=10)
    far.shutdown(socket.SHUT_WR)
    return got


def exchange(sock: socket.socket, payload: bytes, timeout: float = 15.0) -> bytes:
    """Send *payload* on an open connection and read back as many bytes (or fewer at EOF).
    No half-close: Go NodePass closes both directions when one ends."""
    sock.settimeout(timeout)
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def echo_exact(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """:func:`exchange` on a new connection to *port*, closed afterwards."""
    sock = connect(port, timeout=timeout)
    try:
        return exchange(sock, payload, timeout)
    finally:
        sock.close()


def echo_roundtrip(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    """Send *payload*, half-close, read everything back."""
    sock = connect_retry(port, host)
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)
    finally:
        sock.close()


def sha_transfer(port: int, size: int, host: str = "127.0.0.1", chunk: int = 1 << 20,
                 half_close: bool = True) -> tuple[str, str]:
    """Stream *size* pseudo-random bytes through an echo path; return (sent sha, received sha).

    ``half_close=False`` reads back exactly *size* bytes instead of waiting for EOF after a
    half-close (Go NodePass closes both directions when one ends)."""
    sock = connect_retry(port, host)
    sock.settimeout(60)
    sent = hashlib.sha256()
    got = hashlib.sha256()
    block = os.urandom(chunk)

    def writer() -> None:
        left = size
        i = 0
        while left:
            piece = block[: min(chunk, left)]
            # vary the content so a reordering would change the digest
            piece = bytes([i & 0xFF]) + piece[1:]
            sock.sendall(piece)
            sent.update(piece)
            left -= len(piece)
            i += 1
        if half_close:
            sock.shutdown(socket.SHUT_WR)

    w = gevent.spawn(writer)
    received = 0
    try:
        while half_close or received < size:
            data = sock.recv(1 << 20)
            if not data:
                break
            got.update(data)
            received += len(data)
        w.get(timeout=60)
    finally:
        w.kill()
        sock.close()
    assert received == size, "received %d of %d bytes" % (received, size)
    return sent.hexdigest(), got.hexdigest()


def served_of_held(port: int, count: int, socks: list[socket.socket]) -> int:
    """Open *count* connections to an echoing *port* and keep them open (appended to *socks*,
    for the caller to close); how many echo a byte back.  The rest were refused (closed
    before or after the byte arrived): a slot limit's count."""
    served = 0
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        socks.append(sock)
        try:
            sock.sendall(b"x")
            served += sock.recv(10) == b"x"
        except OSError:
            pass
    return served


def udp_socket(host: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host, 0))
    sock.settimeout(timeout)
    return sock


def udp_roundtrip(port: int, payload: bytes, host: str = "127.0.0.1", tries: int = 20) -> bytes:
    """Send until an answer comes back (the listener may still be starting)."""
    sock = udp_socket(host, timeout=0.5)
    try:
        for _ in range(tries):
            sock.sendto(payload, (host, port))
            try:
                return bytes(sock.recv(65535))
            except socket.timeout:
                continue
        raise AssertionError("no UDP answer on port %d" % port)
    finally:
        sock.close()


# -- npgevent as a real process --------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;]*m")


class NpProcess:
    """``python -m npgevent URL`` (or *program*, e.g. the Go binary) with its output collected
    line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, cwd: str | None = None,
                 program: list[str] | None = None) -> None:
        full_env = dict(os.environ)
        full_env.pop("NP_URL", None)
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.setdefault("NP_REPORT_INTERVAL", "1s")
        full_env.setdefault("NP_SERVICE_COOLDOWN", "1s")
        if env:
            full_env.update(env)
        self.args = [*(program or [sys.executable, "-m", "npgevent"]), *args]
        self.proc = gsubprocess.Popen(self.args, stdout=gsubprocess.PIPE, stderr=gsubprocess.STDOUT,
                                      env=full_env, cwd=cwd or str(ROOT))
        self.lines: list[str] = []
        self._reader = gevent.spawn(self._read)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(ANSI.sub("", raw.decode("utf-8", "replace").rstrip("\n")))

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 15.0, start: int = 0) -> re.Match[str]:
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        seen = start
        while time.monotonic() < end:
            while seen < len(self.lines):
                m = rx.search(self.lines[seen])
                seen += 1
                if m:
                    return m
            if self.proc.poll() is not None and self._reader.dead and seen >= len(self.lines):
                break
            gevent.sleep(0.02)
        raise AssertionError("no line matching %r within %ss; output:\n%s" % (pattern, timeout, self.output))

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for line in self.lines if rx.search(line))

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 15.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 15.0) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except gsubprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=5)
            raise AssertionError("npgevent did not exit in %ss; output:\n%s" % (timeout, self.output)) from None
        self._reader.join(timeout=5)
        return int(rc)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._reader.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> NpProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def wait_serving(port: int, within: float = 15.0, payload: bytes = b"up?") -> None:
    """Wait until *port* echoes *payload* back (a forwarder or tunnel that is up)."""
    deadline = time.monotonic() + within
    while True:
        try:
            assert echo_exact(port, payload) == payload
            return
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            gevent.sleep(0.1)


def ppid(pid: int) -> int:
    """The parent of process *pid* (-1 once it is gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def status_kb(pid: int, field: str = "VmRSS") -> int:
    """A KiB figure of process *pid* from ``/proc/<pid>/status``: ``VmRSS``, ``VmHWM``..."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s for %d" % (field, pid))


def children(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and ppid(int(p)) == pid]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 20.0) -> tuple[int, str, str]:
    """Run the CLI to completion; return (exit status, stdout, stderr)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    proc = gsubprocess.run([sys.executable, "-m", "npgevent", *args], capture_output=True,
                           env=full_env, timeout=timeout, cwd=str(ROOT))
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


# -- npgevent in-process -------------------------------------------------------------


class LogCapture(logging.Handler):
    """Collects npgevent's formatted log lines (in-process tests)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        from npgevent.log import NodePassFormatter

        self.setFormatter(NodePassFormatter(colour=False))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def wait_for(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < end:
            while seen < len(self.lines):
                m = rx.search(self.lines[seen])
                seen += 1
                if m:
                    return m
            gevent.sleep(0.02)
        raise AssertionError("no log line matching %r; log:\n%s" % (pattern, "\n".join(self.lines)))

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for line in self.lines if rx.search(line))


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """Process *pid* stopped (SIGSTOP) for the duration, continued (SIGCONT) whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def in_process(url: str, wait_running: bool = True, **env_like: str) -> Iterator[Any]:
    """Run an instance in this process's hub; yields the Runner (with ``.capture``)."""
    from npgevent.cores import build_runner
    from npgevent.log import ROOT as LOGROOT
    from npgevent.log import InstanceLog
    from npgevent.settings import resolve
    from npgevent.url import parse_url

    spec = parse_url(url)
    base = {"report_interval": "1s", "service_cooldown": "1s"}
    base.update(env_like)
    opts, warnings = resolve(spec.scheme, spec.query_map, base)
    logger = logging.getLogger(LOGROOT)
    capture = LogCapture()
    logger.addHandler(capture)
    logger.setLevel(logging.DEBUG)
    ilog = InstanceLog(opts.log)
    for w in warnings:
        ilog.warn(w)
    runner = build_runner(spec, opts, ilog)
    runner.capture = capture
    runner.start()
    try:
        if wait_running and not runner.running.wait(timeout=10):
            raise AssertionError("instance did not start:\n" + "\n".join(capture.lines))
        yield runner
    finally:
        runner.stop(1)
        logger.removeHandler(capture)


# -- certificates ------------------------------------------------------------------------


def make_ca_and_cert(directory: Path, names: tuple[str, ...] = ("localhost",),
                     ips: tuple[str, ...] = ("127.0.0.1", "::1"), cn: str = "npgevent-test") -> dict[str, Path]:
    """A throw-away CA and a server certificate signed by it (PEM files in *directory*)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "npgevent test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    out = {"ca": directory / "ca.pem", "crt": directory / "server.crt", "key": directory / "server.key"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    out["ca_key"] = directory / "ca.key"
    out["ca_key"].write_bytes(ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return out


# -- tunnels ---------------------------------------------------------------------------------


class EchoPair:
    """TCP and UDP echo servers on the same port (a tunnel target serves both)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        for _ in range(20):
            port = free_port(host)
            try:
                self.tcp = TcpEcho(host, port)
            except OSError:
                continue
            try:
                self.udp = UdpEcho(host, port)
            except OSError:
                self.tcp.close()
                continue
            self.port = port
            return
        raise RuntimeError("no port for the echo pair")

    def close(self) -> None:
        self.tcp.close()
        self.udp.close()


def tunnel_urls(flow: str, tls: str, tunnel_port: int, user_port: int, target_port: int,
                certs: dict[str, Path] | None = None, key: str = "secret", extra_server: str = "",
                extra_client: str = "") -> tuple[str, str]:
    """(server URL, client URL) for a loopback tunnel; users connect to *user_port*."""
    q = "tls=%s" % tls
    if tls == "2":
        assert certs is not None
        q += "&crt=%s&key=%s" % (certs["crt"], certs["key"])
    user = key + "@" if key else ""
    if flow == "rev":
        server = "server://%s127.0.0.1:%d/127.0.0.1:%d?mode=1&%s%s" % (user, tunnel_port, user_port, q, extra_server)
        client = "client://%s127.0.0.1:%d/127.0.0.1:%d?mode=2%s" % (user, tunnel_port, target_port, extra_client)
    else:
        server = "server://%s127.0.0.1:%d/127.0.0.1:%d?mode=2&%s%s" % (user, tunnel_port, target_port, q, extra_server)
        client = "client://%s127.0.0.1:%d/127.0.0.1:%d?mode=2%s" % (user, tunnel_port, user_port, extra_client)
    return server, client


@contextlib.contextmanager
def inproc_tunnel(flow: str, tls: str, certs: dict[str, Path] | None = None, monkeypatch: Any = None,
                  extra_server: str = "", extra_client: str = "") -> Iterator[tuple[Any, Any, int, EchoPair]]:
    """A loopback tunnel with both ends in this process, its pool filled (4 idle connections
    on the receiving side): yields (server runner, client runner, user port, echo target)."""
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls(flow, tls, tport, uport, echo.port, certs,
                                         extra_server=extra_server, extra_client=extra_client)
    if certs is not None and monkeypatch is not None:
        monkeypatch.setenv("SSL_CERT_FILE", str(certs["ca"]))
    try:
        with in_process(server_url) as s, in_process(client_url) as c:
            receiver = s if flow == "rev" else c
            wait_pool(lambda: receiver.core.pool.active, 4)
            yield s, c, uport, echo
    finally:
        echo.close()


def wait_until(predicate: Any, timeout: float = 15.0, step: float = 0.1, what: str = "condition") -> Any:
    """Poll *predicate* (cooperatively) until it returns something true; that value.  Raises
    AssertionError naming *what* after *timeout* seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        gevent.sleep(step)
    raise AssertionError("%s not met within %ss" % (what, timeout))


def wait_pool(get_active: Any, minimum: int = 1, timeout: float = 15.0) -> None:
    wait_until(lambda: get_active() >= minimum, timeout, 0.05, what="pool of %d" % minimum)


# -- master API ----------------------------------------------------------------------------


class HttpResult:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self) -> Any:
        import json

        return json.loads(self.body)


def http(method: str, port: int, path: str, body: Any = None, key: str | None = None,
         headers: dict[str, str] | None = None, tls: bool = False, timeout: float = 15.0) -> HttpResult:
    """One HTTP request over a gevent socket (cooperative with in-process daemons)."""
    import http.client
    import json

    hdrs = dict(headers or {})
    if key is not None:
        hdrs["X-API-Key"] = key
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    if tls:
        from gevent import ssl as gssl

        ctx = gssl.SSLContext(gssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = gssl.CERT_NONE
        conn: Any = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn._create_connection = socket.create_connection  # gevent's: the request does not block the hub
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return HttpResult(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


class SSEReader:
    """Reads ``GET <base>/events`` in a greenlet; frames land in ``events`` (dicts) and ``raw``."""

    def __init__(self, port: int, path: str, key: str | None = None, in_query: bool = False) -> None:
        import json

        self.events: list[dict[str, Any]] = []
        self.raw = b""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.closed = False
        self._json = json
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        target = path + ("?key=%s" % key if in_query and key else "")
        req = "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n" % target
        if key and not in_query:
            req += "X-API-Key: %s\r\n" % key
        self.sock.sendall((req + "\r\n").encode())
        self.reader = gevent.spawn(self._read)

    def _read(self) -> None:
        buf = b""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                buf += data
                if not self.status and b"\r\n\r\n" in buf:
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    lines = head.decode().split("\r\n")
                    self.status = int(lines[0].split()[1])
                    self.headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
                if self.status:
                    buf = self._decode_chunks(buf)
        except OSError:
            pass
        finally:
            self.closed = True

    def _decode_chunks(self, buf: bytes) -> bytes:
        if self.headers.get("transfer-encoding") != "chunked":
            self._frames(buf)
            return b""
        while True:
            size_line, sep, rest = buf.partition(b"\r\n")
            if not sep:
                return buf
            size = int(size_line, 16)
            if size == 0:  # the last chunk: the response (the stream) is over
                self.closed = True
                return b""
            if len(rest) < size + 2:
                return buf
            self._frames(rest[:size])
            buf = rest[size + 2:]

    def _frames(self, data: bytes) -> None:
        self.raw += data
        while b"\n\n" in self.raw:
            frame, _, self.raw = self.raw.partition(b"\n\n")
            for line in frame.decode().split("\n"):
                if line.startswith("data: "):
                    self.events.append(self._json.loads(line[6:]))
                elif line.startswith(":"):
                    self.events.append({"comment": line})
                elif line.startswith("retry:"):
                    self.events.append({"retry": line})

    def wait(self, pred: Any, timeout: float = 15.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < end:
            while seen < len(self.events):
                ev = self.events[seen]
                seen += 1
                if pred(ev):
                    return ev
            gevent.sleep(0.02)
        raise AssertionError("no matching SSE event; got %s" % [e.get("type", e) for e in self.events])

    def close(self) -> None:
        self.reader.kill()
        self.sock.close()


class MasterProcess(NpProcess):
    """``npgevent master://...`` as a real process with a private state directory."""

    def __init__(self, state_dir: Path, query: str = "log=info", prefix: str = "/api",
                 env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.state_dir = state_dir
        full = {"NP_STATE_DIR": str(state_dir), "NP_REPORT_INTERVAL": "1s"}
        full.update(env or {})
        super().__init__("master://127.0.0.1:%d%s?%s" % (self.port, prefix, query), env=full)
        self.key = self.wait_for(r"API Key (?:created|loaded): ([0-9a-f]{32})").group(1)
        self.wait_for(r"Master started: ")
        self.base = prefix.rstrip("/") + "/v1"
        self.tls = "tls=1" in query or "tls=2" in query

    def api(self, method: str, path: str, body: Any = None, key: Any = "default", **kw: Any) -> HttpResult:
        kw.setdefault("tls", self.tls)
        return http(method, self.port, self.base + path, body, self.key if key == "default" else key, **kw)
