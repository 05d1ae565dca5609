"""The plugins' admin clients (:mod:`broker.credentials.contract`) against the strict fakes over
real HTTP: OpenAI and OpenRouter rotate keys, Anthropic reports key status, OpenAI holds a
project's spend limit, and OpenAI and Anthropic exchange the broker's assertion for a token.

What every client owes the broker: a key already gone counts as deleted, a rotation whose
answer was lost finds its key again by name (no key is left behind), and no error names a key,
an admin key or a token, only the step and the HTTP status.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

from broker.errors import ConfigError
from broker.plugin import (
    Federated,
    FederationTarget,
    KeyAdmin,
    KeyRef,
    KeyWatch,
    ProviderAdminError,
    ProviderConfig,
    SpendLimiter,
)
from plugins import mock_provider_admin, provider_admin_http
from plugins.mock_federation import AnthropicFederationRule, OpenAIIdentityProvider
from plugins.mock_provider_admin import OPENAI_PROJECT, AdminFault
from plugins.provider_admin_http import AdminHttp, read_token
from plugins.provider_anthropic import FEDERATION_BETA, OAUTH_BETA, AnthropicProvider
from plugins.provider_openai import OpenAIProvider
from plugins.provider_openrouter import OpenRouterProvider
from tests.fake_issuer import FakeIssuer, SigningKey, new_key
from tests.fake_provider import FakeProviderServer, free_port

AUDIENCE = "https://provider.example/federation"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def config(plugin: str, base: str, credential: str = "static", **more: Any) -> ProviderConfig:
    return ProviderConfig(name=plugin, plugin=plugin, base_url=base, timeout_s=5.0,
                          has_key=credential != "federated", credential=credential,
                          project_id=more.get("project_id", OPENAI_PROJECT))


def openai(fake: FakeProviderServer, **more: Any) -> OpenAIProvider:
    return OpenAIProvider(config("openai", f"{fake.url}/v1", **more))


def openrouter(fake: FakeProviderServer) -> OpenRouterProvider:
    return OpenRouterProvider(config("openrouter", f"{fake.url}/api/v1"))


def anthropic(fake: FakeProviderServer, credential: str = "static") -> AnthropicProvider:
    return AnthropicProvider(config("anthropic", fake.url, credential))


def admin_error(call: Any, *secrets: str) -> str:
    """The message of the ProviderAdminError ``call`` raises, which names none of ``secrets``."""
    with pytest.raises(ProviderAdminError) as raised:
        call()
    message = str(raised.value)
    assert not any(secret in message for secret in secrets), message
    return message


@pytest.fixture
def http(fake: FakeProviderServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url) as client:
        yield client


def test_each_plugin_has_the_capabilities_its_provider_offers(fake: FakeProviderServer) -> None:
    assert all(isinstance(openai(fake), kind) for kind in (KeyAdmin, SpendLimiter, Federated))
    assert isinstance(openrouter(fake), KeyAdmin) and not isinstance(openrouter(fake), Federated)
    watched = anthropic(fake)
    assert isinstance(watched, KeyWatch) and isinstance(watched, Federated)
    assert not isinstance(watched, KeyAdmin)


def test_a_federated_provider_needs_no_key_but_a_static_one_does(fake: FakeProviderServer) -> None:
    assert openai(fake, credential="federated").config.has_key is False
    assert anthropic(fake, "federated").config.has_key is False
    unkeyed = ProviderConfig(name="p", plugin="openai", base_url=None, timeout_s=5.0,
                             has_key=False)
    with pytest.raises(ConfigError, match="vault_path"):
        OpenAIProvider(unkeyed)
    with pytest.raises(ConfigError, match="vault_path"):
        AnthropicProvider(unkeyed)


def test_admin_calls_wait_at_most_thirty_seconds() -> None:
    assert AdminHttp("openai", 120.0).timeout_s == 30.0
    assert AdminHttp("openai", 2.5).timeout_s == 2.5


# --- OpenAI: rotation through service accounts ----------------------------------------------


def test_openai_create_key_makes_a_service_account_whose_key_works(
    fake: FakeProviderServer,
) -> None:
    provider = openai(fake)
    minted = provider.create_key(fake.state.admin_key, "broker-rotation-1")
    account = fake.state.service_accounts[str(minted.account_id)]
    assert account.name == "broker-rotation-1" and account.key_id == minted.key_id
    assert minted.key.startswith("sk-svcacct-") and minted.key not in repr(minted)
    assert fake.state.live_admin_keys() == {minted.key_id: minted.key}
    assert provider.check_key(minted.key) is True
    assert provider.check_key("sk-svcacct-unknown") is False


def test_openai_deletes_a_key_with_its_service_account_and_a_key_already_gone_is_done(
    fake: FakeProviderServer,
) -> None:
    provider, admin = openai(fake), fake.state.admin_key
    minted = provider.create_key(admin, "r1")
    ref = KeyRef("r1", minted.key_id, minted.account_id)
    provider.delete_key(admin, ref)
    assert fake.state.live_admin_keys() == {} and provider.check_key(minted.key) is False
    provider.delete_key(admin, ref)  # 404: done
    # The key is never deleted on its own: OpenAI refuses that for a service account's key.
    assert fake.state.admin_log == ["openai.create_service_account",
                                    "openai.delete_service_account",
                                    "openai.delete_service_account"]


def test_openai_deletes_a_key_known_only_by_its_id_through_its_owner(
    fake: FakeProviderServer,
) -> None:
    provider, admin = openai(fake), fake.state.admin_key
    minted = provider.create_key(admin, "r1")
    provider.delete_key(admin, KeyRef("r1", key_id=minted.key_id))
    assert fake.state.service_accounts == {} and fake.state.live_admin_keys() == {}
    # An operator's own (user) key is deleted directly; one already gone is done.
    user_key = fake.state.add_openai_user_key("sk-proj-operator-first-key")
    provider.delete_key(admin, KeyRef("initial", key_id=user_key))
    assert fake.state.openai_keys == {}
    provider.delete_key(admin, KeyRef("initial", key_id=user_key))


def test_openai_finds_keys_by_name_across_pages(
    fake: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provider_admin_http, "PAGE_LIMIT", 2)
    provider, admin = openai(fake), fake.state.admin_key
    made = [provider.create_key(admin, name) for name in ("a", "lost", "b", "c", "lost")]
    fake.state.admin_log.clear()
    found = provider.find_keys(admin, "lost")
    assert [ref.account_id for ref in found] == [made[1].account_id, made[4].account_id]
    assert all(ref.name == "lost" and ref.key_id is None for ref in found)
    assert fake.state.admin_log == ["openai.list_service_accounts"] * 3
    assert provider.find_keys(admin, "never") == []


def test_an_openai_rotation_whose_answer_was_lost_leaves_no_key_behind(
    fake: FakeProviderServer,
) -> None:
    provider, admin = openai(fake), fake.state.admin_key
    fake.state.admin_faults["openai.create_service_account"] = AdminFault(500, after=True)
    message = admin_error(lambda: provider.create_key(admin, "rotation-7"), admin)
    assert message == "openai: creating a service account failed: HTTP 500"
    (live,) = fake.state.live_admin_keys().values()
    assert live not in message
    provider.delete_key(admin, KeyRef("rotation-7"))  # by its name alone
    assert fake.state.live_admin_keys() == {}


@pytest.mark.parametrize(("op", "call", "step"), [
    ("openai.create_service_account", "create", "creating a service account"),
    ("openai.delete_service_account", "delete", "deleting a service account"),
    ("openai.list_service_accounts", "find", "listing service accounts"),
    ("openai.get_api_key", "delete-by-id", "reading an API key"),
    ("check", "check", "checking a key"),
])
def test_openai_admin_errors_name_the_step_and_status_never_a_key(
    fake: FakeProviderServer, op: str, call: str, step: str
) -> None:
    provider, admin = openai(fake), fake.state.admin_key
    minted = provider.create_key(admin, "r1")
    calls = {
        "create": lambda: provider.create_key(admin, "r2"),
        "delete": lambda: provider.delete_key(admin, KeyRef("r1", minted.key_id, minted.account_id)),
        "find": lambda: provider.find_keys(admin, "r1"),
        "delete-by-id": lambda: provider.delete_key(admin, KeyRef("r1", key_id=minted.key_id)),
        "check": lambda: provider.check_key(minted.key),
    }
    fake.state.admin_faults[op] = AdminFault(503)
    assert admin_error(calls[call], admin, minted.key) == f"openai: {step} failed: HTTP 503"


def test_openai_refusals_of_the_admin_call_itself_are_errors(fake: FakeProviderServer) -> None:
    wrong = "sk-admin-wrong-key-0123456789"
    message = admin_error(lambda: openai(fake).create_key(wrong, "r1"), wrong)
    assert message == "openai: creating a service account failed: HTTP 401"
    other = openai(fake, project_id="proj_other")
    assert admin_error(lambda: other.create_key(fake.state.admin_key, "r1")).endswith("HTTP 404")
    with pytest.raises(ConfigError, match="project_id"):
        openai(fake, project_id=None).create_key(fake.state.admin_key, "r1")


def test_an_unreachable_provider_is_named_by_the_errors_type() -> None:
    provider = OpenAIProvider(config("openai", f"http://127.0.0.1:{free_port()}/v1"))
    key = "sk-svcacct-never-shown"
    assert admin_error(lambda: provider.check_key(key), key) == \
        "openai: checking a key failed: ConnectError"


# --- OpenAI: the project's spend limit --------------------------------------------------------


def test_openai_spend_limit_is_set_in_cents_rounded_up(fake: FakeProviderServer) -> None:
    provider, admin = openai(fake), fake.state.admin_key
    assert provider.spend_limit(admin, OPENAI_PROJECT) is None
    provider.set_spend_limit(admin, OPENAI_PROJECT, 1_000_001)
    assert fake.state.spend_limits == {OPENAI_PROJECT: 101}
    assert provider.spend_limit(admin, OPENAI_PROJECT) == 1_010_000
    provider.set_spend_limit(admin, OPENAI_PROJECT, 2_000_000)
    assert provider.spend_limit(admin, OPENAI_PROJECT) == 2_000_000
    fake.state.admin_faults["openai.spend_limit"] = AdminFault(500, times=2)
    assert admin_error(lambda: provider.spend_limit(admin, OPENAI_PROJECT), admin) == \
        "openai: reading the project's spend limit failed: HTTP 500"
    assert admin_error(lambda: provider.set_spend_limit(admin, OPENAI_PROJECT, 5), admin) == \
        "openai: setting the project's spend limit failed: HTTP 500"
    # OpenAI answers 404 both for a project without a limit and for no such project: a
    # wrong project reads as "no limit", and fails when the limit is set.
    assert provider.spend_limit(admin, "proj_other") is None
    assert admin_error(lambda: provider.set_spend_limit(admin, "proj_other", 5)).endswith("404")


# --- OpenRouter: rotation through the management API ------------------------------------------


def test_openrouter_creates_checks_and_deletes_keys(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    provider, admin = openrouter(fake), fake.state.admin_key
    minted = provider.create_key(admin, "r1")
    assert fake.state.router_keys[minted.key_id].name == "r1" and minted.account_id is None
    assert provider.check_key(minted.key) is True
    assert http.post("/api/v1/chat/completions", json=CHAT,
                     headers={"authorization": f"Bearer {minted.key}"}).status_code == 200
    provider.delete_key(admin, KeyRef("r1", minted.key_id))
    assert provider.check_key(minted.key) is False and fake.state.live_admin_keys() == {}
    provider.delete_key(admin, KeyRef("r1", minted.key_id))  # 404: done


def test_openrouter_finds_keys_by_name_across_pages_disabled_ones_too(
    fake: FakeProviderServer, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mock_provider_admin, "ROUTER_PAGE", 2)
    provider, admin = openrouter(fake), fake.state.admin_key
    made = [provider.create_key(admin, name) for name in ("lost", "a", "b", "lost", "c")]
    http.patch(f"/api/v1/keys/{made[0].key_id}", json={"disabled": True},
               headers={"authorization": f"Bearer {admin}"})
    fake.state.admin_log.clear()
    found = provider.find_keys(admin, "lost")
    assert [ref.key_id for ref in found] == [made[0].key_id, made[3].key_id]
    assert fake.state.admin_log == ["openrouter.list_keys"] * 4  # 2 + 2 + 1, then an empty page


def test_an_openrouter_rotation_whose_answer_was_lost_leaves_no_key_behind(
    fake: FakeProviderServer,
) -> None:
    provider, admin = openrouter(fake), fake.state.admin_key
    fake.state.admin_faults["openrouter.create_key"] = AdminFault(502, after=True)
    assert admin_error(lambda: provider.create_key(admin, "r9"), admin) == \
        "openrouter: creating a key failed: HTTP 502"
    assert len(fake.state.live_admin_keys()) == 1
    provider.delete_key(admin, KeyRef("r9"))
    assert fake.state.live_admin_keys() == {}


def test_openrouter_admin_errors_name_the_step_and_status(fake: FakeProviderServer) -> None:
    provider, admin = openrouter(fake), fake.state.admin_key
    minted = provider.create_key(admin, "r1")
    wrong = "sk-or-v1-wrong-management-key"
    assert admin_error(lambda: provider.find_keys(wrong, "r1"), wrong) == \
        "openrouter: listing keys failed: HTTP 401"
    fake.state.admin_faults["openrouter.delete_key"] = AdminFault(500)
    assert admin_error(lambda: provider.delete_key(admin, KeyRef("r1", minted.key_id)),
                       admin, minted.key) == "openrouter: deleting a key failed: HTTP 500"
    fake.state.admin_faults["check"] = AdminFault(500)
    assert admin_error(lambda: provider.check_key(minted.key), minted.key) == \
        "openrouter: checking a key failed: HTTP 500"


# --- Anthropic: watched keys ------------------------------------------------------------------


def ant_key(n: int, start: str = "sk-ant-api03-") -> str:
    return f"{start}{n:03d}-{'x' * 60}-{n:04d}"


def test_anthropic_reports_a_key_by_its_id(fake: FakeProviderServer) -> None:
    key_id = fake.state.add_anthropic_key(ant_key(1), expires_at=1_900_000_000.5, name="prod")
    status = anthropic(fake).key_status(fake.state.admin_key, ant_key(1), key_id)
    assert status is not None
    assert (status.key_id, status.status, status.expires_at, status.name) == (
        key_id, "active", 1_900_000_000, "prod")
    assert anthropic(fake).key_status(fake.state.admin_key, ant_key(1), "apikey_gone") is None


def test_anthropic_finds_a_key_without_its_id_by_its_hint_across_pages(
    fake: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provider_admin_http, "PAGE_LIMIT", 2)
    ids = [fake.state.add_anthropic_key(ant_key(n)) for n in range(5)]
    status = anthropic(fake).key_status(fake.state.admin_key, ant_key(3), None)
    assert status is not None and (status.key_id, status.expires_at) == (ids[3], None)
    assert anthropic(fake).key_status(fake.state.admin_key, ant_key(9), None) is None
    assert fake.state.admin_log.count("anthropic.list_keys") == 3 + 3


@pytest.mark.parametrize("change", ["inactive", "archived", "expired"])
def test_anthropic_reports_a_retired_key(fake: FakeProviderServer, change: str) -> None:
    key_id = fake.state.add_anthropic_key(ant_key(1), expires_at=10_000.0)
    if change == "expired":
        fake.state.clock = 10_000.0
    else:
        fake.state.anthropic_keys[key_id].status = change
    for known in (key_id, None):
        status = anthropic(fake).key_status(fake.state.admin_key, ant_key(1), known)
        assert status is not None and status.status == change


def test_anthropic_keys_that_share_a_hint_resolve_to_the_active_one_or_fail(
    fake: FakeProviderServer,
) -> None:
    # Same first 16 and last 4 characters: the same hint.
    old = fake.state.add_anthropic_key("sk-ant-api03-AAA-old-one-ZZZZ", status="archived")
    new = fake.state.add_anthropic_key("sk-ant-api03-AAA-new-one-ZZZZ")
    status = anthropic(fake).key_status(fake.state.admin_key, "sk-ant-api03-AAA-new-one-ZZZZ", None)
    assert status is not None and status.key_id == new and old != new
    fake.state.anthropic_keys[old].status = "active"
    message = admin_error(lambda: anthropic(fake).key_status(
        fake.state.admin_key, "sk-ant-api03-AAA-new-one-ZZZZ", None), "sk-ant-api03-AAA")
    assert message == "anthropic: listing API keys failed: 2 keys have the key's hint; " \
        "configure its key_id"


def test_anthropic_admin_errors_name_the_step_and_status(fake: FakeProviderServer) -> None:
    key_id = fake.state.add_anthropic_key(ant_key(1))
    wrong = "sk-ant-admin01-wrong"
    assert admin_error(lambda: anthropic(fake).key_status(wrong, ant_key(1), key_id),
                       wrong, ant_key(1)) == "anthropic: reading an API key failed: HTTP 401"
    fake.state.admin_faults["anthropic.list_keys"] = AdminFault(529)
    assert admin_error(lambda: anthropic(fake).key_status(fake.state.admin_key, ant_key(1), None),
                       fake.state.admin_key) == "anthropic: listing API keys failed: HTTP 529"


# --- federation -------------------------------------------------------------------------------


def assertion(key: SigningKey, issuer: str, alg: str = "RS256") -> str:
    now = int(time.time())
    claims = {"iss": issuer, "aud": AUDIENCE, "sub": "provider:p", "iat": now, "exp": now + 120,
              "jti": str(uuid.uuid4())}
    return jwt.encode(claims, key.private, algorithm=alg, headers={"kid": key.kid})


def send(request: Any) -> httpx.Response:
    return httpx.post(request.url, headers=request.headers, json=request.body)


@pytest.fixture(scope="module")
def signer() -> SigningKey:
    return new_key("EC", "broker-ec-1")


def test_openai_exchanges_the_assertion_for_a_token_that_the_api_accepts(
    fake: FakeProviderServer, signer: SigningKey
) -> None:
    fake.state.openai_idp = OpenAIIdentityProvider(
        "idp_1", "https://broker.example", AUDIENCE, {"keys": [signer.jwk()]}, "svc_acct_1")
    provider = openai(fake, credential="federated")
    target = FederationTarget(f"{fake.url}/oauth/token", identity_provider_id="idp_1",
                              service_account_id="svc_acct_1")
    request = provider.exchange_request(assertion(signer, "https://broker.example", "ES256"),
                                        target)
    assert request.url == target.token_url and "assertion" not in repr(request)
    now = time.time()
    token = provider.read_exchange(*_answer(send(request)), now)
    assert token.expires_at == now + 600 and token.token not in repr(token)
    upstream = provider.build_request("chat", dict(CHAT), key=token.token, client_headers={})
    assert httpx.post(upstream.url, headers=upstream.headers,
                      content=upstream.content).status_code == 200
    # A refusal names its OAuth code, never the assertion or its description.
    refused = provider.exchange_request(assertion(signer, "https://other.example", "ES256"), target)
    status, body = _answer(send(refused))
    assert admin_error(lambda: provider.read_exchange(status, body, now)) == \
        "openai: the token exchange failed: HTTP 400 (invalid_grant)"
    with pytest.raises(ConfigError, match="identity_provider_id"):
        provider.exchange_request("a.b.c", FederationTarget(target.token_url))


def _answer(resp: httpx.Response) -> tuple[int, bytes]:
    return resp.status_code, resp.content


def test_anthropic_exchanges_the_assertion_and_sends_the_token_as_a_bearer_with_the_oauth_beta(
    fake: FakeProviderServer, fake_issuer: FakeIssuer
) -> None:
    issuer = fake_issuer.issuer_url("broker")
    fake.state.anthropic_rule = AnthropicFederationRule("fdrl_1", "org_1", issuer, AUDIENCE,
                                                        service_account_id="svac_1")
    provider = anthropic(fake, "federated")
    target = FederationTarget(f"{fake.url}/v1/oauth/token", service_account_id="svac_1",
                              federation_rule_id="fdrl_1", organization_id="org_1")
    request = provider.exchange_request(assertion(fake_issuer.keys["RSA"], issuer), target)
    assert request.headers["anthropic-beta"] == f"{OAUTH_BETA},{FEDERATION_BETA}"
    assert set(request.body) == {"grant_type", "assertion", "federation_rule_id",
                                 "organization_id", "service_account_id"}
    now = time.time()
    token = provider.read_exchange(*_answer(send(request)), now)
    assert token.expires_at == now + 600

    upstream = provider.build_request(
        "messages", {**CHAT, "max_tokens": 1}, key=token.token,
        client_headers={"anthropic-beta": f"files-api-2025-04-14,{OAUTH_BETA}"})
    assert upstream.headers["authorization"] == f"Bearer {token.token}"
    assert "x-api-key" not in upstream.headers
    assert upstream.headers["anthropic-beta"] == f"files-api-2025-04-14,{OAUTH_BETA}"
    assert httpx.post(upstream.url, headers=upstream.headers,
                      content=upstream.content).status_code == 200

    fake.state.admin_faults["anthropic.token"] = AdminFault(503)
    assert admin_error(lambda: provider.read_exchange(*_answer(send(request)), now)) == \
        "anthropic: the token exchange failed: HTTP 503 (temporarily_unavailable)"


def test_the_anthropic_exchange_sends_only_the_ids_configured(fake: FakeProviderServer) -> None:
    provider = anthropic(fake, "federated")
    request = provider.exchange_request("a.b.c", FederationTarget(
        "https://api.anthropic.com/v1/oauth/token", federation_rule_id="fdrl_1",
        organization_id="org_1", workspace_id="wrkspc_1"))
    assert request.body == {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                            "assertion": "a.b.c", "federation_rule_id": "fdrl_1",
                            "organization_id": "org_1", "workspace_id": "wrkspc_1"}
    with pytest.raises(ConfigError, match="federation_rule_id"):
        provider.exchange_request("a.b.c", FederationTarget("https://x/v1/oauth/token"))


def test_a_static_anthropic_key_still_goes_as_x_api_key(fake: FakeProviderServer) -> None:
    upstream = anthropic(fake).build_request("messages", {}, key="sk-ant-api03-k",
                                             client_headers={"anthropic-beta": "files-api-2025-04-14"})
    assert upstream.headers["x-api-key"] == "sk-ant-api03-k"
    assert "authorization" not in upstream.headers
    assert upstream.headers["anthropic-beta"] == "files-api-2025-04-14"
    federated = anthropic(fake, "federated").build_request("messages", {}, key="t",
                                                           client_headers={})
    assert federated.headers["anthropic-beta"] == OAUTH_BETA


def _token_body(**fields: Any) -> bytes:
    return json.dumps({"access_token": "tok-123", "token_type": "Bearer", "expires_in": 600,
                       **fields}).encode()


@pytest.mark.parametrize(("body", "why"), [
    (b"<html>", "the answer is not a JSON object"),
    (b"[]", "the answer is not a JSON object"),
    (_token_body(access_token=None), "the answer holds no usable access_token"),
    (_token_body(access_token=""), "the answer holds no usable access_token"),
    (_token_body(access_token="two words"), "the answer holds no usable access_token"),
    (_token_body(token_type="mac"), "the token is not a bearer token"),
    (_token_body(expires_in=0), "expires_in is not a positive whole number"),
    (_token_body(expires_in=-5), "expires_in is not a positive whole number"),
    (_token_body(expires_in="600"), "expires_in is not a positive whole number"),
    (_token_body(expires_in=True), "expires_in is not a positive whole number"),
    (_token_body(expires_in=1.5), "expires_in is not a positive whole number"),
    (_token_body(expires_in=None), "expires_in is not a positive whole number"),
])
def test_a_token_answer_must_hold_a_bearer_token_and_its_life(body: bytes, why: str) -> None:
    message = admin_error(lambda: read_token("anthropic", 200, body, 0.0), "tok-123")
    assert message == f"anthropic: the token exchange failed: {why}"


def test_a_token_lives_as_long_as_the_answer_says_within_a_day() -> None:
    assert read_token("p", 200, _token_body(token_type="bearer"), 100.0).expires_at == 700.0
    assert read_token("p", 200, _token_body(expires_in=10 * 86_400), 0.0).expires_at == 86_400
    missing = json.dumps({"access_token": "tok-123"}).encode()
    # OpenAI's SDK takes an answer without expires_in to live an hour; Anthropic's requires it.
    assert OpenAIProvider(config("openai", "https://api.openai.com/v1", "federated")) \
        .read_exchange(200, missing, 0.0).expires_at == 3600
    assert admin_error(lambda: AnthropicProvider(config("anthropic", "https://a", "federated"))
                       .read_exchange(200, missing, 0.0)).endswith("expires_in is not a positive "
                                                                   "whole number")


@pytest.mark.parametrize(("status", "body", "named"), [
    (400, {"error": "invalid_grant", "error_description": "assertion eyJhbGciOi..."},
     " (invalid_grant)"),
    (401, {"error": "<script>alert(1)</script>"}, ""),
    (500, {"error": "x" * 200}, ""),
    (502, "not json", ""),
])
def test_a_refused_exchange_names_only_a_plain_oauth_code(
    status: int, body: Any, named: str
) -> None:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    message = admin_error(lambda: read_token("openai", status, raw, 0.0), "eyJ", "script")
    assert message == f"openai: the token exchange failed: HTTP {status}{named}"
