"""Token issuance: the JWT verifies against the served JWKS and carries every claim of the spec."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import jwt
import pytest

from broker.identity.credentials import hash_secret
from tests.conftest import Broker

SPEC_CLAIMS = {"iss", "aud", "sub", "tenant", "kind", "jti", "iat", "nbf", "exp", "models",
               "budget_micros"}


def _agent(broker: Broker, **policy: Any) -> dict[str, Any]:
    tenant = broker.create_tenant()
    return broker.create_workload(
        tenant["id"], policy={"models": ["gpt-4o-mini", "claude-*"], "token_budget_micros": 500_000,
                              **policy},
    )


def test_token_verifies_with_pyjwt_against_served_jwks(broker: Broker) -> None:
    agent = _agent(broker)
    resp = broker.client.post("/v1/token", data={
        "grant_type": "client_credentials", "client_id": agent["client_id"],
        "client_secret": agent["client_secret"]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token_type"] == "Bearer"
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
    assert body["budget_micros"] == 500_000
    assert body["scope"] == "gpt-4o-mini claude-*"
    assert resp.headers["cache-control"] == "no-store"

    token = body["access_token"]
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA" and header["typ"] == "at+jwt" and header["kid"]

    jwks = broker.client.get("/.well-known/jwks.json").json()
    key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    claims = jwt.decode(token, key.key, algorithms=["EdDSA"], audience="ai-broker",
                        issuer="http://broker.test")
    assert claims.keys() >= SPEC_CLAIMS
    assert claims["sub"] == agent["id"]
    assert claims["tenant"] == agent["tenant_id"]
    assert claims["kind"] == "agent"
    assert claims["models"] == ["gpt-4o-mini", "claude-*"]
    assert claims["exp"] - claims["iat"] == body["expires_in"] == 300
    assert claims["nbf"] == claims["iat"]


def test_http_basic_and_json_bodies_are_accepted(broker: Broker) -> None:
    agent = _agent(broker)
    basic = base64.b64encode(f"{agent['client_id']}:{agent['client_secret']}".encode()).decode()
    resp = broker.client.post("/v1/token", data={"grant_type": "client_credentials"},
                              headers={"authorization": f"Basic {basic}"})
    assert resp.status_code == 200, resp.text
    resp = broker.client.post("/v1/token", json={
        "grant_type": "client_credentials", "client_id": agent["client_id"],
        "client_secret": agent["client_secret"], "scope": "gpt-4o-mini", "budget_micros": 1000,
        "ttl_s": 60})
    assert resp.status_code == 200, resp.text
    assert resp.json()["expires_in"] == 60
    assert resp.json()["budget_micros"] == 1000
    assert resp.json()["scope"] == "gpt-4o-mini"


def test_ttl_s_can_shorten_a_token_but_never_lengthen_it_past_the_policy(broker: Broker) -> None:
    agent = _agent(broker)  # the agent's policy lifetime: 300 s
    form = {"grant_type": "client_credentials", "client_id": agent["client_id"],
            "client_secret": agent["client_secret"]}
    assert broker.client.post("/v1/token", data={**form, "ttl_s": "60"}).json()["expires_in"] == 60
    longer = broker.client.post("/v1/token", data={**form, "ttl_s": "900"}).json()
    assert longer["expires_in"] == 300
    claims = jwt.decode(longer["access_token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 300


@pytest.mark.parametrize("scope", ["o1", "gpt-*", "*"])
def test_scope_cannot_widen_policy(broker: Broker, scope: str) -> None:
    agent = _agent(broker)
    resp = broker.client.post("/v1/token", data={
        "grant_type": "client_credentials", "client_id": agent["client_id"],
        "client_secret": agent["client_secret"], "scope": scope})
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid_scope"


def test_wrong_secret_unknown_client_look_the_same(broker: Broker) -> None:
    agent = _agent(broker)
    a = broker.client.post("/v1/token", data={"grant_type": "client_credentials",
                           "client_id": agent["client_id"], "client_secret": "bks_wrong"})
    b = broker.client.post("/v1/token", data={"grant_type": "client_credentials",
                           "client_id": "wl_nobody", "client_secret": "bks_wrong"})
    assert a.status_code == b.status_code == 401
    assert a.json() == b.json() == {"error": "invalid_client",
                                    "error_description": "Client authentication failed"}


def test_repeated_failures_slow_down_even_a_correct_secret(broker: Broker) -> None:
    agent = _agent(broker)
    for _ in range(10):
        r = broker.client.post("/v1/token", data={"grant_type": "client_credentials",
                               "client_id": agent["client_id"], "client_secret": "bks_guess"})
        assert r.status_code == 401
    r = broker.client.post("/v1/token", data={"grant_type": "client_credentials",
                           "client_id": agent["client_id"], "client_secret": agent["client_secret"]})
    assert r.status_code == 429
    assert r.json()["error"] == "slow_down"
    assert int(r.headers["retry-after"]) > 0


def test_client_secret_is_stored_as_keyed_hash(broker: Broker) -> None:
    agent = _agent(broker)
    from sqlalchemy import text
    with broker.services.db.engine.connect() as conn:
        stored = conn.execute(text("SELECT secret_hash FROM workload WHERE id = :id"),
                              {"id": agent["id"]}).scalar_one()
    assert agent["client_secret"] not in stored
    # HMAC-SHA-256 keyed with the pepper, not a bare digest a stolen table could be tested with.
    assert stored == hash_secret(broker.services.pepper, agent["client_secret"])
    assert stored != hashlib.sha256(agent["client_secret"].encode()).hexdigest()
    raw = agent["client_secret"].removeprefix("bks_")
    assert len(base64.urlsafe_b64decode(raw + "==")) >= 32  # 256 bits


def test_introspection_reports_claims_and_remaining_budget(broker: Broker) -> None:
    agent = _agent(broker)
    token = broker.token(agent["client_id"], agent["client_secret"])
    basic = base64.b64encode(f"{agent['client_id']}:{agent['client_secret']}".encode()).decode()
    resp = broker.client.post("/v1/introspect", data={"token": token},
                              headers={"authorization": f"Basic {basic}"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["active"] is True
    assert body["sub"] == agent["id"]
    assert body["budget_remaining_micros"] == 500_000
    resp = broker.client.post("/v1/introspect", data={"token": token + "x"},
                              headers={"authorization": f"Basic {basic}"})
    assert resp.json() == {"active": False}
    resp = broker.client.post("/v1/introspect", data={"token": token}, headers=broker.admin())
    assert resp.json()["active"] is True
    resp = broker.client.post("/v1/introspect", data={"token": token})
    assert resp.status_code == 401 and resp.json()["error"] == "invalid_client"


def test_metadata_document_names_the_issuer_endpoints_and_methods(broker: Broker) -> None:
    """RFC 8414 metadata: every endpoint under the issuer, and only what the broker supports."""
    resp = broker.client.get("/.well-known/oauth-authorization-server")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert resp.json() == {
        "issuer": "http://broker.test",
        "token_endpoint": "http://broker.test/v1/token",
        "introspection_endpoint": "http://broker.test/v1/introspect",
        "jwks_uri": "http://broker.test/.well-known/jwks.json",
        "grant_types_supported": ["client_credentials", "urn:ietf:params:oauth:grant-type:token-exchange"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "bearer"],
        "response_types_supported": [],
        "token_endpoint_auth_signing_alg_values_supported": ["EdDSA"],
        "access_token_signing_alg_values_supported": ["EdDSA"],
    }


def test_verified_cache_rechecks_expiry_and_the_signing_key(broker: Broker) -> None:
    from broker.errors import InvalidToken
    from broker.tokens.tokens import LEEWAY_S, VerifiedCache

    agent = _agent(broker)
    token = broker.token(agent["client_id"], agent["client_secret"])
    ring, settings = broker.services.keyring, broker.settings
    cache = VerifiedCache()
    args = {"issuer": settings.issuer.url, "audience": settings.issuer.audience}
    first = cache.verify(token, ring, now=0, **args)
    assert cache.verify(token, ring, now=first.exp, **args) is first  # served from memory
    # Past expiry plus leeway the memory is not trusted: the token is verified afresh (here the
    # real clock still finds it valid, so a new verification comes back).
    again = cache.verify(token, ring, now=first.exp + LEEWAY_S + 1, **args)
    assert again is not first and again == first
    kid = jwt.get_unverified_header(token)["kid"]
    removed = ring.keys.pop(kid)
    try:
        with pytest.raises(InvalidToken):  # its key left the keyring: the hit is not trusted
            cache.verify(token, ring, now=first.iat, **args)
    finally:
        ring.keys[kid] = removed
