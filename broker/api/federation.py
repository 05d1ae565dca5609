"""The broker as an OIDC issuer toward federated providers: its discovery document and the
public keys of its assertions. Public, like the access-token JWKS; the two key sets are
disjoint (see :mod:`broker.credentials.assertions`)."""

from __future__ import annotations

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker.api.http import json_response, services_of
from broker.credentials.assertions import AssertionKeys

ASSERTION_JWKS_PATH = "/.well-known/assertion-jwks.json"
CLAIMS = ["iss", "sub", "aud", "iat", "nbf", "exp", "jti"]


async def _loaded(keys: AssertionKeys) -> AssertionKeys:
    if not keys.loaded:
        # The first use reads Vault (and on a fresh one creates the keys): off the event loop.
        await anyio.to_thread.run_sync(keys.load)
    return keys


async def openid_configuration(request: Request) -> Response:
    """OpenID discovery of the issuer of the broker's assertions toward providers."""
    svc = services_of(request)
    keys = await _loaded(svc.assertion_keys)
    issuer = svc.settings.issuer.url
    return json_response(
        {
            "issuer": issuer,
            "jwks_uri": issuer.rstrip("/") + ASSERTION_JWKS_PATH,
            "id_token_signing_alg_values_supported": keys.algorithms(),
            "subject_types_supported": ["public"],
            "response_types_supported": ["id_token"],
            "claims_supported": CLAIMS,
        },
        headers={"cache-control": "public, max-age=60"},
    )


async def assertion_jwks(request: Request) -> Response:
    """The public keys of the broker's assertions toward providers (never the access-token
    keys)."""
    keys = await _loaded(services_of(request).assertion_keys)
    return json_response(keys.jwks(), headers={"cache-control": "public, max-age=60"})


routes = [
    Route("/.well-known/openid-configuration", openid_configuration, methods=["GET"]),
    Route(ASSERTION_JWKS_PATH, assertion_jwks, methods=["GET"]),
]
