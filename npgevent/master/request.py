"""Requests and responses of the master API, decoded and encoded as Go's net/http and
encoding/json do: JSON bodies read with a size cap and a deadline, field names matched
case-insensitively, lone UTF-16 surrogates replaced by U+FFFD, bodies written Go-style."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

import gevent

from .records import go_json

STATUS = {200: "200 OK", 201: "201 Created", 204: "204 No Content", 400: "400 Bad Request",
          401: "401 Unauthorized", 403: "403 Forbidden", 404: "404 Not Found",
          405: "405 Method Not Allowed", 409: "409 Conflict"}
MAX_BODY = 1 << 20
MAX_URL_LEN = 8192  # bytes; Linux caps one process argument at 128 KiB


class Response:
    def __init__(self, status: int, body: bytes | Iterable[bytes] = b"", ctype: str = "application/json",
                 extra: list[tuple[str, str]] | None = None) -> None:
        self.status, self.body, self.ctype, self.extra = status, body, ctype, extra or []


def ok(obj: Any, status: int = 200) -> Response:
    return Response(status, go_json(obj))


def err(status: int, message: str) -> Response:
    return Response(status, go_json({"error": message}))


class BadBody(ValueError):
    pass


def jget(obj: dict[str, Any], name: str) -> Any:
    """A JSON field the way Go's decoder finds it: exact name first, then any case."""
    if name in obj:
        return obj[name]
    found = None
    for k, v in obj.items():
        if k.lower() == name:
            found = v  # the last duplicate wins, as in Go
    return found


def jhas(obj: dict[str, Any], name: str) -> bool:
    return any(k.lower() == name for k in obj)


class Request:
    def __init__(self, environ: dict[str, Any], rid: str, body_timeout: float = 30.0) -> None:
        self.environ = environ
        self.body_timeout = body_timeout
        self.method = environ["REQUEST_METHOD"]
        self.rid = rid
        self.query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", ""),
                                                     keep_blank_values=True).items()}
        self._body: bytes | None = None

    @property
    def body(self) -> bytes:
        if self._body is None:
            stream = self.environ["wsgi.input"]
            try:
                length = int(self.environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
            try:  # a body trickled, cut mid-chunk or malformed is a bad body, not a server error
                with gevent.Timeout(self.body_timeout, BadBody("body not received in time")):
                    self._body = stream.read(min(length, MAX_BODY)) if length else stream.read(MAX_BODY)
            except (OSError, ValueError) as exc:
                raise BadBody("body unreadable: %s" % exc) from None
        return self._body

    def json_object(self) -> dict[str, Any]:
        """The body as a JSON object, decoded as Go's decoder would: a lone UTF-16 surrogate
        (``"\\ud800"``) becomes U+FFFD instead of a string no file or log can hold."""
        try:
            data = json.loads(self.body.decode("utf-8") or "null")
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nesting too deep
            raise BadBody("not JSON") from None
        if not isinstance(data, dict):
            raise BadBody("not an object")
        try:
            return dict(go_strings(data))
        except RecursionError:
            raise BadBody("nested too deep") from None


_SURROGATE = re.compile("[\ud800-\udfff]")


def go_strings(value: Any) -> Any:
    """*value* with every lone surrogate in its strings (keys too) replaced by U+FFFD, one for
    one, as Go's decoder does (a valid pair was already joined by the JSON decoder)."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {go_strings(k): go_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [go_strings(v) for v in value]
    return value
