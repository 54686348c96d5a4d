"""TLS contexts for pool connections and the master API (pyOpenSSL, TLS 1.3 only).

* :func:`server_context` and :class:`ServerTLS`: the server side, code 1 (a self-signed
  certificate made in memory) or 2 (the ``crt``/``key`` PEM files, re-read every
  ``NP_RELOAD_INTERVAL`` when a new connection arrives, or at once on SIGHUP; live
  connections keep the context they started with; a file that cannot be loaded at start
  falls back to code 1 with an error log).
* :func:`client_context`: code 1 without verification, code 2 verifying against the system
  roots (``SSL_CERT_FILE`` is honoured, as Go does); the name is checked by
  :class:`~npgevent.net.tls.TLSStream` after the handshake.

Certificates, fingerprints and PEM files are in :mod:`npgevent.net.certs`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from cryptography import x509

from ..log import InstanceLog
from .certs import common_name, fingerprint, load_pem_pair, self_signed
from .pyopenssl import SSL


def _base_context() -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)  # an idle pool connection keeps no record buffers
    return ctx


def server_context(cert: x509.Certificate, key: Any) -> SSL.Context:
    ctx = _base_context()
    ctx.use_certificate(cert)
    ctx.use_privatekey(key)
    ctx.check_privatekey()
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return ctx


class ServerTLS:
    """The server's TLS certificate and context for codes 1 and 2 (see module doc)."""

    def __init__(self, code: str, crt: str, key: str, reload_interval: float, log: InstanceLog) -> None:
        self.log = log
        self.crt, self.key = crt, key
        self.cert: x509.Certificate
        self.pkey: Any
        self.context: SSL.Context
        self.reload_interval = reload_interval
        self.code = code
        self._loaded_at = 0.0
        self._mtimes: tuple[float, float] = (0.0, 0.0)
        if code == "2":
            try:
                self._load_files()
                log.info("TLS code-2: %s with TLS 1.3", common_name(self.cert) or crt)
                return
            except (OSError, ValueError, SSL.Error) as exc:
                log.error("TLS code-2: cannot load crt=%s key=%s (%s): falling back to code-1",
                          crt, key, reason(exc))
                self.code = "1"
        self.cert, self.pkey = self_signed()
        self.context = server_context(self.cert, self.pkey)
        log.info("TLS code-1: RAM cert with TLS 1.3")

    def _load_files(self) -> None:
        cert, pkey = load_pem_pair(self.crt, self.key)
        ctx = server_context(cert, pkey)
        self.cert, self.pkey, self.context = cert, pkey, ctx
        self._loaded_at = time.monotonic()
        self._mtimes = (os.path.getmtime(self.crt), os.path.getmtime(self.key))

    def current(self) -> SSL.Context:
        """The context for a new connection (reloading code-2 files when due)."""
        if self.code == "2" and time.monotonic() - self._loaded_at >= self.reload_interval:
            self._loaded_at = time.monotonic()
            try:
                mtimes = (os.path.getmtime(self.crt), os.path.getmtime(self.key))
                if mtimes != self._mtimes:
                    old = fingerprint(self.cert)
                    self._load_files()
                    self.log.info("TLS cert reloaded: %s %s (was %s)", common_name(self.cert) or self.crt,
                                  fingerprint(self.cert), old)
            except (OSError, ValueError, SSL.Error) as exc:
                self.log.error("TLS cert reload failed (%s): keeping the current certificate", reason(exc))
        return self.context

    def reload_now(self) -> bool:
        """Re-read the code-2 files at once (SIGHUP); on failure keep the current pair.
        True when a new certificate is in use."""
        if self.code != "2":
            return False
        old = fingerprint(self.cert)
        try:
            self._load_files()
        except (OSError, ValueError, SSL.Error) as exc:
            self.log.error("TLS cert reload failed (%s): keeping the current certificate", reason(exc))
            return False
        if fingerprint(self.cert) == old:
            self.log.info("TLS cert reloaded: unchanged (%s)", old)
            return False
        self.log.info("TLS cert reloaded: %s %s (was %s)", common_name(self.cert) or self.crt,
                      fingerprint(self.cert), old)
        return True

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)


def client_context(code: str) -> SSL.Context:
    """Client side: code 1 trusts anything, code 2 verifies against the system roots."""
    ctx = _base_context()
    if code == "2":
        ctx.set_verify(SSL.VERIFY_PEER, lambda _c, _x, _e, _d, ok: bool(ok))
        ctx.set_default_verify_paths()
        cafile = os.environ.get("SSL_CERT_FILE")
        if cafile and os.path.exists(cafile):
            ctx.load_verify_locations(cafile)
    else:
        ctx.set_verify(SSL.VERIFY_NONE, lambda *_a: True)
    return ctx


def reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return "%s: %s" % (exc.strerror, exc.filename or "")
    if isinstance(exc, SSL.Error) and exc.args and exc.args[0]:
        try:
            return "; ".join(str(e[2]) for e in exc.args[0])
        except (TypeError, IndexError):
            pass
    return str(exc) or type(exc).__name__
