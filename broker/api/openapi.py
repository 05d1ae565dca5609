"""The OpenAPI document, built from the app's own routing table so it cannot forget a route.

Request schemas come from the same pydantic models that validate the bodies; error schemas
follow the dialect of each route (see :func:`broker.api.http.dialect_for`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel
from starlette.routing import BaseRoute, Route

from broker.api.http import dialect_for
from broker.settings import Settings

_ERRORS: dict[str, dict[str, Any]] = {
    "oauth": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
    },
    "problem": {
        "type": "object",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
        },
    },
    "openai": {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "code": {"type": ["string", "null"]},
                    "param": {"type": ["string", "null"]},
                },
            }
        },
    },
    "anthropic": {
        "type": "object",
        "properties": {
            "type": {"const": "error"},
            "error": {
                "type": "object",
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}

TOKEN_FORM: dict[str, Any] = {
    "type": "object",
    "required": ["grant_type"],
    "properties": {
        "grant_type": {"type": "string", "enum": [
            "client_credentials", "urn:ietf:params:oauth:grant-type:token-exchange"]},
        "client_id": {"type": "string"},
        "client_secret": {"type": "string"},
        "subject_token": {"type": "string", "maxLength": 8192},
        "subject_token_type": {"type": "string", "enum": [
            "urn:ietf:params:oauth:token-type:jwt", "urn:broker:token-type:vault",
            "urn:ietf:params:oauth:token-type:access_token"]},
        "actor_token": {"type": "string", "maxLength": 8192},
        "actor_token_type": {"type": "string",
                             "enum": ["urn:ietf:params:oauth:token-type:access_token"]},
        "requested_token_type": {"type": "string"},
        "scope": {"type": "string", "description": "space-separated model names or globs"},
        "budget_micros": {"type": "integer", "minimum": 0},
        "ttl_s": {"type": "integer", "minimum": 1, "maximum": 900},
        "resource": {"type": "string"},
        "audience": {"type": "string"},
    },
}

Body = type[BaseModel] | dict[str, Any]


class ApiRoute(Route):
    """A route that names the schema of its request body, so that the document built from the
    routing table shows it (a model, or a JSON schema for bodies no model reads)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], *, methods: list[str],
                 body: Body | None = None) -> None:
        super().__init__(path, endpoint, methods=methods)
        self.body = body


INTROSPECT_FORM: dict[str, Any] = {
    "type": "object", "required": ["token"], "properties": {"token": {"type": "string"}}
}


def _schema(source: Body, shared: dict[str, Any]) -> dict[str, Any]:
    """The body's schema; the models it nests (``$defs``) go to ``components.schemas``, where
    its ``$ref``s point."""
    if isinstance(source, dict):
        return source
    schema = source.model_json_schema(ref_template="#/components/schemas/{model}")
    shared.update(schema.pop("$defs", {}))
    return schema


def _operation(method: str, path: str, route: Route, shared: dict[str, Any]) -> dict[str, Any]:
    dialect = dialect_for(path)
    doc = (route.endpoint.__doc__ or route.name or path).strip().splitlines()[0]
    op: dict[str, Any] = {
        "summary": doc,
        "operationId": f"{method.lower()}_{route.name}",
        "responses": {
            "200": {"description": "success"},
            "4XX": {
                "description": "refused",
                "content": {
                    ("application/problem+json" if dialect == "problem" else "application/json"): {
                        "schema": _ERRORS[dialect]
                    }
                },
            },
        },
    }
    params = re.findall(r"\{([^}:]+)", path)
    if params:
        op["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in params
        ]
    body = route.body if isinstance(route, ApiRoute) else None
    if body is not None:
        content = {"application/json": {"schema": _schema(body, shared)}}
        if dialect == "oauth":
            content["application/x-www-form-urlencoded"] = {"schema": _schema(body, shared)}
        op["requestBody"] = {"required": True, "content": content}
    if path.startswith("/v1/admin"):
        op["security"] = [{"bearer": []}]
    return op


def build_openapi(routes: Sequence[BaseRoute], settings: Settings) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    shared: dict[str, Any] = {}
    for route in routes:
        if not isinstance(route, Route) or not route.include_in_schema:
            continue
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            paths.setdefault(route.path, {})[method.lower()] = _operation(
                method, route.path, route, shared
            )
    return {
        "openapi": "3.1.0",
        "info": {"title": "AI secrets broker", "version": "0.1.0"},
        "servers": [{"url": settings.issuer.url}],
        "paths": paths,
        "components": {
            "schemas": shared,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
