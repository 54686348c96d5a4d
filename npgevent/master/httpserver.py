"""The master's HTTP server: gevent's pywsgi with deadlines, caps and no draining.

The API port faces whoever can reach it, before any key is checked.  Plain
pywsgi waits forever for a request line, headers or a body, keeps idle
keep-alive connections forever, reads (and throws away) whatever body is left
after a response, error responses included, and prints a traceback for
malformed headers.  Here, with every limit in the settings table:

* the request line and headers must arrive within ``http_header_timeout``,
  the next request on a keep-alive connection within ``http_idle_timeout``,
  and a body within ``http_body_timeout`` (:class:`BodyReader`);
* after an error response (4xx/5xx) the connection is closed instead of
  draining the rest of the body; after a good one, at most the body limit is
  drained, within its deadline;
* one source address may hold ``http_max_conns_per_ip`` connections at once;
* malformed requests are answered 400 and logged as one DEBUG line.

SSE streams are exempt from the idle timeout: only reads have deadlines, and a
stream only writes (with its own keepalive comments).
"""

from __future__ import annotations

import collections
from typing import Any

import gevent
from gevent.pywsgi import Input, WSGIHandler, WSGIServer

from ..log import DEBUG, WARN, InstanceLog
from ..net.sockopt import format_addr

_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class DebugLog:
    """pywsgi's error log, sent to our log at debug level (client errors are not ours)."""

    def __init__(self, log: InstanceLog) -> None:
        self.log = log

    def write(self, text: str) -> None:
        text = text.strip()
        if text:
            self.log.limited(DEBUG, "http", "HTTP: %s" % text.splitlines()[-1][:300])

    def flush(self) -> None:
        pass


class HeaderTimeout(Exception):
    pass


class BodyTimeout(Exception):
    pass


class ApiHandler(WSGIHandler):
    """One connection: pywsgi's keep-alive loop with the deadlines of the module docstring."""

    server: ApiServer
    requests = 0

    def read_requestline(self) -> str:
        wait = self.server.idle_timeout if self.requests else self.server.header_timeout
        with gevent.Timeout(wait, False):
            line: str = super().read_requestline()
            self.requests += 1
            return line
        return ""  # nothing in time: close quietly

    def read_request(self, raw_requestline: str) -> bool:
        with gevent.Timeout(self.server.header_timeout, HeaderTimeout):
            return bool(super().read_request(raw_requestline))

    def _handle_client_error(self, ex: BaseException) -> tuple[str, bytes]:
        self.close_connection = True
        if isinstance(ex, HeaderTimeout):
            self.server.error_log.write("headers from %s not complete in %gs"
                                        % (format_addr(self.client_address), self.server.header_timeout))
            return ("408", _TIMEOUT)
        self.server.error_log.write("bad request from %s: %s"
                                    % (format_addr(self.client_address), str(ex)[:200] or type(ex).__name__))
        return ("400", _BAD_REQUEST)

    def handle(self) -> None:
        try:
            super().handle()
        finally:
            # the last request's environ holds its input, which holds this handler: no cycle
            # left for the collector, per connection anyone can open
            env: Any = self.__dict__.pop("environ", None)
            own = env.get("wsgi.input") if isinstance(env, dict) else None
            if isinstance(own, _Input):
                own.handler = None

    def get_environ(self) -> dict[str, Any]:
        env: dict[str, Any] = super().get_environ()
        src: Any = getattr(self, "wsgi_input", None)
        if src is not None:  # the same input, whose leftover body goes through _discard_or_close
            own = _Input(src.rfile, src.content_length, socket=src.socket, chunked_input=src.chunked_input)
            own.handler = self
            env["wsgi.input"] = self.wsgi_input = own
        return env

    def _discard_or_close(self) -> None:
        """After the application: close rather than read a body nobody will use."""
        status = str(self.status or "500")
        if not status.startswith(("2", "3")):
            self.close_connection = True
            return
        left = self.server.max_body
        try:
            with gevent.Timeout(self.server.body_timeout, BodyTimeout):
                while left > 0:
                    data = self.wsgi_input.read(min(left, 65536))
                    if not data:
                        return
                    left -= len(data)
        except (BodyTimeout, OSError, ValueError):
            pass
        self.close_connection = True


class _Input(Input):
    """pywsgi's request body, whose leftover is not drained blindly (see ApiHandler)."""

    handler: ApiHandler | None = None

    def _discard(self) -> None:
        if self.handler is not None:
            self.handler._discard_or_close()
        else:
            super()._discard()


class ApiServer(WSGIServer):
    """pywsgi with a per-connection TLS context (reloadable), a per-address connection cap, and
    the hardened :class:`ApiHandler`."""

    handler_class = ApiHandler
    context_for: Any = None

    def __init__(self, listener: Any, app: Any, opts: Any, error_log: DebugLog, max_body: int) -> None:
        super().__init__(listener, app, log=None, error_log=error_log)
        self.configure(opts)
        self.max_body = max_body
        self.per_ip: collections.Counter[str] = collections.Counter()

    def configure(self, opts: Any) -> None:
        """The deadlines and the per-address cap (at start, and on SIGHUP for new connections)."""
        self.header_timeout = opts.http_header_timeout
        self.body_timeout = opts.http_body_timeout
        self.idle_timeout = opts.http_idle_timeout
        self.max_per_ip = opts.http_max_conns_per_ip

    def handle(self, sock: Any, address: Any) -> None:
        ip = str(address[0]) if isinstance(address, tuple) else ""
        if self.per_ip[ip] >= self.max_per_ip:
            why = "%d open from that address (http_max_conns_per_ip)" % self.per_ip[ip]
            self.error_log.log.limited(WARN, "http-cap", "API connection from %s refused: %s"
                                       % (format_addr(address), why))
            sock.close()
            return
        self.per_ip[ip] += 1
        try:
            if self.context_for is None:
                super().handle(sock, address)
            else:
                self._handle_tls(sock, address)
        finally:
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]

    def _handle_tls(self, sock: Any, address: Any) -> None:
        try:
            with gevent.Timeout(self.header_timeout, HeaderTimeout):
                tls = self.context_for().wrap_socket(sock, server_side=True)
        except (OSError, ValueError, HeaderTimeout) as exc:
            sock.close()
            why = str(exc) or "timed out"
            self.error_log.write("TLS handshake with %s failed: %s" % (format_addr(address), why))
            return
        try:
            super().handle(tls, address)
        finally:
            tls.close()
