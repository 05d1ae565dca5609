"""Federated provider credentials end to end (``credential = "federated"``): the shipped
``openai`` and ``anthropic`` plugins exchange the broker's signed assertion at the strict fake
token endpoints (:mod:`plugins.mock_federation`) and call the fake provider with the token, driven
by the official SDKs. No provider key exists anywhere.

Also here: the secret scan of this issue. The admin key, every provider key the rotations made
and every provider token appear in no response, log, metric or audit entry.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from broker.credentials import rotating, watch
from broker.credentials.assertions import rotate_assertion_key
from broker.credentials.rotating import RotationFailed
from broker.devvault import free_port
from broker.registry import build_providers
from broker.storage.vault import Vault
from plugins.mock_federation import AnthropicFederationRule, OpenAIIdentityProvider
from plugins.mock_provider_admin import OPENAI_PROJECT, AdminFault
from tests.conftest import SECRETS, Broker
from tests.fake_provider import FakeProviderServer
from tests.gateway_support import Env, make_env

AUDIENCE = "https://provider.test/broker-federation"
PRICES = {"input_micros_per_mtok": 1_000_000, "output_micros_per_mtok": 2_000_000}
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
MESSAGES: list[MessageParam] = [{"role": "user", "content": "hi"}]


def _federated_env(make_live_broker: Callable[..., Broker], db: str, fake: FakeProviderServer,
                   **federation: Any) -> Env:
    """A live broker, its URL its issuer, with ``fed-openai`` and ``fed-anthropic`` federated
    against the fake provider's token endpoints."""
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"

    def adjust(sections: dict[str, dict[str, Any]]) -> None:
        sections["issuer"] = {"url": issuer, "audience": "ai-broker"}
        sections["federation"] = federation
        sections["providers"]["fed-openai"] = {
            "plugin": "openai", "base_url": fake.url + "/v1", "credential": "federated",
            "token_url": fake.url + "/oauth/token", "audience": AUDIENCE,
            "identity_provider_id": "idp_broker", "service_account_id": "svc_acct_broker"}
        sections["providers"]["fed-anthropic"] = {
            "plugin": "anthropic", "base_url": fake.url, "credential": "federated",
            "token_url": fake.url + "/v1/oauth/token", "audience": AUDIENCE,
            "federation_rule_id": "fdrl_broker", "organization_id": "org_broker",
            "service_account_id": "svcac_broker"}
        sections["models"]["fed-gpt"] = {"provider": "fed-openai", "upstream_model": "mock-gpt",
                                         **PRICES}
        sections["models"]["fed-claude"] = {"provider": "fed-anthropic",
                                            "upstream_model": "mock-claude", **PRICES}

    env = make_env(lambda db_, **kw: make_live_broker(db_, port=port, **kw), db, fake,
                   adjust=adjust)
    jwks = env.broker.client.get("/.well-known/assertion-jwks.json").json()
    # OpenAI holds an uploaded copy of the JWKS; Anthropic discovers it from the issuer.
    fake.state.openai_idp = OpenAIIdentityProvider(
        id="idp_broker", issuer=issuer, audience=AUDIENCE, jwks=jwks,
        service_account_id="svc_acct_broker", subject="provider:fed-openai")
    fake.state.anthropic_rule = AnthropicFederationRule(
        id="fdrl_broker", organization_id="org_broker", issuer=issuer, audience=AUDIENCE,
        service_account_id="svcac_broker", subject="provider:fed-anthropic")
    return env


def _tokens(fake: FakeProviderServer) -> set[str]:
    return {SECRETS.add(t) for t in fake.state.federated_tokens}


def _openai(env: Env, token: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=token, base_url=f"{env.broker.url}/v1", max_retries=0)


def _anthropic(env: Env, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=token, base_url=env.broker.url or "", max_retries=0)


def _view(env: Env, name: str) -> dict[str, Any]:
    resp = env.broker.client.get("/v1/admin/providers", headers=env.broker.admin())
    assert resp.status_code == 200, resp.text
    return next(p for p in resp.json()["data"] if p["name"] == name)


def test_openai_calls_carry_an_exchanged_token_and_no_key_is_stored(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
) -> None:
    env = _federated_env(make_live_broker, sqlite_url, fake)
    token = env.token(models=["fed-gpt"])
    with _openai(env, token) as client:
        for _ in range(3):
            answer = client.chat.completions.create(model="fed-gpt", max_tokens=5, messages=CHAT)
            assert answer.choices[0].message.content
    assert watch.probe_exchange(env.broker.services, "fed-openai")  # the scheduled probe too
    assert fake.state.exchanges == ["openai"]  # one exchange serves every call until refresh
    (provider_token,) = _tokens(fake)
    assert fake.state.received_keys[-3:] == [provider_token] * 3
    view = _view(env, "fed-openai")
    assert view["credential"] == "federated" and view["health"] == "ok"
    assert view["key_version"] is None and view["token_expires_at"] is not None
    assert provider_token not in json.dumps(view)
    # There is no key to rotate: the route says so.
    refused = env.broker.client.post("/v1/admin/providers/fed-openai/rotate",
                                     headers=env.broker.admin())
    assert refused.status_code == 409


def test_anthropic_calls_carry_a_bearer_token_from_a_discovered_issuer(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
) -> None:
    env = _federated_env(make_live_broker, sqlite_url, fake)
    token = env.token(models=["fed-claude"])
    with _anthropic(env, token) as client:
        message = client.messages.create(model="fed-claude", max_tokens=5, messages=MESSAGES)
        assert message.content
        with client.messages.stream(model="fed-claude", max_tokens=5, messages=MESSAGES) as stream:
            assert stream.get_final_message().usage.output_tokens > 0
    assert fake.state.exchanges == ["anthropic"]
    (provider_token,) = _tokens(fake)
    assert fake.state.received_keys[-1] == provider_token


def test_a_refused_exchange_answers_503_and_the_provider_is_never_called(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
) -> None:
    env = _federated_env(make_live_broker, sqlite_url, fake)
    assert fake.state.openai_idp is not None and fake.state.anthropic_rule is not None
    fake.state.openai_idp.audience = "https://someone-else.test"  # our aud is now wrong
    fake.state.anthropic_rule.issuer = "https://not-the-broker.test"
    token = env.token(models=["fed-gpt", "fed-claude"])
    with _openai(env, token) as client, pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="fed-gpt", max_tokens=5, messages=CHAT)
    assert refused.value.status_code == 503
    with _anthropic(env, token) as aclient, pytest.raises(anthropic.APIStatusError) as arefused:
        aclient.messages.create(model="fed-claude", max_tokens=5, messages=MESSAGES)
    assert arefused.value.status_code == 503
    assert fake.state.received_keys == [] and fake.state.requests == []
    assert len(fake.state.exchange_refusals) == 2 and fake.state.federated_tokens == {}
    view = _view(env, "fed-openai")
    assert view["health"] == "unhealthy" and "exchange failed" in view["health_reason"]
    # The scheduled probe alerts on it, once while it lasts, even when no call needs a token.
    svc = env.broker.services
    assert not watch.probe_exchange(svc, "fed-openai")
    assert not watch.probe_exchange(svc, "fed-openai")
    alerts = [a for a in env.broker.client.get("/v1/admin/alerts", headers=env.broker.admin())
              .json()["data"] if a["detector"] == "provider"]
    assert [(a["workload_id"], a["severity"]) for a in alerts] == [
        ("provider:fed-openai", "critical")]


def test_the_token_is_refreshed_before_it_expires_and_no_call_fails(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
) -> None:
    env = _federated_env(make_live_broker, sqlite_url, fake, refresh_margin_s=1,
                         refresh_at=0.5)
    fake.state.token_ttl_s = 6  # the fake refuses each token 6 s after issuing it
    token = env.token(models=["fed-gpt"], budget=20_000_000)
    statuses = []
    with _openai(env, token) as client:
        deadline = time.monotonic() + 10  # past one lifetime of a token, and a half
        while time.monotonic() < deadline:
            try:
                client.chat.completions.create(model="fed-gpt", max_tokens=5, messages=CHAT)
                statuses.append(200)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)
            time.sleep(0.05)
    assert set(statuses) == {200}, statuses
    assert len(fake.state.exchanges) >= 2  # refreshed ahead, before the first one expired
    assert len(set(fake.state.received_keys)) == len(fake.state.exchanges)


def test_an_uploaded_jwks_carries_over_one_assertion_key_rotation(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
) -> None:
    """OpenAI keeps the JWKS uploaded at registration: it holds ``next`` too, so the first
    assertion signed after a rotation still verifies there."""
    env = _federated_env(make_live_broker, sqlite_url, fake)
    rotate_assertion_key(env.broker.services, "test", "scheduled")
    token = env.token(models=["fed-gpt"])
    with _openai(env, token) as client:
        client.chat.completions.create(model="fed-gpt", max_tokens=5, messages=CHAT)
    assert fake.state.exchanges == ["openai"] and fake.state.exchange_refusals == []


# --- nothing secret leaks ----------------------------------------------------------------


def test_admin_keys_provider_keys_and_tokens_appear_in_no_response_log_metric_or_audit(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    env = _federated_env(make_live_broker, sqlite_url, fake)
    broker, svc = env.broker, env.broker.services
    # A rotating OpenAI provider too: its admin key in Vault, its first key made upstream.
    vault = Vault(broker.settings.vault)
    base = env.vault_path
    admin_path, key_path = base + "-admin", base + "-rot"
    responses: list[str] = []
    vault.write(admin_path, {"api_key": SECRETS.add(fake.state.admin_key)})
    rotating_settings = broker.settings.model_copy(update={"providers": {
        **broker.settings.providers,
        "rot-openai": broker.settings.providers["fake-openai"].model_copy(update={
            "credential": "rotating", "vault_path": key_path, "admin_vault_path": admin_path,
            "project_id": OPENAI_PROJECT})}})
    svc.settings = rotating_settings
    svc.providers["rot-openai"] = build_providers(
        {"rot-openai": rotating_settings.providers["rot-openai"]})["rot-openai"]
    first = svc.providers["rot-openai"].create_key(  # type: ignore[attr-defined]
        fake.state.admin_key, "operator-first")
    vault.write(key_path, {"api_key": SECRETS.add(first.key), "key_id": first.key_id,
                           "account_id": first.account_id})
    rotating.rotate(svc, "rot-openai", "test")
    fake.state.admin_faults["check"] = AdminFault(401, times=10)
    with pytest.raises(RotationFailed):
        rotating.rotate(svc, "rot-openai", "test")  # a failure's texts too
    fake.state.admin_faults.clear()
    made = {SECRETS.add(k) for k in fake.state.live_admin_keys().values()} | {first.key}
    token = env.token(models=["fed-gpt", "fed-claude"])
    with _openai(env, token) as client:
        client.chat.completions.create(model="fed-gpt", max_tokens=5, messages=CHAT)
    with _anthropic(env, token) as aclient:
        aclient.messages.create(model="fed-claude", max_tokens=5, messages=MESSAGES)
    for path in ("/v1/admin/providers", "/metrics", "/.well-known/openid-configuration",
                 "/.well-known/assertion-jwks.json"):
        resp = broker.client.get(path, headers=broker.admin())
        assert resp.status_code == 200, (path, resp.text)
        responses.append(resp.text)
    audit = broker.client.get("/v1/admin/audit", params={"limit": 200}, headers=broker.admin())
    alerts = broker.client.get("/v1/admin/alerts", headers=broker.admin())
    responses += [audit.text, alerts.text]
    secrets_ = made | _tokens(fake) | {fake.state.admin_key}
    assert len(_tokens(fake)) == 2 and len(made) >= 2
    logs = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    for secret in secrets_:
        for text in (*responses, logs):
            assert secret not in text
    actions = {e["action"] for e in audit.json()["data"]}
    assert {"provider_key.rotate", "provider_key.rotate_failed"} <= actions
