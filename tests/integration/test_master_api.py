"""The master REST API through a real HTTP client against a real master process:
auth, CORS, routing, every endpoint and error message (master-api.md)."""

from __future__ import annotations

import json
import re

import gevent
import pytest
from helpers import MasterProcess, TcpEcho, free_port, http

CORS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "GET, PATCH, POST, PUT, DELETE, OPTIONS",
    "access-control-allow-headers": "Content-Type, Authorization, X-API-Key, Cache-Control",
}
INSTANCE_KEYS = ["id", "alias", "type", "status", "url", "config", "restart", "meta", "mode", "ping", "pool",
                 "tcps", "udps", "tcprx", "tcptx", "udprx", "udptx"]


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    with MasterProcess(tmp_path_factory.mktemp("state")) as m:
        yield m


def _error(res, status, message):
    assert res.status == status, (res.status, res.body)
    assert res.body == json.dumps({"error": message}, separators=(",", ":")).encode() + b"\n"
    for k, v in CORS.items():
        assert res.headers[k] == v


# -- auth, CORS, routing ------------------------------------------------------------------------


def test_auth_missing_wrong_right(master):
    _error(master.api("GET", "/instances", key=None), 401, "Unauthorized: API key required")
    _error(master.api("GET", "/instances", key="0" * 32), 401, "Unauthorized: Invalid API key")
    ok = master.api("GET", "/instances")
    assert ok.status == 200 and ok.headers["content-type"] == "application/json"
    for k, v in CORS.items():
        assert ok.headers[k] == v


def test_auth_before_method_and_options_without_key(master):
    _error(master.api("DELETE", "/info", key=None), 401, "Unauthorized: API key required")
    _error(master.api("DELETE", "/info"), 405, "Method not allowed")
    opt = master.api("OPTIONS", "/instances", key=None)
    assert opt.status == 200 and opt.body == b""
    assert opt.headers["access-control-allow-origin"] == "*"


def test_every_protected_route_needs_the_key(master):
    for path in ("/instances", "/instances/abcd1234", "/events", "/info", "/tcping?target=127.0.0.1:1"):
        assert master.api("GET", path, key=None).status == 401, path


def test_public_routes_and_404(master):
    spec = master.api("GET", "/openapi.json", key=None)
    assert spec.status == 200 and spec.json["openapi"] == "3.1.1"
    assert spec.json["servers"] == [{"url": "/api/v1"}]
    assert master.api("POST", "/openapi.json", key=None).status == 200  # any method
    docs = master.api("GET", "/docs", key=None)
    assert docs.status == 200 and docs.headers["content-type"].startswith("text/html")
    assert b"cdn.jsdelivr" not in docs.body and b"/api/v1/docs/assets/swagger-ui-bundle.js" in docs.body
    asset = master.api("GET", "/docs/assets/swagger-ui-bundle.js", key=None)
    assert asset.status == 200 and len(asset.body) > 100_000
    for path in ("/api/v1/nope", "/api/v2/instances", "/elsewhere", "/api/v1/instancesX"):
        res = http("GET", master.port, path, key=master.key)
        assert res.status == 404 and res.body == b"404 page not found\n"
        assert "access-control-allow-origin" not in res.headers


def test_openapi_lists_every_route_and_schema(master):
    doc = master.api("GET", "/openapi.json", key=None).json
    assert set(doc["paths"]) == {"/instances", "/instances/{id}", "/events", "/info", "/tcping",
                                 "/openapi.json", "/docs"}
    assert set(doc["paths"]["/instances/{id}"]) >= {"get", "patch", "put", "delete"}
    for name in ("Instance", "CreateInstanceRequest", "UpdateInstanceRequest", "PutInstanceRequest", "Meta",
                 "Peer", "MasterInfo", "UpdateMasterAliasRequest", "TCPingResult"):
        assert name in doc["components"]["schemas"]
    assert doc["components"]["securitySchemes"]["ApiKeyAuth"] == {"type": "apiKey", "in": "header",
                                                                    "name": "X-API-Key"}


# -- /instances ---------------------------------------------------------------------------


def test_key_record_listed_and_readable(master):
    records = master.api("GET", "/instances").json
    key = next(r for r in records if r["id"] == "********")
    assert key["url"] == master.key and key["type"] == "" and key["status"] == ""
    assert re.fullmatch(r"[0-9a-f]{16}", key["config"])
    assert list(key) == INSTANCE_KEYS
    assert master.api("GET", "/instances/********").json == key


@pytest.mark.parametrize(("body", "message"), [
    (b"not json", "Invalid request body"),
    (b"[]", "Invalid request body"),
    (b"{}", "Invalid request body"),
    (b'{"url": ""}', "Invalid request body"),
    (b'{"url": 5}', "Invalid request body"),
    (b'{"url": "client://[::1/x:1"}', "Invalid URL format"),
    (b'{"url": "client://h:port/x:1"}', "Invalid URL format"),
    (b'{"url": "client://h:1/x%zz"}', "Invalid URL format"),
    (b'{"url": "http://h:1/x:2"}', "Invalid URL scheme"),
    (b'{"url": "master://h:1/api"}', "Invalid URL scheme"),
])
def test_create_errors(master, body, message):
    _error(master.api("POST", "/instances", body), 400, message)


def test_create_enhances_url_and_config_and_case_insensitive_fields(master):
    res = master.api("POST", "/instances", {"URL": "server://:1/127.0.0.1:9?tls=0&dns=1.1.1.1,9.9.9.9"})
    assert res.status == 201
    rec = res.json
    assert list(rec) == INSTANCE_KEYS
    assert rec["type"] == "server" and rec["restart"] is True and re.fullmatch(r"[0-9a-f]{8}", rec["id"])
    assert rec["url"] == "server://:1/127.0.0.1:9?dns=1.1.1.1%2C9.9.9.9&log=info&tls=0"
    assert rec["config"] == ("server://:1/127.0.0.1:9?dial=auto&dns=1.1.1.1%2C9.9.9.9&log=info&max=1024"
                             "&mode=0&notcp=0&noudp=0&proxy=0&quic=0&rate=0&read=0s&slot=65536&tls=0")
    assert rec["meta"] == {"peer": {"sid": "", "type": "", "alias": ""}, "tags": {}}
    assert b"\\u0026" in res.body  # Go's encoder escapes &
    master.api("DELETE", "/instances/" + rec["id"])


def test_instance_id_errors(master):
    _error(master.api("GET", "/instances/"), 400, "Instance ID is required")
    _error(master.api("GET", "/instances/nope0000"), 404, "Instance not found")
    _error(master.api("POST", "/instances/********"), 405, "Method not allowed")
    _error(master.api("PUT", "/instances/********", {"url": "client://a:1/b:2"}), 403, "Forbidden: API Key")
    _error(master.api("DELETE", "/instances/********"), 403, "Forbidden: API Key")


def _create(master, url):
    res = master.api("POST", "/instances", {"url": url})
    assert res.status == 201, res.body
    return res.json["id"]


def test_patch_fields_and_errors(master):
    rid = _create(master, "client://127.0.0.1:%d/127.0.0.1:9?mode=1" % free_port())
    p = "/instances/" + rid
    assert master.api("PATCH", p, {"alias": "edge-1"}).json["alias"] == "edge-1"
    assert master.api("PATCH", p, {"alias": ""}).json["alias"] == "edge-1"  # cannot be cleared this way
    _error(master.api("PATCH", p, {"alias": "é" * 129}), 400, "Instance alias exceeds maximum length 256")
    _error(master.api("PATCH", p, {"action": "status"}), 400, "Invalid action: status")
    assert master.api("PATCH", p, {"restart": False}).json["restart"] is False
    meta = {"peer": {"sid": "s", "type": "1", "alias": "peer-a"}, "tags": {"env": "prod", "k": "v"}}
    got = master.api("PATCH", p, {"meta": meta}).json
    assert got["meta"] == meta
    got = master.api("PATCH", p, {"meta": {"peer": {}}}).json  # replaces the peer with empty strings
    assert got["meta"]["peer"] == {"sid": "", "type": "", "alias": ""} and got["meta"]["tags"] == meta["tags"]
    _error(master.api("PATCH", p, {"meta": {"peer": {"sid": "x" * 257}}}), 400,
           "Meta peer.sid exceeds maximum length 256")
    _error(master.api("PATCH", p, {"meta": {"tags": {"k" * 257: "v"}}}), 400,
           "Meta tag key exceeds maximum length 256")
    _error(master.api("PATCH", p, {"meta": {"tags": {"k": "v" * 257}}}), 400,
           "Meta tag value exceeds maximum length 256")
    unchanged = master.api("PATCH", p, b"{broken")
    assert unchanged.status == 200 and unchanged.json["alias"] == "edge-1"
    assert master.api("PATCH", p, {"meta": {"tags": {}}}).json["meta"]["tags"] == {}
    assert master.api("DELETE", p).status == 204
    _error(master.api("GET", p), 404, "Instance not found")


def test_put_conflict_and_replace(master):
    port = free_port()
    rid = _create(master, "client://127.0.0.1:%d/127.0.0.1:9?mode=1" % port)
    p = "/instances/" + rid
    cur = master.api("GET", p).json
    _error(master.api("PUT", p, {"url": "client://127.0.0.1:%d/127.0.0.1:9?mode=1&log=info" % port}), 409,
           "Instance URL conflict")
    _error(master.api("PUT", p, {"url": "ftp://x:1/y:2"}), 400, "Invalid URL scheme")
    new = master.api("PUT", p, {"url": "server://127.0.0.1:%d/127.0.0.1:9?mode=2" % free_port()})
    assert new.status == 200 and new.json["type"] == "server" and new.json["url"] != cur["url"]
    assert new.json["alias"] == cur["alias"] and new.json["restart"] == cur["restart"]
    master.api("DELETE", p)


# -- /info, /tcping --------------------------------------------------------------------------


def test_info_get_and_alias(master):
    info = master.api("GET", "/info")
    assert info.status == 200
    data = info.json
    assert list(data) == sorted(data)  # a Go map: keys sorted
    assert set(data) == {"mid", "alias", "os", "arch", "cpu", "mem_total", "mem_used", "swap_total", "swap_used",
                         "netrx", "nettx", "diskr", "diskw", "sysup", "ver", "name", "uptime", "log", "tls",
                         "crt", "key"}
    assert (data["os"], data["ver"], data["name"], data["log"], data["tls"]) == (
        "linux", "v1.11.0", "127.0.0.1", "info", "0")
    assert -1 <= data["cpu"] <= 100 and data["mem_total"] > 0 and data["sysup"] > 0
    assert master.api("POST", "/info", {"alias": "hub-1"}).json["alias"] == "hub-1"
    assert master.api("GET", "/instances/********").json["alias"] == "hub-1"
    _error(master.api("POST", "/info", b"nope"), 400, "Invalid request body")
    _error(master.api("POST", "/info", {"alias": "x" * 257}), 400, "Master alias exceeds maximum length 256")
    assert master.api("POST", "/info", {"alias": ""}).json["alias"] == ""
    _error(master.api("PUT", "/info", {}), 405, "Method not allowed")


def test_tcping(master):
    _error(master.api("GET", "/tcping"), 400, "Target address required")
    _error(master.api("GET", "/tcping?target="), 400, "Target address required")
    _error(master.api("POST", "/tcping?target=127.0.0.1:1"), 405, "Method not allowed")
    dead = free_port()
    res = master.api("GET", "/tcping?target=127.0.0.1:%d" % dead).json
    assert res == {"target": "127.0.0.1:%d" % dead, "connected": False, "latency": 0,
                   "error": "dial tcp 127.0.0.1:%d: connect: connection refused" % dead}
    with TcpEcho() as echo:
        res = master.api("GET", "/tcping?target=127.0.0.1:%d" % echo.port)
        assert res.json["connected"] is True and res.json["error"] is None and res.json["latency"] >= 0
        assert b'"error":null' in res.body


def test_50_concurrent_api_clients(master):
    rid = _create(master, "client://127.0.0.1:%d/127.0.0.1:9?mode=1" % free_port())

    def client(i):
        for path in ("/instances", "/instances/" + rid, "/info"):
            res = master.api("GET", path)
            assert res.status == 200, (path, res.status)
        res = master.api("PATCH", "/instances/" + rid, {"meta": {"tags": {"client": str(i)}}})
        assert res.status == 200
        return True

    jobs = [gevent.spawn(client, i) for i in range(50)]
    gevent.joinall(jobs, timeout=60, raise_error=True)
    assert all(j.value for j in jobs)
    master.api("DELETE", "/instances/" + rid)
