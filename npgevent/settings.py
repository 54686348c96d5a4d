"""The settings table: every option of npgevent, declared once.

Each field of :class:`Options` carries a :class:`Setting` in its metadata: the
URL query key (if the option can be set per instance in the NodePass URL), the
``NP_*`` environment variable, the CLI flag, the config-file key, the default,
the parser/validator and a one-line help.  The configargparse parser
(:mod:`npgevent.cli`), the URL option resolution, ``--help`` and the reference
table in ``docs/settings.md`` are all generated from it.

Validation follows one rule (see the developers' guide):

* a value that cannot be parsed, or is not one of the allowed choices, is a
  :class:`~npgevent.errors.ConfigError` (the CLI exits with status 2);
* a value that parses but is out of range, where Go NodePass silently keeps its
  default (``min=0``, ``rate=-1``), keeps Go's default and produces a warning
  that the caller logs at WARN.

Precedence, lowest to highest: default < config file < environment < CLI flag
< URL query parameter (the last only for options that have a query key).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any

from .durations import format_go_duration, parse_go_duration
from .errors import ConfigError
from .numbers import ascii_int, ascii_port
from .url import HostPort, parse_hostport

LOG_LEVELS = ("none", "debug", "info", "warn", "error", "event")
DEFAULT_DNS = "1.1.1.1,8.8.8.8"


@dataclass(frozen=True)
class Setting:
    """One row of the settings table (stored in a dataclass field's metadata)."""

    name: str
    env: str
    help: str
    parse: Callable[[str], Any]
    fmt: Callable[[Any], str]
    in_range: Callable[[Any], bool] = lambda _v: True
    range_help: str = ""
    query: str | None = None
    roles: tuple[str, ...] = ("server", "client", "master")
    default: Any = None
    go: bool = True  # False: npgevent's own option, no Go NodePass equivalent

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def config_key(self) -> str:
        return self.name.replace("_", "-")


# -- parsers: raise ValueError("expected ...") ---------------------------------


def _int(text: str) -> int:
    return ascii_int(text.strip())


def _duration(text: str) -> float:
    try:
        return parse_go_duration(text)
    except ValueError as exc:
        raise ValueError("expected a Go duration such as 500ms, 30s or 1h30m (%s)" % exc) from None


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return value

    return parse


def _flag01(text: str) -> bool:
    value = text.strip()
    if value not in ("0", "1"):
        raise ValueError("expected 0 or 1")
    return value == "1"


def parse_dns_servers(text: str) -> tuple[str, ...]:
    """``1.1.1.1,[2606:4700::1111]:53,9.9.9.9:5353`` -> canonical ``ip`` / ``ip:port`` items."""
    out: list[str] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        host, port = item, ""
        if item.startswith("["):
            end = item.find("]")
            if end < 0:
                raise ValueError("%r is not an IP address (missing ']')" % item)
            host, rest = item[1:end], item[end + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError("%r is not an IP address" % item)
                port = rest[1:]
        elif item.count(":") == 1:
            host, port = item.split(":")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("%r is not an IP address" % item) from None
        if port and ascii_port(port) is None:
            raise ValueError("%r has a bad port" % item)
        text_ip = "[%s]" % ip if (ip.version == 6 and port) else str(ip)
        out.append(text_ip + (":" + port if port else ""))
    if not out:
        raise ValueError("expected a comma-separated list of IP addresses")
    return tuple(out)


def _dial(text: str) -> str:
    value = text.strip()
    if value.lower() == "auto" or value == "":
        return "auto"
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        raise ValueError("expected 'auto' or a local IP address") from None


def _workers(text: str) -> int:
    value = text.strip().lower()
    if value == "auto":
        from .cpus import usable_cpus

        return usable_cpus()
    try:
        return ascii_int(value)
    except ValueError:
        raise ValueError("expected a number of processes or 'auto' (one per CPU)") from None


def _metrics_address(text: str) -> HostPort | None:
    value = text.strip()
    if value == "":
        return None
    try:
        if value.endswith(":0"):  # an ephemeral port, logged at start (the master's children)
            hp = parse_hostport(value[:-2] + ":1", "metrics address", allow_empty_host=True)
            return HostPort(hp.host, 0)
        return parse_hostport(value, "metrics address", allow_empty_host=True)
    except ConfigError as exc:
        raise ValueError("expected host:port to serve /metrics on (%s)" % exc) from None


def _str(text: str) -> str:
    return text


def _positive(v: Any) -> bool:
    return bool(v > 0)


def _not_negative(v: Any) -> bool:
    return bool(v >= 0)


def _fmt_bool(v: Any) -> str:
    return "1" if v else "0"


def opt(
    name: str,
    default: Any,
    parse: Callable[[str], Any],
    help: str,
    *,
    env: str | None = None,
    query: bool = False,
    fmt: Callable[[Any], str] = str,
    in_range: Callable[[Any], bool] = lambda _v: True,
    range_help: str = "",
    roles: tuple[str, ...] = ("server", "client", "master"),
    go: bool = True,
) -> Any:
    """Declare one option: returns a dataclass field carrying its :class:`Setting`."""
    setting = Setting(
        name=name,
        env=env or "NP_" + name.upper(),
        help=help,
        parse=parse,
        fmt=fmt,
        in_range=in_range,
        range_help=range_help,
        query=name if query else None,
        roles=roles,
        default=default,
        go=go,
    )
    return field(default=default, metadata={"setting": setting})


_SRV = ("server",)
_CLI = ("client",)
_TUN = ("server", "client")
_ALL = ("server", "client", "master")
_SRV_MASTER = ("server", "master")


@dataclass(frozen=True)
class Options:
    """Every effective option of one instance (typed; durations in seconds)."""

    # -- NodePass URL query parameters (protocol.md section 1) ---------------
    log: str = opt("log", "info", _choice(*LOG_LEVELS), "minimum log level shown", query=True, roles=_ALL)
    log_format: str = opt("log_format", "text", _choice("text", "json"),
                          "log line format: text (NodePass's, which panels parse) or json (one object "
                          "per line, for a log collector)", roles=_ALL, go=False)
    tls: str = opt("tls", "0", _choice("0", "1", "2"),
                   "TLS code: 0 plain, 1 self-signed in-memory cert, 2 crt/key files",
                   query=True, roles=_SRV_MASTER)
    crt: str = opt("crt", "", _str, "PEM certificate file for tls=2", query=True, roles=_SRV_MASTER)
    key: str = opt("key", "", _str, "PEM private key file for tls=2", query=True, roles=_SRV_MASTER)
    dns: tuple[str, ...] = opt("dns", parse_dns_servers(DEFAULT_DNS), parse_dns_servers,
                               "DNS servers (comma-separated IPs) used to resolve names",
                               query=True, fmt=",".join, roles=_TUN)
    min: int = opt("min", 64, _int, "minimum pool capacity (client)", query=True,
                   in_range=_positive, range_help="must be > 0", roles=_CLI)
    max: int = opt("max", 1024, _int, "maximum pool capacity (server; sent to the client)",
                   query=True, in_range=_positive, range_help="must be > 0", roles=_SRV)
    mode: str = opt("mode", "0", _choice("0", "1", "2"),
                    "server: 0 auto, 1 reverse, 2 forward; client: 0 auto, 1 single-end, 2 dual-end",
                    query=True, roles=_TUN)
    quic: bool = opt("quic", False, _flag01, "1 = QUIC data pool instead of TCP (server)",
                     query=True, fmt=_fmt_bool, roles=_SRV_MASTER)
    dial: str = opt("dial", "auto", _dial, "source IP for outbound dials to targets, or auto",
                    query=True, roles=_TUN)
    read: float = opt("read", 0.0, _duration,
                      "idle timeout: a session idle this long in both directions is closed (0 = none)",
                      query=True, fmt=format_go_duration, in_range=_not_negative,
                      range_help="must be >= 0", roles=_TUN)
    rate: int = opt("rate", 0, _int, "bandwidth limit in Mbit/s shared by the instance (0 = none)",
                    query=True, in_range=_not_negative, range_help="must be >= 0", roles=_TUN)
    slot: int = opt("slot", 65536, _int, "maximum concurrent TCP+UDP sessions", query=True,
                    in_range=_positive, range_help="must be > 0", roles=_TUN)
    proxy: bool = opt("proxy", False, _flag01, "1 = send a PROXY protocol v1 line to the target",
                      query=True, fmt=_fmt_bool, roles=_TUN)
    notcp: bool = opt("notcp", False, _flag01, "1 = disable TCP", query=True, fmt=_fmt_bool, roles=_TUN)
    noudp: bool = opt("noudp", False, _flag01, "1 = disable UDP", query=True, fmt=_fmt_bool, roles=_TUN)
    auth: str = opt("auth", "1", _choice("0", "1", "2"),
                    "tunnel authentication: 0 Go NodePass's handshake only; 1 npgevent peers prove the "
                    "key (Go peers still accepted, with a warning); 2 strict: only peers that prove "
                    "the key (docs/security.md)", query=True, roles=_ALL, go=False)
    metrics: HostPort | None = opt("metrics", None, _metrics_address,  # noqa: RUF009 (frozen)
                                   "host:port serving Prometheus /metrics (off when empty; a "
                                   "master also serves /metrics behind its API key)", query=True,
                                   fmt=lambda v: "" if v is None else str(v), roles=_ALL, go=False)
    workers: int = opt("workers", 1, _workers,
                       "single-end forwarding: processes sharing the listeners (SO_REUSEPORT), or "
                       "auto = one per CPU the process may use: affinity and cgroup quota "
                       "(docs/scaling.md)", query=True,
                       in_range=lambda v: 1 <= v <= 256, range_help="must be 1..256",
                       roles=_TUN, go=False)  # a server is refused with a clear error, not a WARN

    # -- NP_* tunables (environment in Go; here also CLI and config file) ----
    semaphore_limit: int = opt("semaphore_limit", 65536, _int, "signal queue length",
                               in_range=_positive, range_help="must be > 0")
    tcp_data_buf_size: int = opt("tcp_data_buf_size", 16384, _int, "TCP relay buffer size (bytes)",
                                 in_range=_positive, range_help="must be > 0")
    udp_data_buf_size: int = opt("udp_data_buf_size", 16384, _int,
                                 "UDP buffer size (bytes) when talking to a Go peer",
                                 in_range=_positive, range_help="must be > 0")
    dns_caching_ttl: float = opt("dns_caching_ttl", 300.0, _duration, "DNS cache lifetime",
                                 fmt=format_go_duration, in_range=_positive, range_help="must be > 0")
    handshake_timeout: float = opt("handshake_timeout", 5.0, _duration, "control handshake timeout",
                                   fmt=format_go_duration, in_range=_positive, range_help="must be > 0")
    tcp_dial_timeout: float = opt("tcp_dial_timeout", 5.0, _duration, "TCP connect timeout",
                                  fmt=format_go_duration, in_range=_positive, range_help="must be > 0")
    udp_dial_timeout: float = opt("udp_dial_timeout", 5.0, _duration, "UDP dial timeout",
                                  fmt=format_go_duration, in_range=_positive, range_help="must be > 0")
    udp_read_timeout: float = opt("udp_read_timeout", 30.0, _duration, "UDP session idle expiry",
                                  fmt=format_go_duration, in_range=_positive, range_help="must be > 0")
    pool_get_timeout: float = opt("pool_get_timeout", 5.0, _duration, "wait for a pool connection",
                                  fmt=format_go_duration, in_range=_positive, range_help="must be > 0")
    min_pool_interval: float = opt("min_pool_interval", 0.1, _duration, "fastest pool refill interval",
                                   fmt=format_go_duration, in_range=_positive, range_help="must be > 0")
    max_pool_interval: float = opt("max_pool_interval", 1.0, _duration, "slowest pool refill interval",
                                   fmt=format_go_duration, in_range=_positive, range_help="must be > 0")
    report_interval: float = opt("report_interval", 5.0, _duration,
                                 "ping / CHECK_POINT period; control silence limit is 3x this",
                                 fmt=format_go_duration, in_range=_positive, range_help="must be > 0")
    service_cooldown: float = opt("service_cooldown", 3.0, _duration, "pause before a restart",
                                  fmt=format_go_duration, in_range=_positive, range_help="must be > 0")
    shutdown_timeout: float = opt("shutdown_timeout", 5.0, _duration, "graceful stop limit",
                                  fmt=format_go_duration, in_range=_positive, range_help="must be > 0")
    reload_interval: float = opt("reload_interval", 3600.0, _duration, "tls=2 certificate reload period",
                                 fmt=format_go_duration, in_range=_positive, range_help="must be > 0")

    # -- npgevent's own tunables (no Go equivalent) ---------------------------
    quic_datagram_size: int = opt("quic_datagram_size", 1452, _int,
                                  "QUIC datagram size between npgevent peers (Go peers always get 1452; "
                                  "larger only pays on loopback or jumbo-frame links; aioquic carries "
                                  "packets up to 16384 bytes)",
                                  in_range=lambda v: 1200 <= v <= 16384,
                                  range_help="must be 1200..16384", go=False)
    quic_offload: bool = opt("quic_offload", True, _flag01,
                             "1 = QUIC sends and receives runs of datagrams in one system call (UDP "
                             "GSO and GRO) where the kernel allows it, else one at a time; 0 = always "
                             "one at a time", fmt=_fmt_bool, roles=_TUN, go=False)
    state_dir: str = opt("state_dir", "", _str,
                         "master: directory of the state file (default $XDG_STATE_HOME/npgevent, "
                         "i.e. ~/.local/state/npgevent)", roles=("master",), go=False)
    http_header_timeout: float = opt("http_header_timeout", 10.0, _duration,
                                     "master API and metrics=: time to send a request line and its headers",
                                     fmt=format_go_duration, in_range=_positive, range_help="must be > 0",
                                     roles=_ALL, go=False)
    http_body_timeout: float = opt("http_body_timeout", 30.0, _duration,
                                   "master API and metrics=: time to send a request body",
                                   fmt=format_go_duration, in_range=_positive, range_help="must be > 0",
                                   roles=_ALL, go=False)
    http_idle_timeout: float = opt("http_idle_timeout", 60.0, _duration,
                                   "master API and metrics=: idle keep-alive connection lifetime "
                                   "(SSE streams exempt)",
                                   fmt=format_go_duration, in_range=_positive, range_help="must be > 0",
                                   roles=_ALL, go=False)
    http_max_conns_per_ip: int = opt("http_max_conns_per_ip", 64, _int,
                                     "master API and metrics=: concurrent connections from one source "
                                     "address",
                                     in_range=_positive, range_help="must be > 0", roles=_ALL,
                                     go=False)

    def with_(self, **changes: Any) -> Options:
        return replace(self, **changes)


def _setting_of(f: Field[Any]) -> Setting:
    return f.metadata["setting"]


SETTINGS: tuple[Setting, ...] = tuple(_setting_of(f) for f in fields(Options))
BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}
BY_QUERY: Mapping[str, Setting] = {s.query: s for s in SETTINGS if s.query}
TUNABLES: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.query is None)

assert all(f.default is not MISSING for f in fields(Options))


def _parse_value(setting: Setting, raw: str, origin: str) -> tuple[Any, str | None]:
    """Parse *raw*; return (value, warning-or-None). Raise ConfigError if unparseable."""
    try:
        value = setting.parse(raw)
    except ValueError as exc:
        raise ConfigError("invalid %s %r: %s" % (origin, raw, exc)) from None
    if not setting.in_range(value):
        warning = "%s %r is out of range (%s): using default %s" % (
            origin, raw, setting.range_help, setting.fmt(setting.default))
        return setting.default, warning
    return value, None


def resolve(
    role: str,
    query: Mapping[str, str],
    base: Mapping[str, str | None] | None = None,
) -> tuple[Options, list[str]]:
    """Build the effective :class:`Options` of one instance.

    *query* holds the URL's query parameters (raw strings, last value wins);
    *base* the raw values from CLI/env/config file already merged by
    configargparse (``None`` = not given).  Returns the options and the list of
    warnings to log once logging is configured.
    """
    warnings: list[str] = []
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = (base or {}).get(setting.name)
        if raw is not None:
            value, warning = _parse_value(setting, raw, "%s/%s" % (setting.flag, setting.env))
            values[setting.name] = value
            if warning:
                warnings.append(warning)
    for key, raw in query.items():
        qs = BY_QUERY.get(key)
        if qs is None:
            warnings.append("unknown URL parameter %r ignored" % key)
            continue
        if raw == "" and key not in ("crt", "key"):
            continue  # Go: an empty value keeps the default
        value, warning = _parse_value(qs, raw, "URL parameter %s=" % key)
        if warning:
            warnings.append(warning)
        if role not in qs.roles:
            warnings.append("URL parameter %s= has no effect on a %s" % (key, role))
        values[qs.name] = value
    return Options(**values), warnings


def tunable_summary(options: Options) -> str:
    """``NP_X=v NP_Y=w`` for the debug start-up line."""
    return " ".join(
        "%s=%s" % (s.env, s.fmt(getattr(options, s.name))) for s in TUNABLES
    )


def reference_rows(settings: Iterable[Setting] = SETTINGS) -> list[tuple[str, str, str, str, str]]:
    """(query key, env, flag, default, help) rows for the generated docs table."""
    rows = []
    for s in settings:
        rows.append((s.query or "", s.env, s.flag, s.fmt(s.default), s.help))
    return rows
