"""Federation (:mod:`broker.identity.federation`) and the four JWT issuer types, against a real
issuer over HTTP (:mod:`tests.fake_issuer`).

A subject token proves an outside identity only when everything the issuer signed holds: the
issuer routed to by its exact ``iss``, a key from that issuer's own JWKS fitting an algorithm
both the type and the configuration allow, the audience, the time claims, and what the type
itself requires. Everything else is refused with a reason for the log and the caller's 401.
The JWKS endpoint is treated as a network dependency: fetched rarely, never followed through a
redirect, size- and time-bounded, and its cached keys outlive its outages.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from broker.errors import ConfigError, InvalidSubjectToken
from broker.identity.federation import Federation, IssuerUnavailable
from broker.plugin import (
    ExternalIdentity,
    ExternalIssuerSettings,
    IssuerType,
    SubjectVerifier,
)
from broker.settings import Settings
from plugins import auth_github_actions, auth_kubernetes, auth_oidc, auth_spiffe
from tests.fake_issuer import (
    AUDIENCE,
    DROP,
    FakeIssuer,
    Mode,
    Shape,
    SigningKey,
    issuer_settings,
    new_key,
)
from tests.support import Clock

T = TypeVar("T")

PLUGINS: dict[str, IssuerType] = {
    p.issuer_type: p
    for p in (auth_kubernetes.plugin, auth_github_actions.plugin, auth_spiffe.plugin,
              auth_oidc.plugin)
}
SHAPES: tuple[Shape, ...] = ("kubernetes", "github-actions", "spiffe", "oidc")


@pytest.fixture
def fake(fake_issuer: FakeIssuer) -> FakeIssuer:
    """The session's fake issuer (:mod:`tests.fake_issuer`, registered in conftest), reset."""
    return fake_issuer


def settings(issuers: dict[str, dict[str, Any]], **auth: Any) -> Settings:
    return Settings.model_validate({"auth": {"issuers": issuers, **auth}})


def every_type(fake: FakeIssuer, **extra: Any) -> Settings:
    """One issuer of each type, named after it."""
    return settings({shape: issuer_settings(fake, shape, **extra) for shape in SHAPES})


def run(config: Settings, scenario: Callable[[Federation], Awaitable[T]], *,
        clock: Callable[[], float] = time.monotonic,
        plugins: dict[str, IssuerType] | None = None) -> T:
    """Run ``scenario`` with a fresh Federation in its own event loop, as one broker would."""
    async def main() -> T:
        federation = Federation(config, PLUGINS if plugins is None else plugins, clock=clock)
        try:
            return await scenario(federation)
        finally:
            await federation.aclose()
    return asyncio.run(main())


def identify(config: Settings, token: str) -> ExternalIdentity:
    return run(config, lambda f: f.identify_jwt(token))


async def reason(awaitable: Awaitable[object]) -> str:
    """The log reason of a refusal; fails when ``awaitable`` is accepted."""
    with pytest.raises(InvalidSubjectToken) as refused:
        await awaitable
    assert type(refused.value).__name__ in ("InvalidSubjectToken", "UnknownKid")
    return refused.value.reason


def refusal(config: Settings, token: str) -> str:
    return run(config, lambda f: reason(f.identify_jwt(token)))


# --- each kind of issuer ------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256", "PS256"])
def test_a_projected_kubernetes_token_proves_its_service_account(fake: FakeIssuer, alg: str) -> None:
    identity = identify(every_type(fake), fake.mint("kubernetes", alg=alg))
    assert identity.issuer == "kubernetes" and identity.iss == fake.issuer_url("kubernetes")
    assert identity.sub == "system:serviceaccount:payments:worker"
    k8s = identity.claims["kubernetes.io"]
    assert isinstance(k8s, dict) and k8s["namespace"] == "payments"
    assert k8s["serviceaccount"] == {"name": "worker", "uid": fake.service_account_uid}
    assert identity.jti is not None


def test_a_github_actions_token_proves_its_repository(fake: FakeIssuer) -> None:
    identity = identify(every_type(fake), fake.mint("github-actions"))
    assert (identity.issuer, identity.sub) == (
        "github-actions", "repo:octo-org/octo-repo:ref:refs/heads/main")
    assert identity.claims["repository_id"] == "74"
    assert str(identity.claims["job_workflow_ref"]).startswith("octo-org/octo-automation/")


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_a_jwt_svid_proves_its_spiffe_id(fake: FakeIssuer, alg: str) -> None:
    identity = identify(every_type(fake), fake.mint("spiffe", alg=alg))
    assert (identity.issuer, identity.sub) == ("spiffe", "spiffe://example.org/ns/payments/sa/worker")
    assert identity.jti is None


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_an_oidc_id_token_proves_its_subject(fake: FakeIssuer, alg: str) -> None:
    identity = identify(every_type(fake), fake.mint("oidc", alg=alg, aud=["other", AUDIENCE]))
    assert (identity.issuer, identity.sub) == ("oidc", "248289761001")


def test_the_identity_names_the_configured_issuer_not_the_token_url(fake: FakeIssuer) -> None:
    config = settings({"corp-sso": issuer_settings(fake, "oidc", "corp-sso")})
    identity = identify(config, fake.mint("oidc", iss=fake.issuer_url("corp-sso")))
    assert identity.issuer == "corp-sso" and identity.iss == fake.issuer_url("corp-sso")


def test_a_token_without_kid_verifies_when_exactly_one_key_fits(fake: FakeIssuer) -> None:
    assert identify(every_type(fake), fake.mint("oidc", kid=DROP)).sub == "248289761001"


def test_a_token_without_kid_is_refused_when_several_keys_fit(fake: FakeIssuer) -> None:
    fake.state.extra_keys.append(new_key("RSA", "rsa-spare").jwk())
    assert "not exactly one key" in refusal(every_type(fake), fake.mint("oidc", kid=DROP))


def test_keys_a_jwks_holds_but_cannot_use_are_skipped(fake: FakeIssuer) -> None:
    short = json.loads(RSAAlgorithm.to_jwk(
        rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()))
    leaked = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fake.state.extra_keys.extend([
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        {"kty": "EC", "kid": "k1", "crv": "secp256k1", "x": "AA", "y": "AA"},
        {**short, "kid": "short"},
        {**fake.keys["RSA"].jwk(), "kid": "enc", "use": "enc"},
        {**json.loads(RSAAlgorithm.to_jwk(leaked)), "kid": "private"},
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        "not a key",
    ])
    config = every_type(fake)
    assert identify(config, fake.mint("kubernetes")).sub.endswith(":payments:worker")
    for kid in ("hmac", "k1", "short", "enc", "broken"):
        assert refusal(config, fake.mint("oidc", kid=kid)) == "unknown kid", kid
    private = fake.mint("oidc", key=SigningKey("private", "RSA", leaked))
    assert refusal(config, private) == "unknown kid"
    forged = fake.raw('{"alg":"HS256","kid":"hmac"}', json.dumps(fake.claims("oidc")),
                      hmac.new(b"secret", b"x", hashlib.sha256).digest())
    assert refusal(config, forged) == "algorithm not allowed for this issuer"


# --- what is refused ------------------------------------------------------------------------------


def now() -> int:
    """Read when a row runs, not when the table is collected: a long run must not age it."""
    return int(time.time())


Build = Callable[[FakeIssuer], str]


def _public_pem(f: FakeIssuer) -> bytes:
    return f.keys["RSA"].public_pem()


def _legacy(f: FakeIssuer, aud: Any = DROP) -> str:
    """A secret-based token, as a pre-1.24 cluster stored it in a Secret: no audience, no
    pod, never expiring (given an ``exp`` here, so that only its shape is on trial)."""
    return f.mint("kubernetes", {
        "kubernetes.io": DROP,
        "kubernetes.io/serviceaccount/namespace": "payments",
        "kubernetes.io/serviceaccount/secret.name": "worker-token-x7k2p",
        "kubernetes.io/serviceaccount/service-account.name": "worker",
        "kubernetes.io/serviceaccount/service-account.uid": f.service_account_uid,
    }, aud=aud, exp=now() + 600)


def _k8s(f: FakeIssuer, namespace: str = "payments", name: str = "worker",
         uid: object = None) -> dict[str, Any]:
    return {"namespace": namespace,
            "serviceaccount": {"name": name, "uid": f.service_account_uid if uid is None else uid}}


def _duplicate_sub(f: FakeIssuer) -> str:
    claims = json.dumps(f.claims("oidc"))
    return f.sign(claims[:-1] + ', "sub": "someone-else"}')


def _tampered(f: FakeIssuer) -> str:
    head, _payload, signature = f.mint("oidc").split(".")
    other = f.mint("oidc", sub="admin").split(".")[1]
    return ".".join((head, other, signature))


ATTACKS = [
    pytest.param(lambda f: f.mint("oidc", iss=f.url + "/elsewhere"),
                 "no configured issuer", id="unknown-issuer"),
    pytest.param(lambda f: f.mint("oidc", iss=f.issuer_url("oidc") + "/"),
                 "no configured issuer", id="issuer-trailing-slash"),
    pytest.param(lambda f: f.mint("oidc", aud="someone-else"), "wrong audience", id="wrong-audience"),
    pytest.param(lambda f: f.mint("oidc", aud=["a", "b"]), "wrong audience", id="audience-not-in-list"),
    pytest.param(lambda f: f.mint("oidc", aud=DROP), "missing", id="no-audience"),
    pytest.param(lambda f: f.mint("oidc", iat=now() - 900, exp=now() - 60), "expired", id="expired"),
    pytest.param(lambda f: f.mint("oidc", nbf=now() + 300), "not yet valid", id="nbf-ahead"),
    pytest.param(lambda f: f.mint("oidc", iat=now() - 7200, exp=now() + 600), "too long ago",
                 id="iat-too-old"),
    pytest.param(lambda f: f.mint("oidc", iat=now() + 300, exp=now() + 900), "not yet valid",
                 id="iat-in-the-future"),
    pytest.param(lambda f: f.mint("oidc", iat=str(now())), "iat is not a number", id="iat-a-string"),
    pytest.param(lambda f: f.mint("oidc", exp=str(now() + 600)), "exp is not a number",
                 id="exp-a-string"),
    pytest.param(lambda f: f.mint("oidc", exp=DROP), "missing", id="no-exp"),
    pytest.param(lambda f: f.mint("oidc", iat=DROP), "missing", id="no-iat"),
    pytest.param(lambda f: f.mint("oidc", sub=DROP), "missing", id="no-sub"),
    pytest.param(lambda f: f.raw('{"alg":"none","typ":"JWT"}', json.dumps(f.claims("oidc"))),
                 "algorithm not allowed", id="alg-none"),
    pytest.param(lambda f: f.hmac_forgery("oidc", _public_pem(f)), "algorithm not allowed",
                 id="hs256-signed-with-the-public-key-pem"),
    pytest.param(lambda f: f.mint("spiffe", alg="EdDSA"), "algorithm not allowed",
                 id="eddsa-svid"),
    pytest.param(lambda f: f.mint("github-actions", alg="ES256"), "algorithm not allowed",
                 id="es256-for-github"),
    pytest.param(lambda f: f.mint("oidc", alg="RS256", kid=f.keys["EC"].kid), "does not fit",
                 id="rsa-alg-with-the-ec-key"),
    pytest.param(lambda f: f.mint("oidc", alg="ES256", kid=f.keys["RSA"].kid), "does not fit",
                 id="ec-alg-with-the-rsa-key"),
    pytest.param(lambda f: f.mint("oidc", kid="rsa-404"), "unknown kid", id="kid-unknown"),
    pytest.param(lambda f: f.raw('{"alg":"RS256","kid":7}', json.dumps(f.claims("oidc"))),
                 "malformed kid", id="kid-not-a-string"),
    pytest.param(lambda f: f.mint("oidc", key=new_key("RSA", f.keys["RSA"].kid)), "bad signature",
                 id="own-key-with-a-known-kid"),
    pytest.param(_tampered, "bad signature", id="payload-swapped"),
    pytest.param(lambda f: f.mint("oidc", padding="x" * 8192), "too long", id="token-over-8kb"),
    pytest.param(lambda f: "a.b", "three segments", id="two-segments"),
    pytest.param(lambda f: "a.b.c.d", "three segments", id="four-segments"),
    pytest.param(lambda f: "%%%.e30.sig", "malformed", id="bad-base64"),
    pytest.param(lambda f: f.mint("oidc") + "\u00e9", "non-ASCII", id="non-ascii"),
    pytest.param(lambda f: f.raw("[1]", "{}"), "malformed", id="header-not-an-object"),
    pytest.param(_duplicate_sub, "malformed", id="duplicate-claim"),
    pytest.param(lambda f: f.raw('{"alg":"RS256","alg":"none"}', json.dumps(f.claims("oidc"))),
                 "malformed", id="duplicate-header"),
    pytest.param(lambda f: f.mint("oidc", headers={"jku": f.jwks_url}), "forbidden header",
                 id="jku-header"),
    pytest.param(lambda f: f.mint("oidc", headers={"jwk": f.keys["RSA"].jwk()}),
                 "forbidden header", id="jwk-header"),
    pytest.param(lambda f: f.mint("oidc", headers={"x5u": f.url + "/cert"}), "forbidden header",
                 id="x5u-header"),
    pytest.param(lambda f: f.mint("oidc", headers={"x5c": ["MIIB"]}), "forbidden header",
                 id="x5c-header"),
    pytest.param(lambda f: f.mint("oidc", headers={"crit": ["exp"]}), "forbidden header",
                 id="crit-header"),
    pytest.param(lambda f: f.mint("kubernetes", iss="kubernetes/serviceaccount"),
                 "no configured issuer", id="legacy-kubernetes-issuer"),
    pytest.param(_legacy, "missing", id="legacy-kubernetes-token"),
    pytest.param(lambda f: _legacy(f, aud=[AUDIENCE]), "legacy", id="legacy-kubernetes-claims"),
    pytest.param(lambda f: f.mint("kubernetes", {"kubernetes.io": DROP}), "no kubernetes.io",
                 id="kubernetes-without-kubernetes-io"),
    pytest.param(lambda f: f.mint("kubernetes", sub="system:serviceaccount:kube-system:admin"),
                 "does not match", id="kubernetes-sub-mismatch"),
    pytest.param(lambda f: f.mint("kubernetes", {"kubernetes.io": _k8s(f, namespace="kube-system")}),
                 "does not match", id="kubernetes-namespace-mismatch"),
    pytest.param(lambda f: f.mint("kubernetes", {"kubernetes.io": _k8s(f, uid="")}),
                 "service account", id="kubernetes-without-uid"),
    pytest.param(lambda f: f.mint("kubernetes", {"kubernetes.io": _k8s(f, name="a:b")},
                                  sub="system:serviceaccount:payments:a:b"),
                 "service account", id="kubernetes-name-with-colon"),
    pytest.param(lambda f: f.mint("github-actions", repository_id=DROP), "repository_id",
                 id="github-without-repository-id"),
    pytest.param(lambda f: f.mint("github-actions", repository_owner_id=65),
                 "repository_owner_id", id="github-owner-id-not-a-string"),
    pytest.param(lambda f: f.mint("spiffe", aud=[AUDIENCE, "other"]), "exactly one audience",
                 id="multi-aud-svid"),
    *[pytest.param(lambda f, sub=sub: f.mint("spiffe", sub=sub), "SPIFFE ID", id=f"spiffe-id-{name}")
      for name, sub in [
          ("uppercase-domain", "spiffe://Example.org/ns/x"),
          ("dot-dot", "spiffe://example.org/ns/../admin"),
          ("dot", "spiffe://example.org/./ns"),
          ("empty-segment", "spiffe://example.org/ns//x"),
          ("trailing-slash", "spiffe://example.org/ns/x/"),
          ("no-path", "spiffe://example.org"),
          ("port", "spiffe://example.org:443/ns/x"),
          ("userinfo", "spiffe://user@example.org/ns/x"),
          ("query", "spiffe://example.org/ns/x?admin=1"),
          ("fragment", "spiffe://example.org/ns/x#y"),
          ("percent", "spiffe://example.org/ns/%2e%2e"),
          ("scheme", "https://example.org/ns/x"),
      ]],
]


@pytest.mark.parametrize(("build", "why"), ATTACKS)
def test_attack_is_refused(fake: FakeIssuer, build: Build, why: str) -> None:
    token = build(fake)
    assert why in refusal(every_type(fake), token)


def test_a_refusal_reason_holds_no_claim_value(fake: FakeIssuer) -> None:
    why = refusal(every_type(fake), fake.mint("kubernetes", sub="system:serviceaccount:x:secret-name"))
    assert "secret-name" not in why and "payments" not in why


def test_the_issuer_configuration_narrows_the_algorithms(fake: FakeIssuer) -> None:
    config = settings({"oidc": issuer_settings(fake, "oidc", algorithms=["ES256"])})
    assert "algorithm not allowed" in refusal(config, fake.mint("oidc", alg="RS256"))
    assert identify(config, fake.mint("oidc", alg="ES256")).sub == "248289761001"


def test_an_unknown_issuer_costs_no_fetch(fake: FakeIssuer) -> None:
    refusal(every_type(fake), fake.mint("oidc", iss="https://attacker.example"))
    assert fake.fetches == 0


# --- the key cache --------------------------------------------------------------------------------


def test_a_flood_of_unknown_kids_costs_at_most_one_fetch(fake: FakeIssuer) -> None:
    clock = Clock()
    config = every_type(fake, refetch_s=60)

    async def flood(federation: Federation) -> tuple[int, int]:
        async def wave() -> None:
            tokens = [fake.mint("oidc", kid=f"forged-{i}") for i in range(200)]
            reasons = await asyncio.gather(*(reason(federation.identify_jwt(t)) for t in tokens))
            assert set(reasons) == {"unknown kid"}

        await wave()  # a cold cache: the first fetch is shared by all 200
        cold = federation.fetch_count("oidc")
        clock.advance(60)
        await wave()  # refetch_s has passed: one refetch, shared again
        return cold, federation.fetch_count("oidc")

    assert run(config, flood, clock=clock) == (1, 2)
    assert fake.fetches == 2


def test_a_rotated_key_is_picked_up_once_refetch_s_has_passed(fake: FakeIssuer) -> None:
    clock = Clock()
    config = every_type(fake, refetch_s=30)

    async def rotate(federation: Federation) -> None:
        await federation.identify_jwt(fake.mint("oidc"))
        fake.rotate("RSA")
        new = fake.mint("oidc")
        assert await reason(federation.identify_jwt(new)) == "unknown kid"
        clock.advance(29)
        assert await reason(federation.identify_jwt(new)) == "unknown kid"
        assert federation.fetch_count("oidc") == 1
        clock.advance(1)
        assert (await federation.identify_jwt(new)).sub == "248289761001"
        assert federation.fetch_count("oidc") == 2

    run(config, rotate, clock=clock)


def test_the_jwks_is_refetched_when_older_than_its_max_age(fake: FakeIssuer) -> None:
    clock = Clock()
    config = every_type(fake, jwks_max_age_s=300)

    async def age(federation: Federation) -> None:
        token = fake.mint("oidc")
        await federation.identify_jwt(token)
        clock.advance(300)
        await federation.identify_jwt(token)
        assert federation.fetch_count("oidc") == 1
        clock.advance(1)
        await federation.identify_jwt(token)
        assert federation.fetch_count("oidc") == 2

    run(config, age, clock=clock)


def test_cached_keys_keep_serving_while_the_jwks_endpoint_is_down(fake: FakeIssuer) -> None:
    clock = Clock()
    config = every_type(fake, jwks_max_age_s=300, refetch_s=60)

    async def outage(federation: Federation) -> None:
        await federation.identify_jwt(fake.mint("oidc"))
        fake.state.mode = "down"
        clock.advance(301)
        assert (await federation.identify_jwt(fake.mint("oidc"))).sub == "248289761001"
        assert federation.fetch_count("oidc") == 2
        # The failed refresh counts against refetch_s: the outage is not hammered.
        await federation.identify_jwt(fake.mint("oidc"))
        assert await reason(federation.identify_jwt(fake.mint("oidc", kid="new"))) == "unknown kid"
        assert federation.fetch_count("oidc") == 2

    run(config, outage, clock=clock)


@pytest.mark.parametrize("mode", ["down", "not-json", "redirect", "oversized", "oversized-stream"])
def test_without_any_key_set_a_failed_fetch_refuses_with_401(fake: FakeIssuer, mode: Any) -> None:
    fake.state.mode = mode
    config = every_type(fake, jwks_max_bytes=65_536)
    assert refusal(config, fake.mint("oidc")) == "jwks unavailable"


def test_a_redirecting_jwks_url_is_not_followed(fake: FakeIssuer) -> None:
    fake.state.mode = "redirect"
    assert refusal(every_type(fake), fake.mint("oidc")) == "jwks unavailable"
    assert fake.fetches == 1 and fake.state.redirect_target_hits == 0


def test_a_jwks_beyond_its_size_limit_is_refused(fake: FakeIssuer) -> None:
    config = every_type(fake, jwks_max_bytes=4096)
    token = fake.mint("oidc")
    assert identify(config, token).sub == "248289761001"
    modes: tuple[Mode, ...] = ("oversized", "oversized-stream")
    for mode in modes:
        fake.state.mode = mode
        assert refusal(config, token) == "jwks unavailable"


def test_a_slow_jwks_times_out_instead_of_hanging(fake: FakeIssuer) -> None:
    fake.state.mode, fake.state.slow_s = "slow", 5.0
    config = every_type(fake, fetch_timeout_s=0.3)
    started = time.monotonic()
    assert refusal(config, fake.mint("oidc")) == "jwks unavailable"
    assert time.monotonic() - started < 2.5


def test_a_jwks_file_is_read_and_reread_when_it_changes(fake: FakeIssuer, tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(fake.jwks()))
    table = issuer_settings(fake, "kubernetes", jwks_url=None, jwks_file=str(path))
    config = settings({"kubernetes": table})

    async def scenario(federation: Federation) -> None:
        await federation.identify_jwt(fake.mint("kubernetes"))
        await federation.identify_jwt(fake.mint("kubernetes", alg="ES256"))
        assert federation.fetch_count("kubernetes") == 1
        fake.rotate("RSA")
        rotated = fake.mint("kubernetes")
        assert await reason(federation.identify_jwt(rotated)) == "unknown kid"
        path.write_text(json.dumps(fake.jwks()))
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
        await federation.identify_jwt(rotated)
        assert federation.fetch_count("kubernetes") == 2

    run(config, scenario)
    assert fake.fetches == 0


def test_a_missing_jwks_file_is_refused(fake: FakeIssuer, tmp_path: Path) -> None:
    table = issuer_settings(fake, "oidc", jwks_url=None, jwks_file=str(tmp_path / "absent.json"))
    assert refusal(settings({"oidc": table}), fake.mint("oidc")) == "jwks unavailable"


def test_a_jwks_file_over_its_size_limit_is_refused(fake: FakeIssuer, tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({**fake.jwks(), "padding": "x" * 5000}))
    table = issuer_settings(fake, "oidc", jwks_url=None, jwks_file=str(path), jwks_max_bytes=4096)
    assert refusal(settings({"oidc": table}), fake.mint("oidc")) == "jwks unavailable"


def test_each_issuer_verifies_only_with_its_own_keys(fake: FakeIssuer, tmp_path: Path) -> None:
    """An issuer whose JWKS does not hold the key refuses, though another issuer's does."""
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"keys": [new_key("RSA", fake.keys["RSA"].kid).jwk()]}))
    config = settings({
        "oidc": issuer_settings(fake, "oidc"),
        "partner": issuer_settings(fake, "oidc", "partner", jwks_url=None, jwks_file=str(path)),
    })
    assert refusal(config, fake.mint("oidc", iss=fake.issuer_url("partner"))) == "bad signature"


# --- Kubernetes TokenReview -----------------------------------------------------------------------


def _tokenreview(fake: FakeIssuer, tmp_path: Path) -> Settings:
    credential = tmp_path / "token"
    credential.write_text("broker-sa-token\n")
    return settings({"kubernetes": issuer_settings(
        fake, "kubernetes", tokenreview=True, tokenreview_url=fake.url + "/",
        tokenreview_token_file=str(credential))})


def test_tokenreview_asks_the_api_server_with_the_brokers_own_token(
        fake: FakeIssuer, tmp_path: Path) -> None:
    token = fake.mint("kubernetes")
    assert identify(_tokenreview(fake, tmp_path), token).sub.endswith(":payments:worker")
    [(authorization, review)] = fake.state.tokenreviews
    assert authorization == "Bearer broker-sa-token"
    assert review["kind"] == "TokenReview"
    assert review["spec"] == {"token": token, "audiences": [AUDIENCE]}


@pytest.mark.parametrize(("change", "why"), [
    pytest.param({"tokenreview_authenticated": False}, "not authenticated", id="invalidated"),
    pytest.param({"tokenreview_audiences": ["kube-apiserver"]}, "audience", id="other-audience"),
    pytest.param({"tokenreview_status": 403}, "answered 403", id="forbidden"),
])
def test_tokenreview_refuses_what_the_api_server_does_not_vouch_for(
        fake: FakeIssuer, tmp_path: Path, change: dict[str, Any], why: str) -> None:
    for key, value in change.items():
        setattr(fake.state, key, value)
    assert why in refusal(_tokenreview(fake, tmp_path), fake.mint("kubernetes"))


def test_tokenreview_is_not_asked_about_a_token_that_failed_verification(
        fake: FakeIssuer, tmp_path: Path) -> None:
    refusal(_tokenreview(fake, tmp_path), fake.mint("kubernetes", aud="other"))
    assert fake.state.tokenreviews == []


@pytest.mark.parametrize("failure", ["unreachable", "status-500"])
def test_a_failing_api_server_is_unavailable_not_a_refusal(
        fake: FakeIssuer, tmp_path: Path, failure: str) -> None:
    from tests.fake_provider import free_port

    table = _tokenreview(fake, tmp_path).auth.issuers["kubernetes"].model_dump()
    if failure == "unreachable":
        table["tokenreview_url"] = f"http://127.0.0.1:{free_port()}"
    else:
        fake.state.tokenreview_status = 500
    token = fake.mint("kubernetes")

    async def scenario(federation: Federation) -> None:
        with pytest.raises(IssuerUnavailable):
            await federation.identify_jwt(token)

    run(settings({"kubernetes": table}), scenario)


def test_an_issuer_api_redirect_is_not_followed(fake: FakeIssuer, tmp_path: Path) -> None:
    fake.state.tokenreview_status = 307
    assert refusal(_tokenreview(fake, tmp_path), fake.mint("kubernetes")) == (
        "the issuer API answered 307")
    assert len(fake.state.tokenreviews) == 1 and fake.state.redirect_target_hits == 0


# --- what the broker holds plugins to -------------------------------------------------------------


class _Impostor:
    """Verifies the token properly, then claims another issuer and another subject."""

    issuer_type = "oidc"
    algorithms: tuple[str, ...] = ("RS256",)
    pinning: tuple[tuple[str, ...], ...] = ()

    def __init__(self, sub: str | None = None, verify: bool = True) -> None:
        self.sub, self.verify_first = sub, verify

    async def verify(self, token: str, issuer: ExternalIssuerSettings | None,
                     ctx: SubjectVerifier) -> ExternalIdentity:
        assert issuer is not None
        claims = await ctx.verify_jwt(token, issuer, self.algorithms) if self.verify_first else {}
        sub = self.sub or str(claims["sub"])
        return ExternalIdentity(issuer="kubernetes", iss="https://elsewhere", sub=sub, jti=None,
                                claims=claims)


def test_a_plugin_cannot_name_another_issuer(fake: FakeIssuer) -> None:
    identity = run(every_type(fake), lambda f: f.identify_jwt(fake.mint("oidc")),
                   plugins={**PLUGINS, "oidc": _Impostor()})
    assert (identity.issuer, identity.iss) == ("oidc", fake.issuer_url("oidc"))


@pytest.mark.parametrize("impostor", [
    pytest.param(_Impostor(sub="system:admin"), id="another-subject"),
    pytest.param(_Impostor(sub="248289761001", verify=False), id="unverified"),
])
def test_a_plugin_answer_must_rest_on_what_the_broker_verified(
        fake: FakeIssuer, impostor: _Impostor) -> None:
    why = run(every_type(fake), lambda f: reason(f.identify_jwt(fake.mint("oidc"))),
              plugins={**PLUGINS, "oidc": impostor})
    assert "rests on no verified token" in why


# --- Vault tokens ---------------------------------------------------------------------------------


class _VaultType:
    issuer_type = "vault"
    algorithms: tuple[str, ...] = ()
    pinning: tuple[tuple[str, ...], ...] = (("meta.role_name",), ("entity_id",))

    def __init__(self, lookup: bool = True) -> None:
        self.lookup = lookup

    async def verify(self, token: str, issuer: ExternalIssuerSettings | None,
                     ctx: SubjectVerifier) -> ExternalIdentity:
        data = await ctx.vault_lookup_self(token) if self.lookup else {"entity_id": "e-1"}
        return ExternalIdentity(issuer="other", iss="vault", sub=str(data["entity_id"]),
                                jti=None, claims=data)


def test_vault_tokens_are_looked_up_at_the_brokers_vault(
        fake: FakeIssuer, monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.identity import federation

    seen: list[tuple[str, str]] = []

    def lookup_self(vault: Any, token: str) -> dict[str, object]:
        seen.append((vault.addr, token))
        return {"entity_id": "e-1", "meta": {"role_name": "ci"}}

    monkeypatch.setattr(federation, "lookup_self", lookup_self)
    config = settings({}, vault_tokens={"enabled": True})
    identity = run(config, lambda f: f.identify_vault("hvs.CAESIabc"),
                   plugins={**PLUGINS, "vault": _VaultType()})
    assert (identity.issuer, identity.sub) == ("vault", "e-1")
    assert seen == [(config.vault.addr, "hvs.CAESIabc")]


@pytest.mark.parametrize(("config", "token", "plugin", "why"), [
    pytest.param({}, "hvs.x", _VaultType(), "not accepted", id="disabled"),
    pytest.param({"enabled": True}, "hvs.x" * 2000, _VaultType(), "too long", id="over-8kb"),
    pytest.param({"enabled": True}, "hvs.\nx", _VaultType(), "unprintable", id="newline"),
    pytest.param({"enabled": True}, "hvs.x", _VaultType(lookup=False), "no lookup", id="no-lookup"),
])
def test_vault_tokens_refused(config: dict[str, Any], token: str, plugin: _VaultType,
                              why: str) -> None:
    found = run(settings({}, vault_tokens=config), lambda f: reason(f.identify_vault(token)),
                plugins={**PLUGINS, "vault": plugin})
    assert why in found


# --- configuration --------------------------------------------------------------------------------


def test_an_issuer_type_without_its_plugin_stops_the_start(fake: FakeIssuer) -> None:
    config = settings({"ci": issuer_settings(fake, "github-actions", "ci")})
    with pytest.raises(ConfigError) as error:
        Federation(config, {"oidc": auth_oidc.plugin})
    assert str(error.value) == ("invalid configuration: auth.issuers.ci.type: "
                                "no auth method plugin 'github-actions' is installed")


def test_two_issuers_with_the_same_iss_stop_the_start(fake: FakeIssuer) -> None:
    table = issuer_settings(fake, "oidc")
    with pytest.raises(ConfigError, match=r"auth\.issuers\.b\.issuer: the same issuer as auth\.issuers\.a"):
        Federation(settings({"a": table, "b": {**table, "type": "spiffe"}}), PLUGINS)


def test_vault_tokens_without_the_vault_plugin_stop_the_start() -> None:
    with pytest.raises(ConfigError, match=r"auth\.vault_tokens\.enabled"):
        Federation(settings({}, vault_tokens={"enabled": True}), PLUGINS)


def test_algorithms_the_type_does_not_allow_stop_the_start(fake: FakeIssuer) -> None:
    config = settings({"spiffe": issuer_settings(fake, "spiffe", algorithms=["EdDSA"])})
    with pytest.raises(ConfigError, match=r"auth\.issuers\.spiffe\.algorithms"):
        Federation(config, PLUGINS)


def test_every_issuer_type_plugin_implements_the_contract() -> None:
    for name, plugin in PLUGINS.items():
        assert isinstance(plugin, IssuerType) and plugin.issuer_type == name
        assert "none" not in plugin.algorithms
        assert not any(alg.startswith("HS") for alg in plugin.algorithms)
