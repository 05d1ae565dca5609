"""Provider credentials without static keys (``credential = "federated"``): the broker is an
OIDC issuer toward the provider. It publishes assertion keys of their own at
``/.well-known/assertion-jwks.json`` (named by ``/.well-known/openid-configuration``), signs a
short assertion with them, and exchanges it at the provider's token endpoint for a token that
lives minutes. No provider key is stored anywhere.

The provider here is a stub plugin (the OpenAI wire format against the fake provider, plus
the two :class:`broker.plugin.Federated` methods) and its token endpoint a tiny Starlette app:
on a real port for the live broker, through ``httpx.MockTransport`` for the unit tests of
:class:`ProviderTokens`, whose clock the test moves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import httpx
import jwt
import pytest
import uvicorn
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import broker.services
from broker.credentials.assertions import (
    MAX_PREVIOUS_KEYS,
    RETIRE_MARGIN_S,
    AssertionKeys,
    AssertionRotationTooSoon,
    retire_assertion_keys,
    rotate_assertion_key,
)
from broker.credentials.federated import RETRY_S, ProviderTokens
from broker.devvault import DevVault
from broker.errors import ConfigError, Unavailable
from broker.gateway.provider_keys import ProviderKeys
from broker.metrics import Metrics
from broker.plugin import (
    ExchangeRequest,
    FederationTarget,
    ProviderAdminError,
    ProviderConfig,
    ProviderPlugin,
    ProviderToken,
)
from broker.registry import build_providers, load_provider_plugins
from broker.services import Services
from broker.settings import Settings
from broker.storage.vault import Vault
from plugins.provider_openai_compatible import OpenAICompatibleProvider
from tests.conftest import SECRETS, Broker, make_settings
from tests.fake_provider import FakeProviderServer
from tests.support import Clock, wait_for

AUDIENCE = "https://provider.test/federation"
TOKEN_URL = "https://provider.test/oauth/token"
ISSUER = "http://broker.test"  # conftest's issuer.url


# --- the stub provider and its token endpoint ------------------------------------------------


def exchange_request(assertion: str, target: FederationTarget) -> ExchangeRequest:
    return ExchangeRequest(
        url=target.token_url, headers={"accept": "application/json"},
        body={"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
              "subject_token": assertion,
              "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
              "service_account_id": target.service_account_id or ""})


def read_exchange(status: int, body: bytes, now: float) -> ProviderToken:
    if status != 200:
        raise ProviderAdminError(f"token exchange: HTTP {status}")
    answer = json.loads(body)
    return ProviderToken(answer["access_token"], now + float(answer["expires_in"]))


class StubFederated:
    """Only the exchange: what :class:`ProviderTokens` needs of a plugin."""

    def exchange_request(self, assertion: str, target: FederationTarget) -> ExchangeRequest:
        return exchange_request(assertion, target)

    def read_exchange(self, status: int, body: bytes, now: float) -> ProviderToken:
        return read_exchange(status, body, now)


class StubFederatedProvider(OpenAICompatibleProvider):
    """A whole provider: the OpenAI wire format (the fake provider speaks it) and the exchange."""

    def exchange_request(self, assertion: str, target: FederationTarget) -> ExchangeRequest:
        return exchange_request(assertion, target)

    def read_exchange(self, status: int, body: bytes, now: float) -> ProviderToken:
        return read_exchange(status, body, now)


class StubFederatedPlugin:
    def create(self, config: ProviderConfig) -> StubFederatedProvider:
        return StubFederatedProvider(config)


@pytest.fixture
def stub_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """``plugin = "stub-federated"`` is known to the brokers this test builds."""
    plugins: dict[str, ProviderPlugin] = {**load_provider_plugins(),
                                          "stub-federated": StubFederatedPlugin()}

    def with_stub(providers: Any, _plugins: Any = None) -> Any:
        return build_providers(providers, plugins)

    monkeypatch.setattr(broker.services, "build_providers", with_stub)


class TokenEndpoint:
    """The provider's token endpoint: records each assertion, answers a new token (or
    ``status`` with an OAuth error)."""

    def __init__(self) -> None:
        self.calls = 0  # requests received, answered or not yet
        self.assertions: list[str] = []
        self.issued: list[str] = []
        self.status = 200
        self.expires_in = 600.0
        # Set by the test to hold the answer back (a slow endpoint).
        self.gate: Callable[[], Awaitable[None]] | None = None

    def answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.assertions.append(SECRETS.add(str(body["subject_token"])))
        if self.status != 200:
            return self.status, {"error": "invalid_grant"}
        token = SECRETS.add("fedtok-" + secrets.token_urlsafe(24))
        self.issued.append(token)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in}

    async def handle(self, request: httpx.Request) -> httpx.Response:
        """For ``httpx.MockTransport``."""
        self.calls += 1
        if self.gate is not None:
            await self.gate()
        status, body = self.answer(json.loads(request.content))
        return httpx.Response(status, json=body)


class TokenServer(TokenEndpoint):
    """The same under uvicorn on a real port (in a thread), for the live broker."""

    def __init__(self) -> None:
        super().__init__()

        async def token(request: Request) -> Response:
            self.calls += 1
            status, body = self.answer(await request.json())
            return JSONResponse(body, status_code=status)

        app = Starlette(routes=[Route("/token", token, methods=["POST"])])
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}/token"
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       daemon=True)

    def __enter__(self) -> TokenServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 10, what="the token endpoint's start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.socket.close()


@pytest.fixture
def token_server() -> Iterator[TokenServer]:
    with TokenServer() as server:
        yield server


# --- helpers ---------------------------------------------------------------------------------


def federated_provider(token_url: str = TOKEN_URL, **more: Any) -> dict[str, Any]:
    return {"plugin": "stub-federated", "credential": "federated", "token_url": token_url,
            "audience": AUDIENCE, "service_account_id": "svc_acct_1", **more}


def settings_for(vault: DevVault, **sections: dict[str, Any]) -> Settings:
    return make_settings("sqlite:///unused.db", vault,
                         providers={"fed": federated_provider()}, **sections)


def verify(assertion: str, jwks: dict[str, Any], audience: str = AUDIENCE) -> dict[str, Any]:
    """The claims of ``assertion``, verified against ``jwks`` alone, as a provider would."""
    kid = jwt.get_unverified_header(assertion)["kid"]
    [jwk] = [k for k in jwks["keys"] if k["kid"] == kid]
    key = jwt.PyJWK(jwk)
    claims: dict[str, Any] = jwt.decode(
        assertion, key=key.key, algorithms=[jwk["alg"]], audience=audience, issuer=ISSUER,
        options={"require": ["iss", "sub", "aud", "iat", "nbf", "exp", "jti"]})
    return claims


def kids(jwks: dict[str, Any]) -> set[str]:
    return {k["kid"] for k in jwks["keys"]}


def tokens_for(settings: Settings, endpoint: TokenEndpoint, clock: Clock,
               metrics: Metrics | None = None) -> ProviderTokens:
    keys = AssertionKeys(Vault(settings.vault), settings)
    return ProviderTokens(settings, keys, {"fed": StubFederated()},
                          transport=httpx.MockTransport(endpoint.handle), clock=clock,
                          metrics=(lambda: metrics) if metrics is not None else None)


def agent_token(b: Broker, models: list[str]) -> str:
    tenant = b.create_tenant()
    agent = b.create_workload(tenant["id"], policy={
        "models": models, "token_budget_micros": 1_000_000,
        "rate": {"rpm": 1_000_000, "tpm": 10**12}, "max_concurrent": 1000,
        "max_live_tokens": 1000})
    return b.token(agent["client_id"], agent["client_secret"])


CHAT = {"model": "fed-gpt", "messages": [{"role": "user", "content": "hello"}]}


def live_federated_broker(make_live_broker: Callable[..., Broker], sqlite_url: str,
                          fake: FakeProviderServer, token_url: str) -> Broker:
    return make_live_broker(
        sqlite_url,
        providers={"fed": federated_provider(token_url, base_url=fake.url + "/v1")},
        models={"fed-gpt": {"provider": "fed", "upstream_model": "mock-gpt",
                            "input_micros_per_mtok": 1000, "output_micros_per_mtok": 1000}})


# --- the issuer: discovery and keys ----------------------------------------------------------


@pytest.mark.usefixtures("stub_plugin")
def test_gateway_calls_reach_the_provider_with_an_exchanged_token_and_its_assertion_verifies(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
    token_server: TokenServer,
) -> None:
    b = live_federated_broker(make_live_broker, sqlite_url, fake, token_server.url)
    token = agent_token(b, ["fed-gpt"])

    resp = b.client.post("/v1/chat/completions", json=CHAT,
                         headers={"authorization": f"Bearer {token}"})

    assert resp.status_code == 200, resp.text
    assert token_server.calls == 1 and fake.state.received_keys == token_server.issued
    # What the provider does with the assertion: discovery, then the JWKS it names, and nothing
    # else (the HTTP answers of the live broker, not its objects).
    discovery = b.client.get("/.well-known/openid-configuration")
    assert discovery.status_code == 200
    config = discovery.json()
    assert config["issuer"] == ISSUER
    assert config["jwks_uri"] == f"{ISSUER}/.well-known/assertion-jwks.json"
    assert config["id_token_signing_alg_values_supported"] == ["RS256"]
    assert config["subject_types_supported"] == ["public"]
    assert {"iss", "sub", "aud", "exp", "iat"} <= set(config["claims_supported"])
    published = b.client.get("/.well-known/assertion-jwks.json")
    assert published.headers["cache-control"] == "public, max-age=60"
    [assertion] = token_server.assertions
    claims = verify(assertion, published.json())
    header = jwt.get_unverified_header(assertion)
    assert header["typ"] == "JWT" and header["alg"] == "RS256"
    assert header["kid"] == b.services.assertion_keys.current_kid
    assert claims["sub"] == "provider:fed" and claims["aud"] == AUDIENCE
    assert claims["exp"] - claims["iat"] == b.settings.federation.assertion_ttl_s <= 300
    assert claims["nbf"] == claims["iat"] and len(claims["jti"]) >= 16
    # A second call uses the token held: no new exchange.
    again = b.client.post("/v1/chat/completions", json=CHAT,
                          headers={"authorization": f"Bearer {token}"})
    assert again.status_code == 200 and token_server.calls == 1
    metrics = b.client.get("/metrics").text
    assert 'broker_provider_token_exchanges_total{provider="fed",result="ok"} 1.0' in metrics


@pytest.mark.usefixtures("stub_plugin")
def test_a_dead_token_endpoint_answers_503_and_the_provider_is_never_called(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
    token_server: TokenServer,
) -> None:
    token_server.status = 500
    b = live_federated_broker(make_live_broker, sqlite_url, fake, token_server.url)
    token = agent_token(b, ["fed-gpt"])

    resp = b.client.post("/v1/chat/completions", json=CHAT,
                         headers={"authorization": f"Bearer {token}"})

    assert resp.status_code == 503, resp.text
    assert "fed" in resp.json()["error"]["message"]
    assert token_server.calls == 1
    assert fake.state.requests == [] and fake.state.received_keys == []
    assert token_server.assertions[0] not in resp.text
    status = b.services.provider_tokens.status("fed") if b.services.provider_tokens else None
    assert status is not None and not status.healthy and status.expires_at is None
    assert status.last_error == "token exchange: HTTP 500"
    metrics = b.client.get("/metrics").text
    assert 'broker_provider_token_exchanges_total{provider="fed",result="failed"} 1.0' in metrics


def test_a_fresh_vault_publishes_assertion_keys_apart_from_the_access_token_keys(
    sqlite_broker: Broker,
) -> None:
    # No provider is federated yet: a provider is registered against the issuer first.
    c = sqlite_broker.client
    assertion_jwks = c.get("/.well-known/assertion-jwks.json").json()
    access_jwks = c.get("/.well-known/jwks.json").json()
    assert c.get("/.well-known/openid-configuration").status_code == 200

    assert len(assertion_jwks["keys"]) == 2  # current and next
    assert kids(assertion_jwks).isdisjoint(kids(access_jwks))
    assert all(k.startswith("fed-") for k in kids(assertion_jwks))
    for jwk in assertion_jwks["keys"]:
        assert jwk["kty"] == "RSA" and jwk["alg"] == "RS256" and jwk["use"] == "sig"
        assert not {"d", "p", "q", "dp", "dq", "qi"} & jwk.keys()  # public parts only
    public = {(k.get("n"), k.get("x")) for k in access_jwks["keys"]}
    assert public.isdisjoint({(k.get("n"), k.get("x")) for k in assertion_jwks["keys"]})
    # Each key set verifies its own tokens only.
    access_token = sqlite_broker.admin_token()
    assert jwt.get_unverified_header(access_token)["kid"] not in kids(assertion_jwks)
    assertion = sqlite_broker.services.assertion_keys.sign(issuer=ISSUER, subject="provider:x",
                                                           audience=AUDIENCE)
    assert jwt.get_unverified_header(assertion)["kid"] not in kids(access_jwks)
    verify(assertion, assertion_jwks)
    # The document lives under the broker's Vault prefix, apart from the signing keys.
    keys_path = sqlite_broker.services.assertion_keys.path
    assert keys_path == f"{sqlite_broker.settings.vault.prefix}/assertion-keys"


def test_es256_keys_sign_assertions_that_verify(vault: DevVault) -> None:
    settings = settings_for(vault, federation={"assertion_alg": "ES256", "assertion_ttl_s": 300})
    keys = AssertionKeys(Vault(settings.vault), settings)

    assertion = keys.sign(issuer=ISSUER, subject="provider:fed", audience=AUDIENCE)

    jwks = keys.jwks()
    assert {(k["kty"], k["crv"], k["alg"]) for k in jwks["keys"]} == {("EC", "P-256", "ES256")}
    claims = verify(assertion, jwks)
    assert claims["exp"] - claims["iat"] == 300
    assert keys.algorithms() == ["ES256"]


def test_two_replicas_starting_on_one_vault_agree_on_the_keys(vault: DevVault) -> None:
    settings = settings_for(vault)
    replicas = [AssertionKeys(Vault(settings.vault), settings) for _ in range(4)]
    barrier = threading.Barrier(len(replicas))

    def start(keys: AssertionKeys) -> None:
        barrier.wait()
        keys.load()

    threads = [threading.Thread(target=start, args=(k,)) for k in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len({k.current_kid for k in replicas}) == 1
    assert all(k.jwks() == replicas[0].jwks() for k in replicas)
    found = Vault(settings.vault).read(replicas[0].path)
    assert found is not None and found[1] == 1  # one write won; the others read it


def test_rotation_publishes_next_ahead_and_keeps_previous_past_its_assertions(
    vault: DevVault,
) -> None:
    settings = settings_for(vault)
    keys = AssertionKeys(Vault(settings.vault), settings)
    keys.load(now=1_000)
    [first] = [kid for kid, s in keys.states().items() if s == "current"]
    [upcoming] = [kid for kid, s in keys.states().items() if s == "next"]
    uploaded = keys.jwks()  # a copy an operator gave the provider

    assertion = keys.sign(issuer=ISSUER, subject="provider:fed", audience=AUDIENCE)
    keys.rotate(now=2_000)

    assert keys.current_kid == upcoming
    assert keys.states()[first] == "previous"
    verify(assertion, keys.jwks())  # signed before the rotation, still verifies
    after = keys.sign(issuer=ISSUER, subject="provider:fed", audience=AUDIENCE)
    verify(after, uploaded)  # the uploaded copy verifies through this rotation
    retire_at = 2_000 + settings.federation.assertion_ttl_s + RETIRE_MARGIN_S
    assert keys.retire_expired(now=retire_at - 1) == []
    assert keys.retire_expired(now=retire_at) == [first]
    assert first not in kids(keys.jwks()) and len(keys.jwks()["keys"]) == 2


def test_rotations_faster_than_the_keys_retire_are_refused(vault: DevVault) -> None:
    settings = settings_for(vault)
    keys = AssertionKeys(Vault(settings.vault), settings)
    keys.load(now=1_000)
    for _ in range(MAX_PREVIOUS_KEYS):
        keys.rotate(now=1_000)

    with pytest.raises(AssertionRotationTooSoon) as refused:
        keys.rotate(now=1_000)

    assert refused.value.status == 429
    assert len(keys.jwks()["keys"]) == MAX_PREVIOUS_KEYS + 2


def test_a_scheduled_rotation_is_audited_and_reaches_the_other_replicas(
    make_live_broker: Callable[..., Broker], sqlite_url: str,
) -> None:
    b = make_live_broker(sqlite_url)
    svc = b.services
    before = svc.assertion_keys.jwks()
    # Another replica: its own view of the same document, sharing the database.
    other = dataclasses.replace(svc, assertion_keys=AssertionKeys(svc.vault, svc.settings))

    key = rotate_assertion_key(other)

    wait_for(lambda: svc.assertion_keys.current_kid == key.kid, 15,
             what="this replica re-reading the assertion keys")
    assert kids(before) < kids(svc.assertion_keys.jwks())
    with svc.db.engine.connect() as conn:
        [row] = conn.execute(text("SELECT actor, target, detail FROM audit_event "
                                  "WHERE action = 'assertion_key.rotate'")).all()
    detail = json.loads(row.detail) if isinstance(row.detail, str) else row.detail
    assert row.actor == "scheduler" and row.target == key.kid
    assert detail["keys"][key.kid] == "current"
    assert "PRIVATE" not in json.dumps(detail)
    assert retire_assertion_keys(other) == []  # the old key still has its hour


def test_a_plugin_that_cannot_exchange_refuses_to_start(vault: DevVault, sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, vault, providers={
        "local": {"plugin": "mock", "credential": "federated", "token_url": TOKEN_URL,
                  "audience": AUDIENCE}})

    with pytest.raises(ConfigError, match=r"providers\.local\.credential"):
        Services.build(settings)


# --- ProviderTokens --------------------------------------------------------------------------


def test_fifty_concurrent_first_calls_share_one_exchange(vault: DevVault) -> None:
    endpoint, clock = TokenEndpoint(), Clock()
    tokens = tokens_for(settings_for(vault), endpoint, clock)

    async def slow() -> None:
        await anyio.sleep(0.05)

    endpoint.gate = slow

    async def main() -> list[str]:
        got: list[str] = []

        async def call() -> None:
            got.append(await tokens.get("fed"))

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(call)
        await tokens.aclose()
        return got

    got = anyio.run(main)

    assert endpoint.calls == 1
    assert got == [endpoint.issued[0]] * 50


def test_event_loops_of_other_threads_share_the_exchange_too(vault: DevVault) -> None:
    # The scheduler's batch polls run on event loops of their own.
    endpoint, clock = TokenEndpoint(), Clock()
    tokens = tokens_for(settings_for(vault), endpoint, clock)

    async def slow() -> None:
        await anyio.sleep(0.2)

    endpoint.gate = slow
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(anyio.run(tokens.get, "fed")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert endpoint.calls == 1 and got == [endpoint.issued[0]] * 4


def test_the_refresh_runs_in_the_background_while_the_old_token_serves(vault: DevVault) -> None:
    endpoint, clock = TokenEndpoint(), Clock()
    endpoint.expires_in = 1000  # refresh_at 0.75: the refresh is due at 750 s
    tokens = tokens_for(settings_for(vault), endpoint, clock)

    async def main() -> None:
        first = await tokens.get("fed")
        clock.advance(749)
        assert await tokens.get("fed") == first and endpoint.calls == 1
        release = asyncio.Event()

        async def held_back() -> None:
            await release.wait()

        endpoint.gate = held_back
        clock.advance(2)
        # Due: the refresh starts, and every call meanwhile gets the old token at once.
        for _ in range(20):
            assert await tokens.get("fed") == first
        with anyio.fail_after(10):
            while endpoint.calls < 2:
                await anyio.sleep(0.01)
        for _ in range(20):
            assert await tokens.get("fed") == first
        assert endpoint.calls == 2  # one refresh only, waiting for the endpoint
        release.set()
        with anyio.fail_after(10):
            while tokens.status("fed").last_exchange_at != clock.now:
                await anyio.sleep(0.01)
        assert await tokens.get("fed") == endpoint.issued[1] != first
        await tokens.aclose()

    anyio.run(main)


@pytest.mark.parametrize(("life", "due"), [
    (1000.0, 750.0),  # refresh_at (0.75) of the life
    (200.0, 140.0),  # refresh_margin_s (60) before expiry comes sooner
    (60.0, 22.5),  # shorter than the margin: half of refresh_at, not at every call
])
def test_the_refresh_is_due_at_refresh_at_or_the_margin_before_expiry(
    vault: DevVault, life: float, due: float,
) -> None:
    endpoint, clock = TokenEndpoint(), Clock()
    endpoint.expires_in = life
    tokens = tokens_for(settings_for(vault), endpoint, clock)

    async def main() -> None:
        await tokens.get("fed")
        clock.advance(due - 0.5)
        await tokens.get("fed")
        await anyio.sleep(0.05)
        assert endpoint.calls == 1
        clock.advance(0.5)
        await tokens.get("fed")
        with anyio.fail_after(10):
            while endpoint.calls < 2 or tokens.status("fed").last_exchange_at != clock.now:
                await anyio.sleep(0.01)
        await tokens.aclose()

    anyio.run(main)


def test_a_failed_first_exchange_answers_503_and_backs_off(vault: DevVault) -> None:
    endpoint, clock, metrics = TokenEndpoint(), Clock(), Metrics()
    endpoint.status = 401
    tokens = tokens_for(settings_for(vault), endpoint, clock, metrics)

    with pytest.raises(Unavailable) as refused:
        anyio.run(tokens.get, "fed")

    assert refused.value.status == 503
    assert "'fed'" in str(refused.value) and "HTTP 401" in str(refused.value)
    status = tokens.status("fed")
    assert not status.healthy and status.expires_at is None
    assert status.last_error == "token exchange: HTTP 401"
    # Within the backoff the endpoint is not asked again.
    clock.advance(RETRY_S - 1)
    with pytest.raises(Unavailable):
        anyio.run(tokens.get, "fed")
    assert endpoint.calls == 1
    # After it, the next call tries again, and a token ends the outage.
    endpoint.status = 200
    clock.advance(1)
    assert anyio.run(tokens.get, "fed") == endpoint.issued[0]
    assert tokens.status("fed").healthy and tokens.status("fed").last_error is None
    for result in ("failed", "ok"):
        assert metrics.registry.get_sample_value(
            "broker_provider_token_exchanges_total", {"provider": "fed", "result": result}) == 1


def test_a_failed_refresh_keeps_the_valid_token_serving(vault: DevVault) -> None:
    endpoint, clock = TokenEndpoint(), Clock()
    endpoint.expires_in = 100
    tokens = tokens_for(settings_for(vault), endpoint, clock)

    async def main() -> None:
        first = await tokens.get("fed")
        endpoint.status = 503
        clock.advance(80)
        assert await tokens.get("fed") == first  # starts the refresh, which fails
        with anyio.fail_after(10):
            while tokens.status("fed").last_error is None:
                await anyio.sleep(0.01)
        status = tokens.status("fed")
        assert status.healthy and status.expires_at == 1_100.0
        # Within the backoff: served, and the endpoint is left alone.
        clock.advance(RETRY_S - 1)
        assert await tokens.get("fed") == first
        await anyio.sleep(0.05)
        assert endpoint.calls == 2
        # The token expired with every refresh failing: now the calls are refused.
        clock.advance(100)
        with pytest.raises(Unavailable):
            await tokens.get("fed")
        assert not tokens.status("fed").healthy
        await tokens.aclose()

    anyio.run(main)


@pytest.mark.parametrize(("answer", "error"), [
    (httpx.ConnectError("refused"), "cannot be reached (ConnectError)"),
    (httpx.Response(200, content=b"x" * 70_000), "larger than 65536 bytes"),
    (httpx.Response(200, json={"access_token": "t-expired", "expires_in": 1}),
     "the token the provider issued has expired"),
    (httpx.Response(200, content=b"{not json"), "(JSONDecodeError)"),
])
def test_network_errors_and_bad_answers_fail_closed(
    vault: DevVault, answer: httpx.Response | Exception, error: str,
) -> None:
    settings = settings_for(vault)
    keys = AssertionKeys(Vault(settings.vault), settings)

    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(answer, Exception):
            raise answer
        return answer

    tokens = ProviderTokens(settings, keys, {"fed": StubFederated()}, clock=Clock(),
                            transport=httpx.MockTransport(handler))

    with pytest.raises(Unavailable, match="'fed'"):
        anyio.run(tokens.get, "fed")
    assert error in (tokens.status("fed").last_error or "")


def test_redirects_are_not_followed(vault: DevVault) -> None:
    settings = settings_for(vault)
    keys = AssertionKeys(Vault(settings.vault), settings)
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(307, headers={"location": "https://elsewhere.test/token"})

    tokens = ProviderTokens(settings, keys, {"fed": StubFederated()}, clock=Clock(),
                            transport=httpx.MockTransport(handler))

    with pytest.raises(Unavailable):
        anyio.run(tokens.get, "fed")
    assert seen == [TOKEN_URL]


def test_the_exchange_sends_the_assertion_to_the_configured_target(vault: DevVault) -> None:
    settings = make_settings("sqlite:///unused.db", vault, providers={"fed": federated_provider(
        assertion_subject="broker-prod")})
    endpoint, clock = TokenEndpoint(), Clock()
    tokens = tokens_for(settings, endpoint, clock)

    anyio.run(tokens.get, "fed")

    claims = verify(endpoint.assertions[0], tokens._keys.jwks())
    assert claims["sub"] == "broker-prod" and claims["iss"] == ISSUER


def test_tokens_and_keys_never_reach_logs_errors_or_the_status(
    vault: DevVault, caplog: pytest.LogCaptureFixture,
) -> None:
    endpoint, clock = TokenEndpoint(), Clock()
    endpoint.expires_in = 100
    settings = settings_for(vault)
    tokens = tokens_for(settings, endpoint, clock)
    errors: list[str] = []

    with caplog.at_level(logging.DEBUG):
        anyio.run(tokens.get, "fed")
        endpoint.status = 400
        clock.advance(200)
        try:
            anyio.run(tokens.get, "fed")
        except Unavailable as exc:
            errors.append(str(exc))

    assert errors, "the second exchange failed"
    found = Vault(settings.vault).read(tokens._keys.path)
    assert found is not None
    pems = [line for k in found[0]["keys"] for line in k["private_pem"].splitlines()
            if "-----" not in line]
    secrets_seen = [*endpoint.issued, *endpoint.assertions, *pems]
    texts = [caplog.text, *errors, repr(tokens.status("fed")), repr(tokens._keys.jwks())]
    for secret in secrets_seen:
        for t in texts:
            assert secret not in t


def test_provider_keys_hands_a_federated_provider_its_token_and_never_an_empty_key(
    vault: DevVault,
) -> None:
    endpoint, clock = TokenEndpoint(), Clock()
    tokens = tokens_for(settings_for(vault), endpoint, clock)
    keys = ProviderKeys(Vault(settings_for(vault).vault), {"fed": None, "local": None},
                        max_stale_s=300, tokens=tokens)

    assert anyio.run(keys.get, "fed") == endpoint.issued[0]
    assert anyio.run(keys.get, "local") == ""  # a provider that takes no key
    endpoint.status = 500
    clock.advance(1000)
    with pytest.raises(Unavailable):
        anyio.run(keys.get, "fed")


def test_only_federated_providers_are_taken(vault: DevVault) -> None:
    settings = make_settings("sqlite:///unused.db", vault, providers={"mock": {}})
    keys = AssertionKeys(Vault(settings.vault), settings)

    with pytest.raises(ValueError, match=r"providers\.mock"):
        ProviderTokens(settings, keys, {"mock": StubFederated()})
