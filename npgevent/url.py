"""NodePass URL <-> :class:`TunnelSpec`.

``server://[key@]tunnel_host:port/target[,target...]?query``,
``client://...`` and ``master://host:port[/prefix]?query``, parsed the way Go's
``net/url`` and NodePass read them:

* the key is the user part; without one it is the lowercase hex FNV-1a-32 of the
  tunnel *port string* (both ends derive the same key from the same port);
* ``tunnel_host`` may be empty (all interfaces); IPv6 goes in brackets;
* targets are a comma-separated ``host:port`` list (spaces and empty items
  ignored), at least one;
* the loop guard rejects a target on the tunnel port when the target is loopback
  or the tunnel host is unspecified;
* a repeated query key keeps its first value, as Go's ``Values.Get`` does.

Parsing is pure: no sockets, no DNS (``localhost`` is the only name treated as
loopback by the loop guard).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import ConfigError
from .numbers import ascii_port

SCHEMES = ("server", "client", "master")


def fnv1a32_hex(data: str) -> str:
    """Lowercase hex of the 32-bit FNV-1a hash (NodePass's default tunnel key)."""
    h = 0x811C9DC5
    for byte in data.encode():
        h ^= byte
        h = (h * 0x01000193) & 0xFFFFFFFF
    return "%08x" % h


@dataclass(frozen=True, order=True)
class HostPort:
    """A ``host:port`` pair; *host* has no brackets and may be ``''``."""

    host: str
    port: int

    def __str__(self) -> str:
        host = self.host
        if ":" in host:
            host = "[%s]" % host
        return "%s:%d" % (host, self.port)

    @property
    def is_unspecified(self) -> bool:
        if self.host == "":
            return True
        try:
            return ipaddress.ip_address(self.host).is_unspecified
        except ValueError:
            return False

    @property
    def is_loopback(self) -> bool:
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
            return True
        except ValueError:
            return False


def parse_port(text: str, what: str) -> int:
    port = ascii_port(text)
    if port is None:
        raise ConfigError("invalid %s port %r: expected a number from 1 to 65535" % (what, text[:20]))
    return port


def parse_hostport(text: str, what: str, allow_empty_host: bool = False) -> HostPort:
    """Parse ``host:port`` / ``[v6]:port``; raise ConfigError naming *what*."""
    item = text.strip()
    if item.startswith("["):
        end = item.find("]")
        if end < 0 or not item[end + 1 :].startswith(":"):
            raise ConfigError("invalid %s %r: expected [IPv6]:port" % (what, text))
        host, port = item[1:end], item[end + 2 :]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ConfigError("invalid %s %r: %r is not an IPv6 address" % (what, text, host)) from None
    else:
        host, sep, port = item.rpartition(":")
        if not sep:
            raise ConfigError("invalid %s %r: expected host:port" % (what, text))
        if ":" in host:
            raise ConfigError("invalid %s %r: put an IPv6 address in brackets, [addr]:port"
                              % (what, text))
    if not host and not allow_empty_host:
        raise ConfigError("invalid %s %r: missing host" % (what, text))
    if host and not _valid_host(host):
        raise ConfigError("invalid %s %r: %r is not a valid host name or IP" % (what, text, host))
    return HostPort(host, parse_port(port, what))


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if len(host) > 253:
        return False
    labels = host.rstrip(".").split(".")
    return all(
        0 < len(lab) <= 63 and all(c.isalnum() or c in "-_" for c in lab) and lab[0] != "-"
        for lab in labels
    )


@dataclass(frozen=True)
class TunnelSpec:
    """A parsed NodePass URL (a value: it prints back to the canonical URL)."""

    scheme: str
    key: str
    key_given: bool
    tunnel: HostPort
    targets: tuple[HostPort, ...]
    query: tuple[tuple[str, str], ...] = ()
    prefix: str = ""
    raw: str = field(default="", compare=False)

    @property
    def query_map(self) -> Mapping[str, str]:
        return dict(self.query)

    @property
    def targets_str(self) -> str:
        return ",".join(str(t) for t in self.targets)

    def base_url(self) -> str:
        """``scheme://key@tunnel/targets`` as in NodePass's start-up line."""
        if self.scheme == "master":
            return "master://%s%s" % (self.tunnel, self.prefix)
        return "%s://%s@%s/%s" % (self.scheme, self.key, self.tunnel, self.targets_str)


def parse_url(raw: str) -> TunnelSpec:
    """Parse a NodePass URL; raise :class:`ConfigError` with a one-line reason."""
    text = raw.strip()
    scheme, sep, _rest = text.partition("://")
    if not sep:
        raise ConfigError("invalid URL %r: expected server://, client:// or master://" % raw)
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigError("invalid URL scheme %r in %r: expected server, client or master"
                          % (scheme, raw))
    try:
        parts = urlsplit(text)
        netloc = parts.netloc
    except ValueError as exc:
        raise ConfigError("invalid URL %r: %s" % (raw, exc)) from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ConfigError("invalid URL %r: control character in URL" % raw)

    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        userinfo, hostport = "", netloc
    key = unquote(userinfo.partition(":")[0]) if at else ""
    if not hostport:
        raise ConfigError("invalid URL %r: missing host:port" % raw)
    what = "master address" if scheme == "master" else "tunnel address"
    tunnel = parse_hostport(hostport, what, allow_empty_host=True)

    query: list[tuple[str, str]] = []
    seen: set[str] = set()
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False)
    except ValueError as exc:
        raise ConfigError("invalid URL query in %r: %s" % (raw, exc)) from None
    for k, v in pairs:
        if k not in seen:  # Go's Values.Get returns the first value
            seen.add(k)
            query.append((k, v))

    path = unquote(parts.path)
    if scheme == "master":
        prefix = path.rstrip("/")
        return TunnelSpec(scheme, "", False, tunnel, (), tuple(query), prefix or "/api", raw)

    targets = tuple(
        parse_hostport(item, "target address")
        for item in path.lstrip("/").split(",")
        if item.strip()
    )
    if not targets:
        raise ConfigError("invalid URL %r: missing target address (expected %s://%s/host:port)"
                          % (raw, scheme, hostport))
    for target in targets:
        if target.port == tunnel.port and (target.is_loopback or tunnel.is_unspecified):
            raise ConfigError("tunnel port %d conflicts with target address %s"
                              % (tunnel.port, target))
    if not key:
        key = fnv1a32_hex(str(tunnel.port))
    return TunnelSpec(scheme, key, bool(at and userinfo), tunnel, targets, tuple(query), "", raw)
