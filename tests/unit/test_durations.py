"""Go duration syntax, both ways."""

import pytest

from npgevent.durations import (
    format_go_duration,
    format_go_duration_ns,
    parse_go_duration,
    parse_go_duration_ns,
)


@pytest.mark.parametrize(("text", "ns"), [
    ("0", 0), ("0s", 0), ("100ms", 100_000_000), ("1.5s", 1_500_000_000), ("1h30m", 5_400_000_000_000),
    ("2h45m30.5s", 9_930_500_000_000), ("300us", 300_000), ("300µs", 300_000), ("7ns", 7), ("-2s", -2_000_000_000),
    ("+1m", 60_000_000_000), (".5s", 500_000_000),
])
def test_parse(text, ns):
    assert parse_go_duration_ns(text) == ns


@pytest.mark.parametrize("bad", ["", "5x", "abc", "10", "s", "1.2.3s", "5 s", "-", "1d"])
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        parse_go_duration_ns(bad)


@pytest.mark.parametrize(("ns", "text"), [
    (0, "0s"), (1, "1ns"), (1_500, "1.5µs"), (100_000_000, "100ms"), (1_000_000_000, "1s"),
    (30_000_000_000, "30s"), (300_000_000_000, "5m0s"), (3_600_000_000_000, "1h0m0s"),
    (5_400_000_000_000, "1h30m0s"), (1_500_000_000, "1.5s"), (-2_000_000_000, "-2s"), (60_500_000_000, "1m0.5s"),
])
def test_format_like_go(ns, text):
    assert format_go_duration_ns(ns) == text


def test_seconds_helpers_round_trip():
    for text in ("250ms", "5s", "1h0m0s", "3m20s"):
        assert format_go_duration(parse_go_duration(text)) == text
