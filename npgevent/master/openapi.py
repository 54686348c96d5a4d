"""The master's route table, and the OpenAPI document and docs page generated from it.

:data:`ROUTES` is the one description of the API: the WSGI application
dispatches on it (path, methods, public or protected) and :func:`openapi`
turns it into the OpenAPI 3.1.1 document served at ``<base>/openapi.json``.

``<base>/docs`` is Swagger UI from the ``swagger-ui-bundle`` package (no CDN:
deployments are often offline), with the document inlined.  That Swagger UI
(4.x) renders OpenAPI 3.0 only, so the page inlines the same document marked
``3.0.3`` with nullable types written the 3.0 way; nothing else differs.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from .. import NODEPASS_VERSION, __version__


@dataclass(frozen=True)
class Op:
    method: str
    handler: str  # name of the Api method
    summary: str
    body: str = ""  # request schema name
    ok: tuple[int, str, str] = (200, "OK", "")  # status, description, schema ("" = none, "[X]" = array)
    errors: tuple[int, ...] = ()
    query: tuple[tuple[str, str, bool], ...] = ()  # (name, description, required)
    produces: str = "application/json"


@dataclass(frozen=True)
class Route:
    path: str  # relative to <prefix>/v1
    ops: tuple[Op, ...]
    public: bool = False
    subtree: bool = False  # the path ends in "/{id}" and the id is the rest of the URL path
    tag: str = ""
    methods: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", frozenset(op.method for op in self.ops))

    def op(self, method: str) -> Op | None:
        for op in self.ops:
            if op.method == method:
                return op
        return None


ROUTES: tuple[Route, ...] = (
    Route("/instances", tag="Instances", ops=(
        Op("GET", "list_instances", "List all instances (the API key record included)",
           ok=(200, "Every record", "[Instance]"), errors=(401,)),
        Op("POST", "create_instance", "Create and start an instance", body="CreateInstanceRequest",
           ok=(201, "The new instance", "Instance"), errors=(400, 401, 409)),
    )),
    Route("/instances/{id}", subtree=True, tag="Instances", ops=(
        Op("GET", "get_instance", "Get one instance", ok=(200, "The instance", "Instance"),
           errors=(400, 401, 404)),
        Op("PATCH", "patch_instance", "Start, stop, restart or reset it; set alias, restart policy, meta",
           body="UpdateInstanceRequest", ok=(200, "The instance", "Instance"), errors=(400, 401, 404)),
        Op("PUT", "put_instance", "Replace the instance's URL (restarts it)", body="PutInstanceRequest",
           ok=(200, "The instance", "Instance"), errors=(400, 401, 403, 404, 409)),
        Op("DELETE", "delete_instance", "Stop and delete the instance", ok=(204, "Deleted", ""),
           errors=(400, 401, 403, 404)),
    )),
    Route("/events", tag="Events", ops=(
        Op("GET", "events", "Server-sent events: initial, create, update, delete, log, shutdown",
           ok=(200, "An event stream", ""), errors=(401,), produces="text/event-stream"),
    )),
    Route("/info", tag="Master", ops=(
        Op("GET", "get_info", "Master and host information", ok=(200, "Information", "MasterInfo"),
           errors=(401,)),
        Op("POST", "post_info", "Set the master alias", body="UpdateMasterAliasRequest",
           ok=(200, "Information", "MasterInfo"), errors=(400, 401)),
    )),
    Route("/tcping", tag="Master", ops=(
        Op("GET", "tcping", "TCP connect test from the master host", ok=(200, "The result", "TCPingResult"),
           errors=(400, 401), query=(("target", "host:port to connect to", True),)),
    )),
    Route("/openapi.json", public=True, tag="Documentation", ops=(
        Op("GET", "openapi_json", "This OpenAPI document", ok=(200, "OpenAPI 3.1.1", "")),
    )),
    Route("/docs", public=True, tag="Documentation", ops=(
        Op("GET", "docs", "Swagger UI for this API", ok=(200, "An HTML page", ""), produces="text/html"),
    )),
)

_ERRORS = {400: "Bad request", 401: "Unauthorized: API key required or invalid",
           403: "Forbidden: API Key", 404: "Instance not found", 405: "Method not allowed",
           409: "Conflict"}

_STR = {"type": "string"}
_INT = {"type": "integer"}
SCHEMAS: dict[str, Any] = {
    "Peer": {"type": "object", "properties": {"sid": _STR, "type": _STR, "alias": _STR}},
    "Meta": {"type": "object", "properties": {
        "peer": {"$ref": "#/components/schemas/Peer"},
        "tags": {"type": "object", "additionalProperties": _STR}}},
    "Instance": {"type": "object", "properties": {
        "id": _STR, "alias": _STR, "type": {"type": "string", "enum": ["server", "client", ""]},
        "status": {"type": "string", "enum": ["running", "stopped", "error", ""]},
        "url": _STR, "config": _STR, "restart": {"type": "boolean"},
        "meta": {"$ref": "#/components/schemas/Meta"},
        "mode": _INT, "ping": _INT, "pool": _INT, "tcps": _INT, "udps": _INT,
        "tcprx": _INT, "tcptx": _INT, "udprx": _INT, "udptx": _INT}},
    "CreateInstanceRequest": {"type": "object", "required": ["url"], "properties": {"url": _STR}},
    "PutInstanceRequest": {"type": "object", "required": ["url"], "properties": {"url": _STR}},
    "UpdateInstanceRequest": {"type": "object", "properties": {
        "alias": _STR, "action": {"type": "string", "enum": ["start", "stop", "restart", "reset"]},
        "restart": {"type": "boolean"}, "meta": {"$ref": "#/components/schemas/Meta"}}},
    "UpdateMasterAliasRequest": {"type": "object", "properties": {"alias": _STR}},
    "MasterInfo": {"type": "object", "properties": {
        "mid": _STR, "alias": _STR, "os": _STR, "arch": _STR, "cpu": _INT, "mem_total": _INT,
        "mem_used": _INT, "swap_total": _INT, "swap_used": _INT, "netrx": _INT, "nettx": _INT,
        "diskr": _INT, "diskw": _INT, "sysup": _INT, "ver": _STR, "name": _STR, "uptime": _INT,
        "log": _STR, "tls": _STR, "crt": _STR, "key": _STR}},
    "TCPingResult": {"type": "object", "properties": {
        "target": _STR, "connected": {"type": "boolean"}, "latency": _INT,
        "error": {"type": ["string", "null"]}}},
    "Error": {"type": "object", "properties": {"error": _STR}},
}


def _schema_ref(name: str) -> dict[str, Any]:
    if name.startswith("["):
        return {"type": "array", "items": {"$ref": "#/components/schemas/%s" % name[1:-1]}}
    return {"$ref": "#/components/schemas/%s" % name}


def openapi(base: str) -> dict[str, Any]:
    """The OpenAPI 3.1.1 document for an API mounted at *base* (``<prefix>/v1``)."""
    paths: dict[str, Any] = {}
    for route in ROUTES:
        item: dict[str, Any] = {}
        if route.subtree:
            item["parameters"] = [{"name": "id", "in": "path", "required": True, "schema": _STR,
                                   "description": "instance id (8 hex digits), or ******** for the API key"}]
        for op in route.ops:
            status, desc, schema = op.ok
            resp: dict[str, Any] = {"description": desc}
            if schema:
                resp["content"] = {op.produces: {"schema": _schema_ref(schema)}}
            elif op.produces != "application/json":
                resp["content"] = {op.produces: {"schema": _STR}}
            spec: dict[str, Any] = {
                "operationId": op.handler, "summary": op.summary, "tags": [route.tag],
                "responses": {str(status): resp},
            }
            for code in op.errors:
                spec["responses"][str(code)] = {
                    "description": _ERRORS[code],
                    "content": {"application/json": {"schema": _schema_ref("Error")}}}
            if op.body:
                spec["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": _schema_ref(op.body)}}}
            if op.query:
                spec["parameters"] = [{"name": n, "in": "query", "required": r, "description": d,
                                       "schema": _STR} for n, d, r in op.query]
            if route.public:
                spec["security"] = []
            item[op.method.lower()] = spec
        paths[route.path] = item
    return {
        "openapi": "3.1.1",
        "info": {"title": "NodePass master API (npgevent)", "version": "v1",
                 "description": "Compatible with the NodePass %s master; served by npgevent %s."
                                % (NODEPASS_VERSION, __version__)},
        "servers": [{"url": base}],
        "security": [{"ApiKeyAuth": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
            "schemas": copy.deepcopy(SCHEMAS),
        },
    }


def as_openapi_30(doc: dict[str, Any]) -> dict[str, Any]:
    """The same document for Swagger UI 4 (OpenAPI 3.0: ``nullable`` instead of type lists)."""
    out = copy.deepcopy(doc)
    out["openapi"] = "3.0.3"

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            t = node.get("type")
            if isinstance(t, list) and "null" in t:
                rest = [x for x in t if x != "null"]
                node["type"] = rest[0] if len(rest) == 1 else rest
                node["nullable"] = True
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(out)
    return out


DOCS_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>NodePass master API (npgevent)</title>
<link rel="stylesheet" href="%(assets)s/swagger-ui.css">
<style>body{margin:0}</style>
</head>
<body>
<div id="swagger-ui"></div>
<script src="%(assets)s/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({spec: %(spec)s, dom_id: "#swagger-ui", deepLinking: true,
  docExpansion: "list", defaultModelsExpandDepth: 0});
</script>
</body>
</html>
"""


def docs_page(base: str) -> bytes:
    spec = json.dumps(as_openapi_30(openapi(base))).replace("</", "<\\/")
    return (DOCS_HTML % {"assets": base + "/docs/assets", "spec": spec}).encode("utf-8")


ASSETS = {"swagger-ui.css": "text/css; charset=utf-8",
          "swagger-ui-bundle.js": "application/javascript; charset=utf-8"}


def asset(name: str) -> bytes | None:
    """A Swagger UI file from the installed swagger-ui-bundle package."""
    if name not in ASSETS:
        return None
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return (swagger_ui_path / name).read_bytes()
