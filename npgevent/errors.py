"""The few exception types npgevent raises on purpose.

* :class:`ConfigError` is a problem with what the user asked for (URL, option,
  file).  The CLI shows its message as one line and exits with status 2.
* :class:`RemoteProtocolError` is something a peer sent that does not follow the
  protocol; callers log it and survive (skip the line, drop the connection).
* :class:`LocalProtocolError` is a misuse of a codec by our own code.
* :class:`CoreError` is a runtime failure of a running core (listen failed, the
  control connection died); the runner logs it, cools down and restarts.
"""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def detached(exc: E) -> E:
    """*exc* without its traceback and the exceptions chained to it, to be kept on an object
    (why a session ended).  Kept whole, it holds the frames that raised it, and they hold that
    object: a reference cycle per failed session for the collector, which a peer resetting
    connections as fast as it likes would feed.  The error is only ever reported as a line."""
    exc.__traceback__ = None
    exc.__context__ = exc.__cause__ = None
    return exc


class NpgeventError(Exception):
    """Base class of npgevent's own errors."""


class ConfigError(NpgeventError, ValueError):
    """Invalid user input: shown as one line, exit status 2."""


class ProtocolError(NpgeventError):
    """Base of protocol violations."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that does not follow the protocol."""


class LocalProtocolError(ProtocolError):
    """Our own code tried to encode something invalid."""


class CoreError(NpgeventError):
    """A running core failed; the runner restarts it after the cooldown."""
