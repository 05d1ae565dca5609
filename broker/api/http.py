"""The HTTP edge: body parsing with limits, request ids, and rendering errors in the caller's
dialect. Errors are rendered here and only here.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from broker.errors import (
    BrokerError,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from broker.services import Services

log = logging.getLogger("broker.http")

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
# Opaque broker ids: a short prefix and hex, or the bootstrap admin's fixed ids.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


# --- request ids ---------------------------------------------------------------------------


def services_of(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is not None and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


def request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


# --- dialects ------------------------------------------------------------------------------

OAUTH_PATHS = ("/v1/token", "/v1/introspect")
OPENAI_PATHS = ("/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/models",
                "/v1/files", "/v1/batches")
ANTHROPIC_PATHS = ("/v1/messages",)


def dialect_for(path: str) -> str:
    if path in OAUTH_PATHS:
        return "oauth"
    if path.startswith(OPENAI_PATHS):
        return "openai"
    if path.startswith(ANTHROPIC_PATHS):
        return "anthropic"
    return "problem"


_OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_GATEWAY_CODES = {"invalid_token": "invalid_api_key"}


def error_body(exc: BrokerError, dialect: str) -> tuple[dict[str, Any], str]:
    """The error's body and media type in the caller's dialect."""
    if dialect == "oauth":
        return {"error": exc.code, "error_description": exc.detail}, "application/json"
    if dialect == "openai":
        code = _GATEWAY_CODES.get(exc.code, exc.code)
        etype = _OPENAI_TYPES.get(exc.status, "invalid_request_error" if exc.status < 500 else "api_error")
        if exc.code == "insufficient_quota":
            etype = "insufficient_quota"
        return {
            "error": {"message": exc.detail, "type": etype, "code": code, "param": exc.param}
        }, "application/json"
    if dialect == "anthropic":
        etype = _ANTHROPIC_TYPES.get(exc.status, "api_error")
        return {"type": "error", "error": {"type": etype, "message": exc.detail}}, "application/json"
    return {
        "type": f"urn:broker:error:{exc.code}",
        "title": exc.title,
        "status": exc.status,
        "detail": exc.detail,
    }, "application/problem+json"


class _Json(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def error_response(exc: BrokerError, path: str) -> Response:
    body, media = error_body(exc, dialect_for(path))
    headers = dict(exc.headers)
    if exc.status == 401 and dialect_for(path) == "problem":
        headers.setdefault("www-authenticate", 'Bearer realm="broker"')
    return _Json(body, status_code=exc.status, headers=headers, media_type=media)


def json_response(content: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return _Json(content, status_code=status, headers=dict(headers or {}))


# --- bodies --------------------------------------------------------------------------------


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes ``max_bytes`` (never buffered whole)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()) or len(declared) > 18:
            raise InvalidRequest("invalid Content-Length")
        if int(declared) > max_bytes:
            raise PayloadTooLarge(f"the body exceeds {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"the body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise InvalidRequest(f"duplicate JSON key {k!r}"[:200])
        out[k] = v
    return out


def _reject_nul(value: Any, depth: int = 0) -> None:
    if depth > 64:
        raise InvalidRequest("the JSON body is nested too deeply")
    if isinstance(value, str):
        if "\x00" in value:
            raise ValidationFailed("strings must not contain NUL characters")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                # A lone surrogate ("\ud800" in JSON) is valid JSON but no text: no database
                # driver can store it.
                raise ValidationFailed("strings must be valid Unicode text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _reject_nul(k, depth + 1)
            _reject_nul(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _reject_nul(v, depth + 1)


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the body is not UTF-8") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"malformed JSON at line {exc.lineno} column {exc.colno}") from None
    except ValueError:
        # An integer of more digits than Python converts (int_max_str_digits).
        raise InvalidRequest("the JSON body holds a number too large") from None
    except RecursionError:
        raise InvalidRequest("the JSON body is nested too deeply") from None
    _reject_nul(value)
    return value


async def json_object(
    request: Request, max_bytes: int, *, empty: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The body as a JSON object; with ``empty``, a body of nothing but whitespace is that
    (for routes whose body is optional)."""
    raw = await read_body(request, max_bytes)
    if empty is not None and not raw.strip():
        return empty
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", "") and not ctype.endswith("+json"):
        raise UnsupportedMediaType("send application/json")
    value = parse_json(raw)
    if not isinstance(value, dict):
        raise ValidationFailed("the body must be a JSON object")
    return value


async def form_or_json(request: Request, max_bytes: int) -> dict[str, Any]:
    """OAuth endpoints take form-encoded bodies (RFC 6749) or JSON."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await read_body(request, max_bytes)
    if ctype == "application/x-www-form-urlencoded":
        try:
            text = raw.decode("utf-8")
            pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=64)
        except (UnicodeDecodeError, ValueError):
            raise InvalidRequest("malformed form body") from None
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise InvalidRequest(f"parameter {k!r} repeated"[:200])
            if "\x00" in k or "\x00" in v:
                raise InvalidRequest("parameters must not contain NUL characters")
            out[k] = v
        return out
    if ctype in ("application/json", ""):
        if not raw and ctype == "":
            return {}
        try:
            value = parse_json(raw)
        except ValidationFailed as exc:
            # OAuth has no 422: every malformed request is invalid_request (RFC 6749 §5.2).
            raise InvalidRequest(exc.detail) from None
        if not isinstance(value, dict):
            raise InvalidRequest("the body must be a JSON object")
        return value
    raise InvalidRequest("send application/x-www-form-urlencoded or application/json")


def validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """Validate a body against a strict schema; the first problems are named in the 422."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err["loc"]) or "body"
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}: {msg}")
        raise ValidationFailed("; ".join(problems)[:1000]) from None


def query_int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18 or not lo <= int(raw) <= hi:
        raise InvalidRequest(f"{name} must be an integer from {lo} to {hi}")
    return int(raw)


def query_str(request: Request, name: str, max_len: int = 256) -> str | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if len(raw) > max_len or "\x00" in raw or not raw.isprintable():
        raise InvalidRequest(f"{name} is not valid")
    return raw


def path_id(request: Request, name: str = "id") -> str:
    """A path id that cannot name anything (bad characters, too long) is simply not found."""
    from broker.errors import NotFound

    value = str(request.path_params.get(name, ""))
    if not ID_PATTERN.match(value):
        raise NotFound("not found")
    return value
