#!/usr/bin/env python3
"""Memory per idle TLS connection pair, as npgevent's pool makes them, in one process.

    python bench/tls_memory.py [--pairs 400]
    heaptrack python bench/tls_memory.py --pairs 400 --groups default   # where each byte is

*pairs* server/client pairs of :class:`npgevent.net.tls.TLSStream` over loopback TCP, from
npgevent's own contexts (TLS 1.3, ``SSL_MODE_RELEASE_BUFFERS``), are handshaken and kept;
the figures are the growth of RSS and of glibc's bytes in use (``mallinfo2``: OpenSSL and
every C allocation; Python's small objects live in its own arenas and show in RSS only)
divided by the number of pairs, after a warm-up of 50 pairs.  ``--groups`` offers other key
exchange groups than OpenSSL's default (X25519MLKEM768 first): ``X25519`` shows what the
hybrid post-quantum share keeps for the life of a connection.  Under ``heaptrack``, the
peak view splits the bytes by the OpenSSL function that allocated them (bench/README.md,
eleventh pass).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from gevent import socket  # noqa: E402
from OpenSSL import SSL  # noqa: E402

from npgevent.net import tlsctx  # noqa: E402
from npgevent.net.certs import self_signed  # noqa: E402
from npgevent.net.tls import TLSStream  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ["arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"]]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def in_use() -> int:
    """Bytes glibc's malloc has handed out and not had back (heap and mmap'd chunks)."""
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def set_groups(ctx: SSL.Context, groups: str) -> None:
    from OpenSSL._util import lib  # SSL_CTX_set1_groups_list, under its older name

    if lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode()) != 1:
        raise SystemExit("OpenSSL refused the groups %r" % groups)


def measure(pairs: int, groups: str) -> dict[str, float]:
    cert, key = self_signed()
    server_ctx, client_ctx = tlsctx.server_context(cert, key), tlsctx.client_context("1")
    if groups != "default":
        for ctx in (server_ctx, client_ctx):
            set_groups(ctx, groups)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    kept: list[Any] = []

    def one() -> None:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        server_end, client_end = TLSStream.server(accepted, server_ctx), TLSStream.client(client, client_ctx)
        done = gevent.spawn(server_end.handshake, 10)
        client_end.handshake(10)
        done.get()
        kept.append((server_end, client_end))

    try:
        for _ in range(50):
            one()
        gc.collect()
        rss0, used0 = rss(), in_use()
        for _ in range(pairs):
            one()
        gc.collect()
        return {"rss_kb": (rss() - rss0) / pairs / 1024, "malloc_kb": (in_use() - used0) / pairs / 1024}
    finally:
        for server_end, client_end in kept:
            server_end.close()
            client_end.close()
        listener.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--groups", action="append", help="key exchange groups (OpenSSL list); "
                    "default: OpenSSL's default, then X25519")
    args = ap.parse_args()
    groups = args.groups or ["default", "X25519"]
    if len(groups) > 1:  # one process each: memory freed by one run would serve the next
        for g in groups:
            subprocess.run([sys.executable, __file__, "--pairs", str(args.pairs), "--groups", g],
                           check=True, timeout=600)
        return 0
    r = measure(args.pairs, groups[0])
    print("%-10s per pair: RSS %.1f KB, malloc in use %.1f KB" % (groups[0], r["rss_kb"], r["malloc_kb"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
