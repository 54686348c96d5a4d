"""QUIC settings as NodePass uses them: TLS 1.3, ALPN ``np-quic``, datagram size, idle timeout."""

from __future__ import annotations

import ssl
from typing import Any

from aioquic.quic.configuration import QuicConfiguration

from .connection import WINDOW

ALPN = "np-quic"
DATAGRAM_SIZE = 1452  # quic-go's maximum: larger datagrams would be dropped by a Go peer


def make_configuration(is_client: bool, idle_timeout: float, tls_code: str = "1",
                       server_name: str = "", cert: Any = None, key: Any = None,
                       datagram_size: int = DATAGRAM_SIZE) -> QuicConfiguration:
    """QUIC settings as NodePass uses them: TLS 1.3, ALPN np-quic, idle timeout."""
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        idle_timeout=idle_timeout,
        max_datagram_size=datagram_size,
        max_stream_data=WINDOW,
        max_data=16 * WINDOW,
    )
    if is_client:
        if server_name and not _is_ip(server_name):
            config.server_name = server_name
        if tls_code == "2":
            import os

            config.verify_mode = ssl.CERT_REQUIRED
            paths = ssl.get_default_verify_paths()
            config.cafile = os.environ.get("SSL_CERT_FILE") or paths.cafile
            config.capath = os.environ.get("SSL_CERT_DIR") or paths.capath
            config.server_name = server_name
        else:
            config.verify_mode = ssl.CERT_NONE
    else:
        config.certificate = cert
        config.private_key = key
    return config


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
