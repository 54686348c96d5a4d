"""The control handshake over a socket: Go's, or npgevent's authenticated one.

The wire formats are in :mod:`npgevent.protocol.handshake` (Go's) and
:mod:`npgevent.protocol.auth` (npgevent's); this module reads and writes the
lines, with a length limit and the caller's socket timeout, and decides which
handshake a peer gets according to the ``auth`` setting:

=====  =====================================  =======================================
auth   server                                 client
=====  =====================================  =======================================
0      Go's handshake for everyone            Go's handshake (with the npgevent marker)
1      npgevent clients must authenticate;    authenticates with npgevent servers;
       Go clients get Go's handshake          takes Go's answer from a Go server
2      npgevent clients that authenticate;    sends a line Go servers refuse; accepts
       anyone else is refused, no reply       only a server that proves the key
=====  =====================================  =======================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import RemoteProtocolError
from ..protocol.auth import (
    AUTH_ONLY,
    CHALLENGE,
    MAX_AUTH_LINE,
    ClientAuth,
    ServerAuth,
    SessionKeys,
    is_marker,
)
from ..protocol.handshake import (
    EXTENSION_LEVEL,
    Reply,
    check_hello,
    client_hello,
    parse_reply,
    read_reply,
    server_reply,
)
from ..protocol.signals import MAX_LINE


class HandshakeError(Exception):
    """The handshake failed; ``str()`` is one line for the log.  ``refused`` marks a peer
    turned away by the ``auth`` policy (as opposed to a wrong key or a broken connection)."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass
class Outcome:
    reply: Reply
    keys: SessionKeys | None  # set when both ends authenticated
    fingerprint: str  # the TLS certificate the server vouched for ('' if none / not authenticated)
    leftover: bytes  # bytes read past the last handshake line


class LineReader:
    def __init__(self, sock: Any, limit: int = MAX_LINE) -> None:
        self.sock, self.limit, self.buf = sock, limit, b""

    def line(self) -> bytes:
        """The next line with its ``\\n`` (or ``\\r\\n``); HandshakeError at EOF or over the limit."""
        while b"\n" not in self.buf:
            if len(self.buf) > self.limit:
                raise HandshakeError("handshake line over %d bytes" % self.limit)
            chunk = self.sock.recv(4096)
            if not chunk:
                raise HandshakeError("connection closed during the handshake")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"


# -- server ----------------------------------------------------------------------------------

def serve(sock: Any, key: bytes, auth: str, make_reply: Callable[[int], Reply], fingerprint: str,
          claim: Callable[[Reply], bool]) -> Outcome:
    """Run one handshake attempt on an accepted connection (the caller sets the deadline).

    *make_reply(level)* builds the reply for the agreed extension level; *claim(reply)* is
    asked just before the reply goes out and answers False when another attempt already took
    the control slot (then nothing is sent).  Raises HandshakeError.
    """
    reader = LineReader(sock)
    first = reader.line()
    if len(first) > MAX_AUTH_LINE:
        raise HandshakeError("access denied")
    marker = is_marker(first)
    if first == AUTH_ONLY or (marker and auth != "0"):
        if auth == "0":
            raise HandshakeError("access denied (an authenticating client; this server has auth=0)", True)
        hello = check_hello(first, key) if first != AUTH_ONLY else None
        if hello is not None and not hello.key_ok:
            raise HandshakeError("access denied")
        state = ServerAuth(key)
        sock.sendall(state.challenge())
        try:
            state.check_client(reader.line())
        except RemoteProtocolError as exc:
            raise HandshakeError("access denied: %s" % exc) from None
        reply = make_reply(EXTENSION_LEVEL)
        if not claim(reply):
            raise HandshakeError("control slot already taken")
        sock.sendall(state.finish("%s %s" % (reply.encode(), fingerprint or "-")))
        return Outcome(reply, state.keys, fingerprint, reader.buf)
    hello = check_hello(first, key)
    if not hello.key_ok:
        raise HandshakeError("access denied")
    if auth == "2":
        raise HandshakeError("refused: the client speaks only Go NodePass's handshake, which proves "
                             "nothing; auth=2 accepts only peers that prove the key", True)
    reply = make_reply(EXTENSION_LEVEL if hello.npgevent else 0)
    if not claim(reply):
        raise HandshakeError("control slot already taken")
    sock.sendall(server_reply(reply, key))
    return Outcome(reply, None, "", reader.buf)


# -- client ----------------------------------------------------------------------------------

def dial(sock: Any, key: bytes, auth: str) -> Outcome:
    """The client's handshake on a connected socket (the caller sets the deadline)."""
    sock.sendall(AUTH_ONLY if auth == "2" else client_hello(key))
    reader = LineReader(sock)
    try:
        first = reader.line()
    except HandshakeError:
        if auth == "2":
            raise HandshakeError("the server closed the connection: it does not authenticate "
                                 "(a Go NodePass server, or auth=0), or the key is wrong; auth=2 "
                                 "needs an npgevent server that proves the key", True) from None
        raise HandshakeError("connection closed by the server (wrong tunnel key?)") from None
    if first.startswith(CHALLENGE) and auth != "0":
        state = ClientAuth(key)
        try:
            sock.sendall(state.answer(first))
            text = state.check_server(reader.line())
        except RemoteProtocolError as exc:
            raise HandshakeError("authentication failed: %s (wrong tunnel key?)" % exc) from None
        url, _, fp = text.partition(" ")
        try:
            reply = parse_reply(url)
        except RemoteProtocolError as exc:
            raise HandshakeError(str(exc)) from None
        return Outcome(reply, state.keys, "" if fp in ("", "-") else fp, reader.buf)
    if auth == "2":
        raise HandshakeError("the server answered with Go NodePass's handshake, which proves nothing; "
                             "auth=2 accepts only a server that proves the key", True)
    try:
        reply = read_reply(first, key)
    except RemoteProtocolError as exc:
        raise HandshakeError(str(exc)) from None
    return Outcome(reply, None, "", reader.buf)
