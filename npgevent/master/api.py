"""The master's HTTP API as a WSGI application (served by gevent's pywsgi).

Dispatch follows :data:`~npgevent.master.openapi.ROUTES` and NodePass's order of
checks: CORS headers on every handled response; ``OPTIONS`` answers 200 before
authentication; then the API key (``X-API-Key``, compared in constant time;
also ``?key=`` on ``/events`` only, since a browser ``EventSource`` cannot send
headers); then the method (405).  Unknown paths get Go's plain ``404 page not
found``.  Bodies are JSON written as Go writes them; request field names match
case-insensitively and unknown fields are ignored, as Go's decoder does.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import gevent
from gevent import socket
from gevent.lock import BoundedSemaphore

from .. import NODEPASS_VERSION
from ..numbers import ascii_port
from . import openapi as oa
from .records import KEY_ID, MAX_VALUE_LEN, URLFormatError, go_json, split_url, utf8_len
from .request import MAX_URL_LEN, STATUS, BadBody, Request, Response, err, jget, ok
from .sysinfo import goarch, goos, host_metrics

if TYPE_CHECKING:
    from .core import Master

StartResponse = Callable[..., Any]
CORS = [
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, PATCH, POST, PUT, DELETE, OPTIONS"),
    ("Access-Control-Allow-Headers", "Content-Type, Authorization, X-API-Key, Cache-Control"),
]
class Api:
    """Routes and handlers; *master* provides the instances, the event hub and the key."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self.base = master.prefix + "/v1"
        self.tcping_slots = BoundedSemaphore(10)

    # -- WSGI entry -----------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            resp = self.dispatch(environ)
        except Exception:  # a bug must not kill the connection silently
            self.master.log.error("API error on %s %s", environ.get("REQUEST_METHOD"),
                                  environ.get("PATH_INFO"), exc_info=True)
            resp = err(500, "Internal server error")
        if resp is None:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                             ("X-Content-Type-Options", "nosniff")])
            return [b"404 page not found\n"]
        headers = list(CORS)
        if resp.status != 204:
            headers.append(("Content-Type", resp.ctype))
        headers += resp.extra
        start_response(STATUS.get(resp.status, "%d Error" % resp.status), headers)
        if isinstance(resp.body, bytes):
            return [resp.body] if resp.status != 204 else []
        return resp.body

    def match(self, path: str) -> tuple[oa.Route | None, str]:
        if not path.startswith(self.base + "/"):
            return None, ""
        rel = path[len(self.base):]
        for route in oa.ROUTES:
            if route.subtree:
                stem = route.path.rsplit("/", 1)[0] + "/"
                if rel.startswith(stem):
                    return route, rel[len(stem):]
            elif rel == route.path:
                return route, ""
        if rel == "/metrics":  # npgevent's own path, behind the key; not in NodePass's OpenAPI
            return oa.Route("/metrics", ops=(oa.Op("GET", "get_metrics", ""),)), ""
        if rel.startswith("/docs/assets/"):
            return oa.Route("/docs/assets", ops=(oa.Op("GET", "docs_asset", ""),), public=True), rel[13:]
        return None, ""

    def dispatch(self, environ: dict[str, Any]) -> Response | None:
        route, rid = self.match(environ.get("PATH_INFO", ""))
        if route is None:
            return None
        req = Request(environ, rid, self.master.opts.http_body_timeout)
        if route.public:
            return getattr(self, route.ops[0].handler)(req)
        if req.method == "OPTIONS":
            return Response(200, b"", ctype="text/plain; charset=utf-8")
        denied = self.check_key(req, allow_query=route.path == "/events")
        if denied is not None:
            return denied
        if route.subtree:
            if not rid:
                return err(400, "Instance ID is required")
            if self.master.instances.get(rid) is None:
                return err(404, "Instance not found")
        op = route.op(req.method)
        if op is None:
            return err(405, "Method not allowed")
        return getattr(self, op.handler)(req)

    def check_key(self, req: Request, allow_query: bool) -> Response | None:
        key_rec = self.master.instances.key
        if key_rec is None or not key_rec.url:  # fail closed (the master always makes one at start)
            return err(401, "Unauthorized: API key required")
        given = req.environ.get("HTTP_X_API_KEY")
        if given is None and allow_query:
            given = req.query.get("key")
        if given is None or given == "":
            return err(401, "Unauthorized: API key required")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), key_rec.url.encode()):
            return err(401, "Unauthorized: Invalid API key")
        return None

    # -- /instances ------------------------------------------------------------------------
    def list_instances(self, req: Request) -> Response:
        return ok([r.to_api() for r in self.master.instances.all_records()])

    def _url_from_body(self, req: Request) -> tuple[str | None, Response | None]:
        try:
            body = req.json_object()
        except BadBody:
            return None, err(400, "Invalid request body")
        url = jget(body, "url")
        if not isinstance(url, str) or not url:
            return None, err(400, "Invalid request body")
        if utf8_len(url) > MAX_URL_LEN:  # an instance's URL becomes a process argument
            return None, err(400, "Instance URL exceeds maximum length %d" % MAX_URL_LEN)
        try:
            scheme = split_url(url)[0]
        except URLFormatError:
            return None, err(400, "Invalid URL format")
        if scheme not in ("server", "client"):
            return None, err(400, "Invalid URL scheme")
        return url, None

    def create_instance(self, req: Request) -> Response:
        url, bad = self._url_from_body(req)
        if bad is not None:
            return bad
        assert url is not None
        insts = self.master.instances
        try:
            rec = insts.new_record(url)
        except KeyError:
            return err(409, "Instance ID already exists")
        resp = ok(rec.to_api(), 201)
        insts.publish("create", rec)
        insts.start_soon(rec.id)
        insts.save_soon()
        return resp

    def get_instance(self, req: Request) -> Response:
        rec = self.master.instances.get(req.rid)
        assert rec is not None
        return ok(rec.to_api())

    def patch_instance(self, req: Request) -> Response:
        insts = self.master.instances
        rid = req.rid
        rec = insts.get(rid)
        assert rec is not None
        try:
            body = req.json_object()
            _check_patch_types(body)
        except BadBody:
            return ok(rec.to_api())  # Go ignores a body that does not decode
        if rid == KEY_ID:
            if jget(body, "action") == "restart":
                self.master.regenerate_key()
            return ok(insts.key.to_api() if insts.key else {})
        alias = jget(body, "alias")
        if isinstance(alias, str) and alias and alias != rec.alias:
            if utf8_len(alias) > MAX_VALUE_LEN:
                return err(400, "Instance alias exceeds maximum length %d" % MAX_VALUE_LEN)
            rec.alias = alias
            self.master.log.info("Alias updated: %s [%s]", alias, rid)
            insts.save_now()
            insts.publish("update", rec)
        action = jget(body, "action")
        if isinstance(action, str) and action:
            if action not in ("start", "stop", "restart", "reset"):
                return err(400, "Invalid action: %s" % action)
            if action == "start" and rec.status == "stopped":
                insts.start_soon(rid)
            elif action == "stop" and (rec.status != "stopped" or insts.busy(rid)):
                # busy: a start is still spawning the child (the status reads "stopped" until
                # it is up); the stop queues behind it instead of being lost
                gevent.spawn(insts.stop, rid)
            elif action == "restart":
                gevent.spawn(insts.restart, rid)
            elif action == "reset":
                rec.reset_counters()
                self.master.log.info("Traffic stats reset: 0 [%s]", rid)
                insts.save_now()
                insts.publish("update", rec)
        restart = jget(body, "restart")
        if isinstance(restart, bool) and restart != rec.restart:
            rec.restart = restart
            self.master.log.info("Restart policy updated: %s [%s]", "true" if restart else "false", rid)
            insts.save_now()
            insts.publish("update", rec)
        meta = jget(body, "meta")
        if isinstance(meta, dict):
            peer = jget(meta, "peer")
            if isinstance(peer, dict):
                new_peer = {}
                for k in ("sid", "type", "alias"):
                    v = jget(peer, k)
                    v = v if isinstance(v, str) else ""
                    if utf8_len(v) > MAX_VALUE_LEN:
                        return err(400, "Meta peer.%s exceeds maximum length %d" % (k, MAX_VALUE_LEN))
                    new_peer[k] = v
                rec.peer = new_peer
            tags = jget(meta, "tags")
            if isinstance(tags, dict):
                for k, v in tags.items():
                    if utf8_len(k) > MAX_VALUE_LEN:
                        return err(400, "Meta tag key exceeds maximum length %d" % MAX_VALUE_LEN)
                    if utf8_len(str(v)) > MAX_VALUE_LEN:
                        return err(400, "Meta tag value exceeds maximum length %d" % MAX_VALUE_LEN)
                rec.tags = {str(k): str(v) for k, v in tags.items()}
            self.master.log.info("Meta updated [%s]", rid)
            insts.save_now()
            insts.publish("update", rec)
        return ok(rec.to_api())

    def put_instance(self, req: Request) -> Response:
        insts = self.master.instances
        if req.rid == KEY_ID:
            return err(403, "Forbidden: API Key")
        url, bad = self._url_from_body(req)
        if bad is not None:
            return bad
        assert url is not None
        rec = insts.get(req.rid)
        assert rec is not None
        from .records import enhance_url

        enhanced = enhance_url(url, insts.mtls)
        if enhanced == rec.url:
            return err(409, "Instance URL conflict")
        if rec.status != "stopped" or insts.busy(rec.id):
            insts.stop(rec.id)  # waits for a start in progress, then stops what it started
            gevent.sleep(0.1)
        insts.set_url(rec, enhanced)
        rec.status = "stopped"
        self.master.log.info("Instance URL updated: %s [%s]", enhanced, rec.id)
        insts.start_soon(rec.id)
        insts.save_soon()
        return ok(rec.to_api())

    def delete_instance(self, req: Request) -> Response:
        insts = self.master.instances
        if req.rid == KEY_ID:
            return err(403, "Forbidden: API Key")
        rec = insts.delete(req.rid)
        if rec is not None:
            insts.publish("delete", rec)
        return Response(204, b"")

    # -- /events ---------------------------------------------------------------------------
    def events(self, req: Request) -> Response:
        sub = self.master.hub.subscribe()
        initial = [r.to_api() for r in self.master.instances.all_records()]
        return Response(200, sub.stream(initial), ctype="text/event-stream",
                        extra=[("Cache-Control", "no-cache"), ("Connection", "keep-alive"),
                               ("X-Accel-Buffering", "no")])

    # -- /metrics -------------------------------------------------------------------------
    def get_metrics(self, req: Request) -> Response:
        from .metrics import exposition

        body, ctype = exposition(self.master.metrics_registry())
        return Response(200, body, ctype=ctype)

    # -- /info, /tcping ---------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        m = self.master
        key = m.instances.key
        data: dict[str, Any] = {
            "mid": key.config if key else "", "alias": key.alias if key else "",
            "os": goos(), "arch": goarch(), "ver": NODEPASS_VERSION, "name": m.spec.tunnel.host,
            "uptime": int(time.monotonic() - m.started_at), "log": m.mtls.log, "tls": m.mtls.tls,
            "crt": m.raw_crt, "key": m.raw_key,
        }
        data.update(host_metrics())
        return dict(sorted(data.items()))  # Go writes a map: keys sorted

    def get_info(self, req: Request) -> Response:
        return ok(self.info())

    def post_info(self, req: Request) -> Response:
        try:
            body = req.json_object()
        except BadBody:
            return err(400, "Invalid request body")
        alias = jget(body, "alias")
        if alias is not None and not isinstance(alias, str):
            return err(400, "Invalid request body")
        alias = alias or ""
        if utf8_len(alias) > MAX_VALUE_LEN:
            return err(400, "Master alias exceeds maximum length %d" % MAX_VALUE_LEN)
        key = self.master.instances.key
        if key is not None:
            key.alias = alias
            self.master.instances.save_now()
        return ok(self.info())

    def tcping(self, req: Request) -> Response:
        target = req.query.get("target", "")
        if not target:
            return err(400, "Target address required")
        if not self.tcping_slots.acquire(timeout=1):
            return ok({"target": target, "connected": False, "latency": 0, "error": "too many requests"})
        try:
            return ok(self._probe(target))
        finally:
            self.tcping_slots.release()

    def _probe(self, target: str) -> dict[str, Any]:
        host, sep, port_text = target.rpartition(":")
        host = host.strip("[]")
        if not sep or not host:
            return {"target": target, "connected": False, "latency": 0,
                    "error": "dial tcp: address %s: missing port in address" % target}
        port = ascii_port(port_text)
        if port is None:  # as Go's dialer words it (a number out of range, or not a number)
            return {"target": target, "connected": False, "latency": 0,
                    "error": "dial tcp: address %s: invalid port" % port_text}
        start = time.monotonic()
        try:
            ip = self.master.resolver.resolve(host)[0]
        except OSError:
            return {"target": target, "connected": False, "latency": 0,
                    "error": "dial tcp: lookup %s: no such host" % host}
        addr = "[%s]:%s" % (ip, port_text) if ":" in ip else "%s:%s" % (ip, port_text)
        sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.master.opts.report_interval)
            sock.connect((ip, port))
        except (socket.timeout, TimeoutError):
            return {"target": target, "connected": False, "latency": 0,
                    "error": "dial tcp %s: i/o timeout" % addr}
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            return {"target": target, "connected": False, "latency": 0,
                    "error": "dial tcp %s: connect: %s" % (addr, reason)}
        finally:
            sock.close()
        return {"target": target, "connected": True, "latency": int((time.monotonic() - start) * 1000),
                "error": None}

    # -- documentation ------------------------------------------------------------------
    def openapi_json(self, req: Request) -> Response:
        return Response(200, go_json(oa.openapi(self.base)))

    def docs(self, req: Request) -> Response:
        return Response(200, oa.docs_page(self.base), ctype="text/html; charset=utf-8")

    def docs_asset(self, req: Request) -> Response | None:
        data = oa.asset(req.rid)
        if data is None:
            return None
        return Response(200, data, ctype=oa.ASSETS[req.rid], extra=[("Cache-Control", "max-age=86400")])


def _check_patch_types(body: dict[str, Any]) -> None:
    """Reject (as Go's decoder would) a PATCH body whose fields have the wrong JSON types."""
    for name, kind in (("alias", str), ("action", str), ("restart", bool)):
        v = jget(body, name)
        if v is not None and not isinstance(v, kind):
            raise BadBody(name)
    meta = jget(body, "meta")
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise BadBody("meta")
    peer = jget(meta, "peer")
    if peer is not None and (not isinstance(peer, dict) or
                             any(v is not None and not isinstance(v, str) for v in peer.values())):
        raise BadBody("meta.peer")
    tags = jget(meta, "tags")
    if tags is not None and (not isinstance(tags, dict) or
                             any(not isinstance(v, str) for v in tags.values())):
        raise BadBody("meta.tags")

