"""Numbers as Go's ``strconv.Atoi`` reads them: ASCII digits only, bounded length.

Python's ``int()`` also takes ``1_0``, Arabic-Indic digits (U+0660-U+0669) and ``²``
(where ``str.isdigit`` is true but ``int`` fails); Go rejects all of them, and so
does npgevent.  A length cap keeps parsing constant-time whatever is sent.
"""

from __future__ import annotations

import re

_INT = re.compile(r"[+-]?[0-9]{1,19}")  # fullmatch; 19 digits: Go's int64
_PORT = re.compile(r"[0-9]{1,5}")


def ascii_int(text: str) -> int:
    """An optional sign and 1-19 ASCII digits within int64; ValueError otherwise."""
    if len(text) > 20 or not _INT.fullmatch(text):
        raise ValueError("expected an integer (ASCII digits)")
    value = int(text, 10)
    if not -(1 << 63) <= value < (1 << 63):
        raise ValueError("expected an integer within the 64-bit range")
    return value


def ascii_port(text: str) -> int | None:
    """A port from 1 to 65535 written in ASCII digits, or None."""
    if len(text) > 5 or not _PORT.fullmatch(text):
        return None
    value = int(text, 10)
    return value if 0 < value < 65536 else None
