"""``GET /openapi.json`` describes every route of the running app, as OpenAPI 3.1.

The routes are taken from ``app.router.routes`` (extensions included), so a route added
without a description fails here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.routing import Route

from tests.conftest import Broker

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture
def doc(sqlite_broker: Broker) -> dict[str, Any]:
    resp = sqlite_broker.client.get("/openapi.json")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = resp.json()
    return body


def app_routes(broker: Broker) -> list[Route]:
    routes = broker.client._inner.app.router.routes
    for route in routes:
        assert isinstance(route, Route), f"{route!r} is not an HTTP route the document can name"
    return list(routes)


def test_every_route_of_the_app_is_described(sqlite_broker: Broker, doc: dict[str, Any]) -> None:
    missing = []
    for route in app_routes(sqlite_broker):
        for method in route.methods or ():
            if method == "HEAD":
                continue
            if method.lower() not in doc["paths"].get(route.path, {}):
                missing.append(f"{method} {route.path}")
    assert not missing, f"routes missing from /openapi.json: {missing}"


def test_the_document_names_no_route_the_app_lacks(sqlite_broker: Broker,
                                                   doc: dict[str, Any]) -> None:
    served = {(m.lower(), r.path) for r in app_routes(sqlite_broker) for m in r.methods or ()}
    for path, item in doc["paths"].items():
        for method in item.keys() & HTTP_METHODS:
            assert (method, path) in served, f"{method.upper()} {path} is described but not served"


API_REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_every_route_of_the_app_is_in_the_api_reference(sqlite_broker: Broker) -> None:
    """``docs/api.md`` names each route as ``METHOD /path`` in code; a route added without a
    word in the reference fails here."""
    text = API_REFERENCE.read_text()
    missing = []
    for route in app_routes(sqlite_broker):
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            if not re.search(rf"`{method} {re.escape(route.path)}(?=[`?\s])", text):
                missing.append(f"{method} {route.path}")
    assert not missing, f"routes missing from docs/api.md: {missing}"


def test_document_is_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["title"] and doc["info"]["version"]
    assert doc["servers"][0]["url"] == "http://broker.test"
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    operation_ids = []
    for path, item in doc["paths"].items():
        assert path.startswith("/")
        for method, op in item.items():
            assert method in HTTP_METHODS, (path, method)
            assert op["responses"], (path, method)
            assert op.get("summary"), (path, method)
            operation_ids.append(op["operationId"])
            for status in op["responses"]:
                assert re.fullmatch(r"[1-5](\d\d|XX)|default", status), (path, method, status)
    assert len(operation_ids) == len(set(operation_ids)), "operationId must be unique"


def test_path_parameters_are_declared(doc: dict[str, Any]) -> None:
    for path, item in doc["paths"].items():
        names = set(re.findall(r"\{([^}:]+)", path))
        for method, op in item.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == names, (method, path, declared)
            for p in op.get("parameters", []):
                if p["in"] == "path":
                    assert p["required"] is True and p["schema"], (method, path)


def test_admin_writes_have_json_request_bodies(doc: dict[str, Any]) -> None:
    for path in ("/v1/admin/tenants", "/v1/admin/workloads"):
        body = doc["paths"][path]["post"]["requestBody"]
        schema = body["content"]["application/json"]["schema"]
        assert body["required"] is True
        assert schema["additionalProperties"] is False  # strict: unknown fields are refused
        assert "name" in schema["required"]
    for path in ("/v1/admin/tenants/{id}", "/v1/admin/workloads/{id}"):
        schema = doc["paths"][path]["patch"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["additionalProperties"] is False
    workload = doc["paths"]["/v1/admin/workloads"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    assert {"tenant_id", "name", "kind", "roles", "policy"} <= workload["properties"].keys()
    for path, item in doc["paths"].items():
        for method in item.keys() & {"post", "patch", "put"}:
            if path.startswith("/v1/admin"):
                assert "requestBody" in item[method], f"{method.upper()} {path}"


def test_oauth_routes_take_form_and_json(doc: dict[str, Any]) -> None:
    for path in ("/v1/token", "/v1/introspect"):
        content = doc["paths"][path]["post"]["requestBody"]["content"]
        assert {"application/x-www-form-urlencoded", "application/json"} <= content.keys()
    token = doc["paths"]["/v1/token"]["post"]["requestBody"]["content"]["application/json"]
    assert "grant_type" in token["schema"]["required"]


def test_errors_are_described_in_each_routes_dialect(doc: dict[str, Any]) -> None:
    problem = doc["paths"]["/v1/admin/tenants"]["get"]["responses"]["4XX"]["content"]
    assert set(problem["application/problem+json"]["schema"]["required"]) == {
        "type", "title", "status", "detail"}
    oauth = doc["paths"]["/v1/token"]["post"]["responses"]["4XX"]["content"]["application/json"]
    assert "error" in oauth["schema"]["required"]


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    refs = set(_refs(doc))
    assert refs, "the admin schemas share the policy and budget models through $ref"
    for ref in refs:
        assert ref.startswith("#/"), ref
        node: Any = doc
        for part in ref[2:].split("/"):
            assert isinstance(node, dict) and part in node, f"dangling $ref {ref}"
            node = node[part]
