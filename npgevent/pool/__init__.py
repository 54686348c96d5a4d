"""Pre-warmed pool connections: adaptive sizing (pure), TCP/TLS pool, QUIC pool."""
