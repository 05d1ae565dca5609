"""OAuth routes: token issuance, introspection, JWKS and authorization-server metadata."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from sqlalchemy import Connection
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker.api.auth import authenticate_admin, verify_bearer
from broker.api.http import bearer_token, client_address, form_or_json, json_response, services_of
from broker.api.openapi import INTROSPECT_FORM, TOKEN_FORM, ApiRoute
from broker.errors import (
    InvalidClient,
    InvalidRequest,
    InvalidTarget,
    InvalidToken,
    UnsupportedGrantType,
)
from broker.identity.identities import Client
from broker.money import ledger
from broker.plugin import AuthMethod
from broker.services import Services
from broker.settings import MAX_MICROS
from broker.tokens import delegation, issuance
from broker.tokens.exchange import ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE, SubjectCredentials
from broker.tokens.issuance import TokenRequest
from broker.tokens.tokens import VerifiedToken

_NO_STORE = {"cache-control": "no-store", "pragma": "no-cache"}


def basic_credentials(request: Request) -> tuple[str, str] | None:
    """HTTP Basic client credentials (RFC 6749 §2.3.1: both parts are form-url-encoded)."""
    header = request.headers.get("authorization")
    if header is None or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidClient() from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise InvalidClient()
    client_id, secret = unquote(client_id), unquote(secret)
    # The same bounds as credentials in the body: no client has such an id or secret, and a NUL
    # must not reach the database (PostgreSQL refuses it with an error, not a miss).
    if not (0 < len(client_id) <= 128 and len(secret) <= 512) or not (
        client_id.isprintable() and secret.isprintable()
    ):
        raise InvalidClient()
    return client_id, secret


# --- the token request (RFC 6749 §4.4, RFC 8693, RFC 8707) -----------------------------------


def _int_param(params: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    raw = params.get(name)
    if raw is None:
        return None
    if isinstance(raw, bool):
        raise InvalidRequest(f"{name} must be an integer")
    if isinstance(raw, str):
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
            raise InvalidRequest(f"{name} must be an integer from {lo} to {hi}")
        raw = int(raw)
    if not isinstance(raw, int) or not lo <= raw <= hi:
        raise InvalidRequest(f"{name} must be an integer from {lo} to {hi}")
    return raw


def _str_param(params: dict[str, Any], name: str, max_len: int = 512) -> str | None:
    raw = params.get(name)
    if raw is None:
        return None
    if not isinstance(raw, str) or len(raw) > max_len or not raw.isprintable():
        raise InvalidRequest(f"{name} must be a string of at most {max_len} printable characters")
    return raw


KNOWN_PARAMS = frozenset(
    {"grant_type", "client_id", "client_secret", "scope", "budget_micros", "ttl_s", "audience",
     "resource", "subject_token", "subject_token_type", "requested_token_type", "actor_token",
     "actor_token_type"}
)


def parse_token_request(
    params: dict[str, Any],
    basic: tuple[str, str] | None,
    source: str,
    max_ttl: int,
    methods: Mapping[str, AuthMethod],
    targets: frozenset[str] = frozenset(),
) -> TokenRequest:
    """The token request, checked. ``targets`` are the ``resource``/``audience`` values that
    name this broker (its audience and its issuer URL): tokens are only ever for it, so any
    other target is refused (RFC 8707 ``invalid_target``) rather than silently ignored."""
    unknown = set(params) - KNOWN_PARAMS
    if unknown:
        raise InvalidRequest(f"unknown parameter {sorted(unknown)[0]!r}"[:200])
    grant = _str_param(params, "grant_type", 128)
    if not grant:
        raise InvalidRequest("grant_type is required")
    method = methods.get(grant)
    if method is None:
        raise UnsupportedGrantType(f"grant_type {grant!r} is not supported"[:200])
    _str_param(params, "client_id", 512)
    _str_param(params, "client_secret", 512)
    for name in ("resource", "audience"):
        target = _str_param(params, name, 2048)
        if target is not None and target.rstrip("/") not in targets:
            raise InvalidTarget(f"this broker issues tokens only for itself: {name} must name it")
    creds = method.credentials(params, basic)
    scope_raw = _str_param(params, "scope", 4096)
    scope = tuple(scope_raw.split()) if scope_raw else None
    return TokenRequest(
        grant_type=grant,
        method=method,
        creds=creds,
        scope=scope,
        budget_micros=_int_param(params, "budget_micros", 0, MAX_MICROS),
        ttl_s=_int_param(params, "ttl_s", 1, max_ttl),
        source=source,
    )


async def token_endpoint(request: Request) -> Response:
    svc = services_of(request)
    params = await form_or_json(request, svc.settings.server.admin_max_body_bytes)
    issuer = svc.settings.issuer
    req = parse_token_request(
        params, basic_credentials(request), client_address(request), svc.settings.tokens.max_ttl_s,
        svc.auth_methods, frozenset({issuer.audience, issuer.url.rstrip("/")}),
    )
    if isinstance(req.creds, SubjectCredentials) and \
            req.creds.subject_token_type == ACCESS_TOKEN_TYPE:
        issued = await delegation.delegate(svc, req)
    else:
        issued = await issuance.issue(svc, req)
    return json_response({
        "access_token": issued.access_token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
        "issued_token_type": JWT_TOKEN_TYPE,
        "scope": issued.scope,
        "budget_micros": issued.budget_micros,
    }, headers=_NO_STORE)


async def introspect_endpoint(request: Request) -> Response:
    svc = services_of(request)
    params = await form_or_json(request, svc.settings.server.admin_max_body_bytes)
    token = params.get("token")
    if not isinstance(token, str) or not token:
        raise InvalidRequest("token is required")
    # Verifying is memory-only work; its result is told to nobody until the caller has proved
    # who it is, and it lets the caller check and the slice read share one transaction.
    try:
        verified: VerifiedToken | None = verify_bearer(svc, token)
    except InvalidToken:
        verified = None
    caller_tenant, org_wide, remaining = await _introspection_caller(svc, request, verified)
    if verified is None or remaining is None or (not org_wide and verified.tenant != caller_tenant):
        return json_response({"active": False}, headers=_NO_STORE)
    body: dict[str, Any] = {"active": True, **verified.claims, "token_type": "Bearer"}
    body["budget_remaining_micros"] = remaining
    return json_response(body, headers=_NO_STORE)


async def _introspection_caller(
    svc: Services, request: Request, verified: VerifiedToken | None
) -> tuple[str, bool, int | None]:
    """(caller's tenant, may see every tenant, what remains of the token's slice) for a client
    in HTTP Basic or an admin bearer; raises ``invalid_client`` for anyone else."""
    jti = verified.jti if verified is not None else None

    def remaining(conn: Connection) -> int | None:
        return None if jti is None else ledger.slice_remaining(conn, jti)

    basic = basic_credentials(request)
    if basic is not None:
        client_id, secret = basic
        source = client_address(request)
        await svc.failures.ensure_allowed(client_id, source)
        now = int(time.time())

        def check(conn: Connection) -> tuple[Client | None, int | None]:
            client = issuance.authenticate_client(svc, conn, client_id, secret, now)
            return client, (remaining(conn) if client is not None else None)

        client, left = await svc.db.read(check)
        if client is None:
            await svc.failures.record_failure(client_id, source)
            raise InvalidClient()
        org_wide = client.kind == "admin" and bool({"org-admin", "auditor"} & set(client.roles))
        return client.tenant_id, org_wide, left
    bearer = bearer_token(request)
    if bearer is not None:
        actor = authenticate_admin(svc, bearer)
        return actor.tenant_id, actor.org_wide, await svc.db.read(remaining)
    raise InvalidClient(headers={"www-authenticate": 'Basic realm="broker"'})


async def jwks_endpoint(request: Request) -> Response:
    return json_response(
        services_of(request).keyring.jwks(), headers={"cache-control": "public, max-age=60"}
    )


async def metadata_endpoint(request: Request) -> Response:
    settings = services_of(request).settings
    base = settings.issuer.url.rstrip("/")
    return json_response(
        {
            "issuer": settings.issuer.url,
            "token_endpoint": f"{base}/v1/token",
            "introspection_endpoint": f"{base}/v1/introspect",
            "jwks_uri": f"{base}/.well-known/jwks.json",
            "grant_types_supported": sorted(services_of(request).auth_methods),
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "bearer"],
            "response_types_supported": [],
            "token_endpoint_auth_signing_alg_values_supported": ["EdDSA"],
            "access_token_signing_alg_values_supported": ["EdDSA"],
        }
    )


routes = [
    ApiRoute("/v1/token", token_endpoint, methods=["POST"], body=TOKEN_FORM),
    ApiRoute("/v1/introspect", introspect_endpoint, methods=["POST"], body=INTROSPECT_FORM),
    Route("/.well-known/jwks.json", jwks_endpoint, methods=["GET"]),
    Route("/.well-known/oauth-authorization-server", metadata_endpoint, methods=["GET"]),
]
