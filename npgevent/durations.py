"""Go ``time.Duration`` syntax: parse ``1h30m``/``100ms`` and print like Go.

NodePass reads durations with ``time.ParseDuration`` and prints them with
``Duration.String()`` (``0s``, ``1.5s``, ``1h0m0s``); the start-up line and the
master's ``config`` URL depend on that exact spelling.
"""

from __future__ import annotations

_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_UNIT_NAMES = ("ns", "us", "µs", "μs", "ms", "s", "m", "h")  # two-letter units first
MAX_TEXT = 64  # characters: longer than any duration anyone means, short enough to parse at once
MAX_NS = (1 << 63) - 1  # Go's time.Duration is an int64 of nanoseconds
_DIGITS = frozenset("0123456789")


def _digits(s: str, pos: int) -> int:
    """End of the run of ASCII digits starting at *pos*."""
    n = len(s)
    while pos < n and s[pos] in _DIGITS:
        pos += 1
    return pos


def parse_go_duration_ns(text: str) -> int:
    """Parse a Go duration string into integer nanoseconds, in one linear pass.

    Raises :class:`ValueError` with a short reason for anything Go would reject,
    for more than :data:`MAX_TEXT` characters and for more than Go's int64 range.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    if len(s) > MAX_TEXT:
        raise ValueError("too long (%d characters, at most %d)" % (len(s), MAX_TEXT))
    sign = 1
    if s[0] in "+-":
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError("missing number")
    pos = 0
    total = 0
    while pos < len(s):
        end = _digits(s, pos)
        whole = s[pos:end]
        frac = ""
        if end < len(s) and s[end] == ".":
            frac_end = _digits(s, end + 1)
            frac = s[end + 1 : frac_end]
            end = frac_end
        unit = next((u for u in _UNIT_NAMES if s.startswith(u, end)), None)
        if unit is None:
            raise ValueError("expected a number followed by ns, us, ms, s, m or h")
        if not whole and not frac:
            raise ValueError("missing number before unit %r" % unit)
        scale = _UNITS_NS[unit]
        value = int(whole or "0") * scale
        if frac:
            value += int(frac) * scale // (10 ** len(frac))
        total += value
        if total > MAX_NS:
            raise ValueError("out of range (at most 2562047h47m16.854775807s)")
        pos = end + len(unit)
    return sign * total


def parse_go_duration(text: str) -> float:
    """Parse a Go duration string into seconds (float)."""
    return parse_go_duration_ns(text) / 1e9


def _fmt_frac(v: int, prec: int) -> tuple[str, int]:
    # Go's fmtFrac: print v/10**prec with trailing zeros (and '.') removed.
    digits = []
    printed = False
    for _ in range(prec):
        d = v % 10
        printed = printed or d != 0
        if printed:
            digits.append(str(d))
        v //= 10
    frac = ("." + "".join(reversed(digits))) if printed else ""
    return frac, v


def format_go_duration_ns(ns: int) -> str:
    """Format nanoseconds exactly as Go's ``time.Duration.String()``."""
    if ns == 0:
        return "0s"
    neg = ns < 0
    u = -ns if neg else ns
    if u < 1_000_000_000:
        # sub-second: ns, µs or ms with a fraction
        if u < 1_000:
            out = "%dns" % u
        elif u < 1_000_000:
            frac, whole = _fmt_frac(u, 3)
            out = "%d%sµs" % (whole, frac)
        else:
            frac, whole = _fmt_frac(u, 6)
            out = "%d%sms" % (whole, frac)
    else:
        frac, secs = _fmt_frac(u, 9)
        out = "%d%ss" % (secs % 60, frac)
        mins = secs // 60
        if mins > 0:
            out = "%dm" % (mins % 60) + out
            hours = mins // 60
            if hours > 0:
                out = "%dh" % hours + out
    return ("-" + out) if neg else out


def format_go_duration(seconds: float) -> str:
    """Format seconds as Go would print the equivalent ``time.Duration``."""
    return format_go_duration_ns(round(seconds * 1e9))
