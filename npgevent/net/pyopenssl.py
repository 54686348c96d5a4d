"""pyOpenSSL, imported without asyncio.

On Python < 3.13 pyOpenSSL takes its ``@deprecated`` decorator from ``typing_extensions``,
whose decorator imports ``asyncio.coroutines`` the first time it wraps a function, to ask
whether that function is a coroutine function.  Importing ``asyncio.coroutines`` imports the
whole ``asyncio`` package, and with it the standard ``ssl`` module and the system's libssl:
2.6 MB of RSS in every idle ``tls=1``/``tls=2`` tunnel end (bench/README.md, twenty-first
pass), none of which it uses (its TLS is pyOpenSSL's; only the QUIC thread runs an asyncio
loop).

:func:`load` imports pyOpenSSL with ``typing_extensions.deprecated`` replaced, for the
length of that import, by a subclass that wraps plain functions the same way (a warning of
the same message, category and stack level on every call, ``__deprecated__`` set) but asks
:func:`inspect.iscoroutinefunction` instead (asyncio's own check adds only its legacy
``@coroutine`` marker, which no pyOpenSSL function carries).  Classes and everything else
go to the original decorator.  Where asyncio is loaded already, or ``typing_extensions``
is not what pyOpenSSL uses (Python 3.13+ has ``warnings.deprecated``), it is a plain import.
Every module of npgevent that uses pyOpenSSL imports it from here.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from typing import Any


def _lean(original: type) -> type:
    class Deprecated(original):
        def __call__(self, arg: Any, /) -> Any:
            if self.category is None or isinstance(arg, type) or not callable(arg):
                return super().__call__(arg)
            if inspect.iscoroutinefunction(arg):  # never, in pyOpenSSL: the original's way
                return super().__call__(arg)
            msg, category, stacklevel = self.message, self.category, self.stacklevel

            @functools.wraps(arg)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                warnings.warn(msg, category=category, stacklevel=stacklevel + 1)
                return arg(*args, **kwargs)

            arg.__deprecated__ = wrapper.__deprecated__ = msg  # type: ignore[attr-defined]
            return wrapper

    return Deprecated


def load() -> None:
    """Import pyOpenSSL (``OpenSSL``, ``OpenSSL.SSL``, ``OpenSSL.crypto``), lean if it can."""
    if "OpenSSL.SSL" in sys.modules or "asyncio" in sys.modules or sys.version_info >= (3, 13):
        import OpenSSL.SSL
        return
    try:
        import typing_extensions
    except ImportError:  # pyOpenSSL would not import either; let it say so
        import OpenSSL.SSL
        return
    original = typing_extensions.deprecated
    typing_extensions.deprecated = _lean(original)  # type: ignore[assignment,misc]
    try:
        import OpenSSL.SSL  # noqa: F401
    finally:
        typing_extensions.deprecated = original  # type: ignore[misc]


load()

from OpenSSL import SSL, crypto  # noqa: E402

__all__ = ["SSL", "crypto", "load"]
