"""Instance records of the master, and the pure rules around them (no I/O).

* :class:`Record` holds one instance with the JSON keys in NodePass's order
  (``id, alias, type, status, url, config, restart, meta, mode, ping, pool,
  tcps, udps, tcprx, tcptx, udprx, udptx``) plus the hidden counter state.
* :func:`enhance_url` / :func:`config_url` apply master-api.md section 11: the
  query is rewritten sorted and form-encoded as Go's ``url.Values.Encode``
  does; the master's ``log`` (and for servers its TLS settings) fill gaps;
  ``config`` adds every default.
* Byte counters (section 10): ``C = base + v - reset`` with ``base`` carried
  over child restarts and ``reset`` the child's own value when the counter was
  reset.  Unlike Go (which computes ``reset = C - base`` and so over-counts after
  a second reset without a restart), a reset always makes the counter read 0
  and grow by the child's increments from there.
* :func:`go_json` encodes like Go's ``json.Encoder``: compact, UTF-8, HTML
  characters escaped, trailing newline.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlsplit

KEY_ID = "********"
MAX_VALUE_LEN = 256
COUNTERS = ("tcprx", "tcptx", "udprx", "udptx")

DEFAULTS = (("dns", "1.1.1.1,8.8.8.8"), ("mode", "0"), ("quic", "0"), ("dial", "auto"), ("read", "0s"),
            ("rate", "0"), ("slot", "65536"), ("proxy", "0"), ("notcp", "0"), ("noudp", "0"))


class URLFormatError(ValueError):
    """The URL does not parse (Go's ``url.Parse`` would fail)."""


@dataclass
class Counter:
    value: int = 0
    base: int = 0
    reset: int = 0
    last: int = 0  # the child's last reported value


@dataclass
class Record:
    id: str
    type: str = ""
    status: str = ""
    url: str = ""
    config: str = ""
    alias: str = ""
    restart: bool = False
    peer: dict[str, str] = field(default_factory=lambda: {"sid": "", "type": "", "alias": ""})
    tags: dict[str, str] = field(default_factory=dict)
    mode: int = 0
    ping: int = 0
    pool: int = 0
    tcps: int = 0
    udps: int = 0
    counters: dict[str, Counter] = field(default_factory=lambda: {k: Counter() for k in COUNTERS})

    def to_api(self) -> dict[str, Any]:
        """The instance object, keys in NodePass's order."""
        c = self.counters
        return {
            "id": self.id, "alias": self.alias, "type": self.type, "status": self.status,
            "url": self.url, "config": self.config, "restart": self.restart,
            "meta": {"peer": {"sid": self.peer.get("sid", ""), "type": self.peer.get("type", ""),
                              "alias": self.peer.get("alias", "")},
                     "tags": dict(self.tags)},
            "mode": self.mode, "ping": self.ping, "pool": self.pool, "tcps": self.tcps, "udps": self.udps,
            "tcprx": c["tcprx"].value, "tcptx": c["tcptx"].value,
            "udprx": c["udprx"].value, "udptx": c["udptx"].value,
        }

    def to_state(self) -> dict[str, Any]:
        """Everything, hidden counter state included (for the state file)."""
        out = self.to_api()
        out["counters"] = {k: [v.value, v.base, v.reset, v.last] for k, v in self.counters.items()}
        return out

    @classmethod
    def from_state(cls, data: Any) -> Record:
        """A record from the state file, every field checked: ValueError names the first that
        is missing or of the wrong type (the caller skips the record and says so)."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        rid = _text(data, "id")
        if not rid:
            raise ValueError("empty id")
        meta = _obj(data, "meta")
        peer = _obj(meta, "peer")
        tags = _obj(meta, "tags")
        rec = cls(
            id=rid, type=_text(data, "type"), status=_text(data, "status"), url=_text(data, "url"),
            config=_text(data, "config"), alias=_text(data, "alias"),
            restart=_flag(data, "restart"),
            peer={k: _text(peer, k) for k in ("sid", "type", "alias")},
            tags={str(k): _text(tags, k) for k in tags},
            mode=_count(data, "mode"), ping=_count(data, "ping"), pool=_count(data, "pool"),
            tcps=_count(data, "tcps"), udps=_count(data, "udps"),
        )
        if rid != KEY_ID:
            split_url(rec.url)  # URLFormatError (a ValueError) if it no longer parses
        saved = _obj(data, "counters")
        for k in COUNTERS:
            raw = saved.get(k)
            if isinstance(raw, list) and len(raw) == 4:
                rec.counters[k] = Counter(*(_as_count(x, "counters." + k) for x in raw))
            else:
                rec.counters[k] = Counter(value=_count(data, k))
        return rec

    # -- statistics -----------------------------------------------------------------------
    def zero_live(self) -> None:
        self.ping = self.pool = self.tcps = self.udps = 0

    def on_start(self) -> None:
        for c in self.counters.values():
            c.base = c.value  # carry the total over the child restart
            c.reset = 0
            c.last = 0

    def apply_checkpoint(self, m: re.Match[str]) -> None:
        mode, ping, pool, tcps, udps, *raw = (int(x) for x in m.groups())
        self.mode, self.ping, self.pool, self.tcps, self.udps = mode, ping, pool, tcps, udps
        for name, v in zip(COUNTERS, raw, strict=True):
            c = self.counters[name]
            if v >= c.reset:
                c.value = c.base + v - c.reset
            else:  # the child started over under us
                c.value = c.base + v
                c.reset = 0
            c.last = v

    def reset_counters(self) -> None:
        for c in self.counters.values():
            c.reset = c.last
            c.value = 0
            c.base = 0


# -- URLs (section 11) -----------------------------------------------------------------------


def _text(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise ValueError("%s is not a string" % key)
    return value


def _obj(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("%s is not an object" % key)
    return value


def _flag(obj: dict[str, Any], key: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise ValueError("%s is not true or false" % key)
    return value


def _count(obj: dict[str, Any], key: str) -> int:
    return _as_count(obj.get(key, 0), key)


def _as_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << 64):
        raise ValueError("%s is not a count" % what)
    return value


def split_url(url: str) -> tuple[str, str, str, list[tuple[str, str]], str]:
    """(scheme, netloc, path, query pairs, fragment); raise URLFormatError like Go's url.Parse."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise URLFormatError("invalid control character in URL")
    if re.search(r"%(?![0-9A-Fa-f]{2})", url):
        raise URLFormatError("invalid URL escape")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise URLFormatError(str(exc)) from None
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    return parts.scheme, parts.netloc, parts.path, pairs, parts.fragment


def join_url(scheme: str, netloc: str, path: str, pairs: list[tuple[str, str]], fragment: str) -> str:
    """Re-serialise as Go's URL.String() with Values.Encode(): keys sorted, values form-encoded."""
    ordered = sorted(pairs, key=lambda kv: kv[0])  # stable: repeated keys keep their order
    query = "&".join("%s=%s" % (quote_plus(k), quote_plus(v)) for k, v in ordered)
    out = "%s://%s%s" % (scheme, netloc, path) if netloc or scheme else path
    if query:
        out += "?" + query
    if fragment:
        out += "#" + fragment
    return out


@dataclass(frozen=True)
class MasterTLS:
    log: str = ""  # the raw log value of the master URL
    tls: str = "0"  # effective API TLS code
    crt: str = ""
    key: str = ""


def _first(pairs: list[tuple[str, str]], key: str) -> str | None:
    for k, v in pairs:
        if k == key:
            return v
    return None


def _set(pairs: list[tuple[str, str]], key: str, value: str) -> None:
    for i, (k, _v) in enumerate(pairs):
        if k == key:
            pairs[i] = (k, value)
            return
    pairs.append((key, value))


def _fill(scheme: str, pairs: list[tuple[str, str]], m: MasterTLS) -> None:
    if m.log and not _first(pairs, "log"):
        _set(pairs, "log", m.log)
    if scheme == "server" and m.tls != "0":
        if _first(pairs, "tls") is None:
            pairs.append(("tls", m.tls))
        if m.tls == "2":
            for k, v in (("crt", m.crt), ("key", m.key)):
                if v and _first(pairs, k) is None:
                    pairs.append((k, v))


def enhance_url(url: str, m: MasterTLS) -> str:
    scheme, netloc, path, pairs, frag = split_url(url)
    _fill(scheme, pairs, m)
    return join_url(scheme, netloc, path, pairs, frag)


def config_url(url: str, m: MasterTLS) -> str:
    scheme, netloc, path, pairs, frag = split_url(url)
    defaults = [*DEFAULTS, ("min", "64") if scheme == "client" else ("max", "1024")]
    for k, v in defaults:
        if not _first(pairs, k):
            _set(pairs, k, v)
    _fill(scheme, pairs, m)
    return join_url(scheme, netloc, path, pairs, frag)


# -- JSON as Go writes it ---------------------------------------------------------------------

_GO_ESCAPES = (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"),
               ("\u2029", "\\u2029"))


def go_json(obj: Any) -> bytes:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in _GO_ESCAPES:  # str.replace runs in C: far faster than a regex callback
        if char in text:
            text = text.replace(char, escaped)
    return (text + "\n").encode("utf-8")


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))
