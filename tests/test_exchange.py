"""Workload identity without static secrets, end to end through ``POST /v1/token``.

A workload presents a token its platform already gave it (a Kubernetes projected service-account
token, a GitHub Actions OIDC token, a SPIFFE JWT-SVID, an OIDC ID token, a Vault token) and gets
a broker token for the one workload whose bindings it matches. Everything else gets the very
answer a wrong client secret gets.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import SECRETS, Broker
from tests.fake_issuer import (
    AUDIENCE,
    DROP,
    FakeIssuer,
    issuer_settings,
)
from tests.gateway_support import Env, make_env
from tests.support import assert_oauth_error, assert_problem
from tests.vault_support import AppRole

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
VAULT_TYPE = "urn:broker:token-type:vault"
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
POLICY = {"models": ["gpt-test"], "token_budget_micros": 100_000,
          "rate": {"rpm": 100_000, "tpm": 10**9}, "max_live_tokens": 10_000}

K8S = {"kubernetes.io.namespace": "payments", "kubernetes.io.serviceaccount.name": "worker"}
GITHUB = {"repository_id": "74", "job_workflow_ref":
          "octo-org/octo-automation/.github/workflows/oidc.yml@refs/heads/*"}
SPIFFE = {"sub": "spiffe://example.org/ns/payments/sa/worker"}
OIDC = {"sub": "248289761001", "email": "ci@example.org"}


@pytest.fixture
def ex(make_live_broker: Any, sqlite_url: str, fake: Any, fake_issuer: FakeIssuer) -> Env:
    def adjust(sections: dict[str, dict[str, Any]]) -> None:
        sections["auth"] = {
            **sections.get("auth", {}),
            "issuers": {shape: issuer_settings(fake_issuer, shape)
                        for shape in ("kubernetes", "github-actions", "spiffe", "oidc")},
            "vault_tokens": {"enabled": True},
        }

    return make_env(make_live_broker, sqlite_url, fake, adjust=adjust)


def exchange(broker: Broker, token: str, kind: str = JWT_TYPE, **params: Any) -> httpx.Response:
    if len(token) >= 40:
        # A platform token is a bearer credential: the session's scan checks it appears in no
        # response, log line or audit entry.
        SECRETS.add(token)
    resp: httpx.Response = broker.client.post("/v1/token", data={
        "grant_type": EXCHANGE, "subject_token": token, "subject_token_type": kind, **params})
    return resp


def bound(env: Env, issuer: str, claims: dict[str, str], **body: Any) -> dict[str, Any]:
    tenant = env.broker.create_tenant()
    return env.broker.create_workload(
        tenant["id"], policy=POLICY, bindings=[{"issuer": issuer, "claims": claims}], **body)


def audit(env: Env, action: str) -> list[dict[str, Any]]:
    rows = env.query("SELECT * FROM audit_event WHERE action = :a ORDER BY id", a=action)
    for row in rows:
        if isinstance(row["detail"], str):
            row["detail"] = json.loads(row["detail"])
    return rows


# --- each kind of platform identity -----------------------------------------------------------


@pytest.mark.parametrize(("shape", "rule"), [
    pytest.param("kubernetes", K8S, id="kubernetes"),
    pytest.param("github-actions", GITHUB, id="github-actions"),
    pytest.param("spiffe", SPIFFE, id="spiffe"),
    pytest.param("oidc", OIDC, id="oidc"),
])
def test_a_platform_token_is_exchanged_for_its_bound_workload(
        ex: Env, fake_issuer: FakeIssuer, shape: str, rule: dict[str, str]) -> None:
    workload = bound(ex, shape, rule)
    subject = fake_issuer.mint(shape, alg="ES256" if shape == "spiffe" else "RS256")  # type: ignore[arg-type]
    resp = exchange(ex.broker, subject)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    token = SECRETS.add(body["access_token"])
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == workload["id"] and claims["tenant"] == workload["tenant_id"]
    assert body["budget_micros"] == 100_000 and body["scope"] == "gpt-test"
    call = ex.broker.client.post("/v1/chat/completions", json=CHAT,
                                 headers={"authorization": f"Bearer {token}"})
    assert call.status_code == 200, call.text
    # Audited with the external identity: who it was outside, and which token.
    (entry,) = [e for e in audit(ex, "token.exchange") if e["target"] == claims["jti"]]
    external = jwt.decode(subject, options={"verify_signature": False})
    assert entry["detail"]["iss"] == external["iss"]
    assert entry["detail"]["sub"] == external["sub"]
    assert entry["detail"]["external_jti"] == external.get("jti")
    assert entry["detail"]["workload_id"] == workload["id"]


def test_a_vault_login_is_exchanged_and_its_revocation_ends_the_exchanges(
        ex: Env, approle: AppRole) -> None:
    workload = bound(ex, "vault", {"meta.role_name": approle.role})
    vault_token = approle.login()
    resp = exchange(ex.broker, vault_token, VAULT_TYPE)
    assert resp.status_code == 200, resp.text
    token = SECRETS.add(resp.json()["access_token"])
    assert jwt.decode(token, options={"verify_signature": False})["sub"] == workload["id"]
    approle.root.auth.token.revoke(vault_token)
    assert_oauth_error(exchange(ex.broker, vault_token, VAULT_TYPE), 401, "invalid_client")


# --- attacks, all refused with the body of a wrong secret -------------------------------------


def _attacks(fake: FakeIssuer) -> dict[str, str]:
    rsa_pem = fake.keys["RSA"].public_pem()
    header_none = json.dumps({"alg": "none", "typ": "JWT"})
    return {
        "wrong-issuer": fake.mint("kubernetes", iss="https://evil.example"),
        "issuer-of-another-type": fake.mint("kubernetes", iss=fake.issuer_url("oidc")),
        "wrong-audience": fake.mint("kubernetes", aud=["someone-else"]),
        "expired": fake.mint("kubernetes", exp=1_000_000, iat=999_000, nbf=999_000),
        "nbf-ahead": fake.mint("kubernetes", nbf=2_000_000_000),
        "iat-too-old": fake.mint("kubernetes", iat=1_000_000),
        "alg-none": fake.raw(header_none, json.dumps(fake.claims("kubernetes"))),
        "hs256-with-the-public-key": fake.hmac_forgery("kubernetes", rsa_pem),
        "unknown-kid": fake.mint("kubernetes", kid="nobody-knows"),
        "legacy-kubernetes-secret-token": fake.mint("kubernetes", {
            "kubernetes.io": DROP,
            "kubernetes.io/serviceaccount/namespace": "payments",
            "kubernetes.io/serviceaccount/secret.name": "worker-token-x",
            "kubernetes.io/serviceaccount/service-account.name": "worker"}),
        "multi-aud-svid": fake.mint("spiffe", alg="ES256", aud=[AUDIENCE, "other"]),
        "eddsa-svid": fake.mint("spiffe", alg="EdDSA"),
        "oversized": fake.mint("kubernetes", padding="x" * 9000),
        "jwk-header": fake.mint("kubernetes", headers={"jwk": fake.keys["RSA"].jwk()}),
        "not-a-jwt": "a.b",
        "unbound-subject": fake.mint("kubernetes", {
            "sub": "system:serviceaccount:payments:other",
            "kubernetes.io": {"namespace": "payments",
                              "serviceaccount": {"name": "other", "uid": "u"}}}),
    }


ATTACKS = ["wrong-issuer", "issuer-of-another-type", "wrong-audience", "expired", "nbf-ahead",
           "iat-too-old", "alg-none", "hs256-with-the-public-key", "unknown-kid",
           "legacy-kubernetes-secret-token", "multi-aud-svid", "eddsa-svid", "oversized",
           "jwk-header", "not-a-jwt", "unbound-subject"]


@pytest.mark.parametrize("attack", ATTACKS)
def test_attacks_are_refused_like_a_wrong_secret(ex: Env, fake_issuer: FakeIssuer,
                                                 attack: str) -> None:
    bound(ex, "kubernetes", K8S)
    bound(ex, "spiffe", SPIFFE)
    wrong_secret = ex.broker.client.post("/v1/token", data={
        "grant_type": "client_credentials", "client_id": "nobody", "client_secret": "x"})
    resp = exchange(ex.broker, _attacks(fake_issuer)[attack])
    assert_oauth_error(resp, 401, "invalid_client")
    assert resp.json() == wrong_secret.json()
    assert not audit(ex, "token.exchange")


def test_a_flood_of_unknown_kids_costs_one_fetch(ex: Env, fake_issuer: FakeIssuer) -> None:
    bound(ex, "kubernetes", K8S)
    assert exchange(ex.broker, fake_issuer.mint("kubernetes")).status_code == 200
    before = fake_issuer.fetches
    tokens = [fake_issuer.mint("kubernetes", kid=f"kid-{n}") for n in range(100)]

    async def flood() -> list[int]:
        assert ex.broker.url is not None
        async with httpx.AsyncClient(base_url=ex.broker.url, timeout=30) as client:
            answers = await asyncio.gather(*(client.post("/v1/token", data={
                "grant_type": EXCHANGE, "subject_token": t, "subject_token_type": JWT_TYPE})
                for t in tokens))
        return [a.status_code for a in answers]

    assert set(asyncio.run(flood())) == {401}
    assert fake_issuer.fetches - before <= 1


def test_a_token_matching_two_workloads_is_refused_and_the_clash_is_audited(
        ex: Env, fake_issuer: FakeIssuer) -> None:
    first = bound(ex, "kubernetes", K8S)
    second = bound(ex, "kubernetes", {"sub": "system:serviceaccount:payments:worker"})
    assert_oauth_error(exchange(ex.broker, fake_issuer.mint("kubernetes")), 401, "invalid_client")
    (clash,) = audit(ex, "token.exchange_clash")
    assert clash["detail"]["workloads"] == sorted([first["id"], second["id"]])


def test_a_suspended_workload_gets_nothing(ex: Env, fake_issuer: FakeIssuer) -> None:
    workload = bound(ex, "kubernetes", K8S)
    resp = ex.broker.client.post(f"/v1/admin/workloads/{workload['id']}/suspend",
                                 headers=ex.broker.admin())
    assert resp.status_code == 200, resp.text
    assert_oauth_error(exchange(ex.broker, fake_issuer.mint("kubernetes")), 401, "invalid_client")


def test_the_vault_type_is_refused_while_vault_tokens_are_off(env: Env) -> None:
    assert_oauth_error(exchange(env.broker, "hvs.whatever", VAULT_TYPE), 401, "invalid_client")


@pytest.mark.parametrize(("params", "status", "error"), [
    pytest.param({"subject_token": "t"}, 400, "invalid_request", id="no-subject-token-type"),
    pytest.param({"subject_token_type": JWT_TYPE}, 400, "invalid_request", id="no-subject-token"),
    pytest.param({"subject_token": "t", "subject_token_type": "urn:x:saml"}, 400,
                 "invalid_request", id="unknown-subject-token-type"),
    pytest.param({"subject_token": "t", "subject_token_type": JWT_TYPE, "actor_token": "a",
                  "actor_token_type": "urn:ietf:params:oauth:token-type:access_token"}, 400,
                 "invalid_request", id="actor-outside-delegation"),
    pytest.param({"subject_token": "t", "subject_token_type":
                  "urn:ietf:params:oauth:token-type:access_token", "actor_token": "a",
                  "actor_token_type": JWT_TYPE}, 400, "invalid_request", id="actor-of-wrong-type"),
    pytest.param({"subject_token": "t", "subject_token_type": JWT_TYPE,
                  "requested_token_type": "urn:ietf:params:oauth:token-type:saml2"}, 400,
                 "invalid_request", id="unissuable-token-type"),
    pytest.param({"subject_token": "", "subject_token_type": JWT_TYPE}, 401, "invalid_client",
                 id="empty-subject-token"),
    pytest.param({"subject_token": "t\u0000", "subject_token_type": JWT_TYPE}, 400,
                 "invalid_request", id="nul-in-subject-token"),
    pytest.param({"subject_token": "t\u00e9\u200f", "subject_token_type": JWT_TYPE}, 401,
                 "invalid_client", id="not-a-jwt-at-all"),
])
def test_malformed_exchanges_are_refused(ex: Env, params: dict[str, str], status: int,
                                         error: str) -> None:
    assert_oauth_error(ex.broker.client.post("/v1/token", data={"grant_type": EXCHANGE, **params}),
                       status, error)


def test_an_exchange_takes_no_client_secret(ex: Env, fake_issuer: FakeIssuer) -> None:
    bound(ex, "kubernetes", K8S)
    resp = ex.broker.client.post("/v1/token", auth=("someone", "secret"), data={
        "grant_type": EXCHANGE, "subject_token": fake_issuer.mint("kubernetes"),
        "subject_token_type": JWT_TYPE})
    assert_oauth_error(resp, 400, "invalid_request")


# --- bindings through the admin API -----------------------------------------------------------


def test_bindings_are_created_listed_and_replaced(ex: Env) -> None:
    workload = bound(ex, "kubernetes", K8S)
    assert [b["claims"] for b in workload["bindings"]] == [K8S]
    path = f"/v1/admin/workloads/{workload['id']}"
    patched = ex.broker.client.patch(path, headers=ex.broker.admin(), json={
        "bindings": [{"issuer": "github-actions", "claims": GITHUB},
                     {"issuer": "spiffe", "claims": SPIFFE}]})
    assert patched.status_code == 200, patched.text
    assert [b["issuer"] for b in patched.json()["bindings"]] == ["github-actions", "spiffe"]
    listed = ex.broker.client.get("/v1/admin/workloads", headers=ex.broker.admin(),
                                  params={"tenant_id": workload["tenant_id"]}).json()["data"]
    assert [b["issuer"] for b in listed[0]["bindings"]] == ["github-actions", "spiffe"]
    cleared = ex.broker.client.patch(path, headers=ex.broker.admin(), json={"bindings": []})
    assert cleared.json()["bindings"] == []


@pytest.mark.parametrize(("rule", "status"), [
    pytest.param({"issuer": "kubernetes", "claims": {}}, 422, id="empty-rule"),
    pytest.param({"issuer": "nobody", "claims": {"sub": "x"}}, 422, id="unknown-issuer"),
    pytest.param({"issuer": "kubernetes", "claims": {"aud": "ai-broker"}}, 422, id="pins-nothing"),
    pytest.param({"issuer": "kubernetes", "claims": {"kubernetes.io.namespace": "payments"}}, 422,
                 id="namespace-alone"),
    pytest.param({"issuer": "spiffe", "claims": {"sub": "*"}}, 422, id="wildcard-sub"),
    pytest.param({"issuer": "github-actions", "claims": {"repository": "octo-org/octo-repo"}}, 422,
                 id="github-name-without-workflow"),
    pytest.param({"issuer": "kubernetes", "claims": {"sub": 7}}, 422, id="non-string-value"),
    pytest.param({"issuer": "kubernetes", "claims": {"sub": "x"}, "extra": 1}, 422, id="unknown-field"),
])
def test_bad_bindings_are_refused(ex: Env, rule: dict[str, Any], status: int) -> None:
    tenant = ex.broker.create_tenant()
    resp = ex.broker.client.post("/v1/admin/workloads", headers=ex.broker.admin(), json={
        "tenant_id": tenant["id"], "name": "w", "kind": "agent", "policy": POLICY,
        "bindings": [rule]})
    assert_problem(resp, status)


def test_an_identical_rule_on_another_workload_is_a_conflict(ex: Env) -> None:
    bound(ex, "kubernetes", K8S)
    tenant = ex.broker.create_tenant()
    resp = ex.broker.client.post("/v1/admin/workloads", headers=ex.broker.admin(), json={
        "tenant_id": tenant["id"], "name": "copycat", "kind": "agent", "policy": POLICY,
        "bindings": [{"issuer": "kubernetes", "claims": K8S}]})
    assert_problem(resp, 409)


def test_another_tenants_workload_and_its_bindings_are_out_of_sight(ex: Env) -> None:
    theirs = bound(ex, "kubernetes", K8S)
    mine = ex.broker.create_tenant()
    admin = ex.broker.create_workload(mine["id"], kind="admin", roles=["tenant-admin"])
    token = ex.broker.token(admin["client_id"], admin["client_secret"])
    headers = {"authorization": f"Bearer {token}"}
    path = f"/v1/admin/workloads/{theirs['id']}"
    assert_problem(ex.broker.client.get(path, headers=headers), 404)
    assert_problem(ex.broker.client.patch(path, headers=headers, json={
        "bindings": [{"issuer": "kubernetes", "claims": {"sub": "system:serviceaccount:a:b"}}]}), 404)
    listed = ex.broker.client.get("/v1/admin/workloads", headers=headers).json()["data"]
    assert theirs["id"] not in [w["id"] for w in listed]



def test_bindings_are_listed_in_the_callers_sight(ex: Env) -> None:
    first = bound(ex, "kubernetes", K8S)
    second = bound(ex, "github-actions", GITHUB)
    admin = ex.broker.admin()
    every = ex.broker.client.get("/v1/admin/bindings", headers=admin).json()["data"]
    assert {b["workload_id"] for b in every} >= {first["id"], second["id"]}
    only = ex.broker.client.get("/v1/admin/bindings", headers=admin,
                                params={"issuer": "github-actions"}).json()["data"]
    assert [b["workload_id"] for b in only] == [second["id"]]
    assert only[0]["claims"] == GITHUB and only[0]["tenant_id"] == second["tenant_id"]
    page = ex.broker.client.get("/v1/admin/bindings", headers=admin, params={"limit": 1}).json()
    assert len(page["data"]) == 1 and page["next_cursor"] == page["data"][0]["id"]
    # A tenant-admin sees its own tenant's bindings only.
    tenant_admin = ex.broker.create_workload(first["tenant_id"], kind="admin",
                                             roles=["tenant-admin"])
    token = ex.broker.token(tenant_admin["client_id"], tenant_admin["client_secret"])
    mine = ex.broker.client.get("/v1/admin/bindings",
                                headers={"authorization": f"Bearer {token}"}).json()["data"]
    assert [b["workload_id"] for b in mine] == [first["id"]]
