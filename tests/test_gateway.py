"""The gateway, driven by the official SDKs: every call is attributed, priced exactly and bounded
by its token's slice, and only the provider key from Vault ever reaches the provider."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam
from sqlalchemy import text

from broker.errors import ConfigError
from broker.gateway.provider_keys import FRESH_S, ProviderKeys
from broker.plugin import ProviderConfig, SseParser
from broker.registry import build_providers, load_provider_plugins
from broker.settings import ProviderSettings
from plugins.mock_billing import _prompt_tokens
from plugins.provider_openai import OpenAIWire
from tests.conftest import Broker
from tests.fake_provider import FakeProviderServer
from tests.gateway_support import PIN, POUT, Env, make_env, price
from tests.support import Clock

# One prompt, typed for each SDK (their message types differ though the JSON is the same).
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something short, please."}]
CLAUDE_PROMPT: list[MessageParam] = [{"role": "user", "content": "Say something short, please."}]


@pytest.fixture
def live(make_live_broker: Callable[..., Broker], db_url: str, fake: FakeProviderServer) -> Env:
    return make_env(make_live_broker, db_url, fake)


@pytest.fixture
def live_sqlite(make_live_broker: Callable[..., Broker], sqlite_url: str,
                fake: FakeProviderServer) -> Env:
    return make_env(make_live_broker, sqlite_url, fake)


@pytest.fixture
def zero_input(make_live_broker: Callable[..., Broker], sqlite_url: str,
               fake: FakeProviderServer) -> Env:
    """Input is free and an output token costs one micro: a slice of N pays for N tokens."""
    return make_env(make_live_broker, sqlite_url, fake, pin=0, pout=1_000_000)


def _openai(env: Env, token: str) -> openai.OpenAI:
    assert env.broker.url
    return env.broker.opened(
        openai.OpenAI(base_url=env.broker.url + "/v1", api_key=token, max_retries=0))


def _anthropic(env: Env, token: str) -> anthropic.Anthropic:
    assert env.broker.url
    return env.broker.opened(
        anthropic.Anthropic(base_url=env.broker.url, api_key=token, max_retries=0))


# --- the happy paths, with the money checked to the micro --------------------------------


def test_chat_completion_is_paid_with_the_vault_key_and_priced_exactly(live: Env) -> None:
    token = live.token(budget=1_000_000)
    raw = _openai(live, token).chat.completions.with_raw_response.create(
        model="gpt-test", messages=PROMPT, max_tokens=8)
    completion = raw.parse()
    assert completion.choices[0].message.content == "w0 w1 w2 w3 w4 w5 w6 w7"
    assert completion.usage is not None
    cost = price(completion.usage.prompt_tokens, completion.usage.completion_tokens)
    assert int(raw.headers["x-broker-cost-micros"]) == cost
    assert int(raw.headers["x-broker-budget-remaining-micros"]) == 1_000_000 - cost

    assert live.fake.state.received_keys == [live.key]
    assert token not in str(live.fake.state.requests)
    assert live.fake.state.requests[0]["model"] == "mock-gpt"

    [event] = live.events()
    assert event["request_id"] == raw.headers["x-request-id"]
    assert (event["status"], event["model"], event["provider"]) == ("ok", "gpt-test", "fake-openai")
    assert (event["prompt_tokens"], event["completion_tokens"]) == (
        completion.usage.prompt_tokens, 8)
    assert event["cost_micros"] == cost and not event["estimated"] and not event["stream"]
    held = live.slice_of(token)
    assert (held["spent_micros"], held["held_micros"]) == (cost, 0)


def test_anthropic_message_is_paid_with_the_vault_key(live_sqlite: Env) -> None:
    env = live_sqlite
    token = env.token()
    raw = _anthropic(env, token).messages.with_raw_response.create(
        model="claude-test", max_tokens=5, messages=CLAUDE_PROMPT)
    message = raw.parse()
    [block] = message.content
    assert isinstance(block, anthropic.types.TextBlock) and block.text == "w0 w1 w2 w3 w4"
    assert int(raw.headers["x-broker-cost-micros"]) == price(message.usage.input_tokens, 5)
    assert env.fake.state.received_keys == [env.key]
    assert env.fake.state.requests[0]["max_tokens"] == 5


def test_a_body_that_is_not_json_is_an_anthropic_invalid_request(live_sqlite: Env) -> None:
    env = live_sqlite
    assert env.broker.url
    resp = httpx.post(env.broker.url + "/v1/messages", content=b"model=claude-test",
                      headers={"x-api-key": env.token(), "anthropic-version": "2023-06-01",
                               "content-type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 415
    assert resp.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                      "message": "send application/json"}}


def test_client_credentials_never_reach_the_provider(live_sqlite: Env) -> None:
    env = live_sqlite
    token = env.token()
    body = {"model": "claude-test", "max_tokens": 3, "messages": PROMPT}
    resp = httpx.post(f"{env.broker.url}/v1/messages", json=body, headers={
        "x-api-key": token, "authorization": f"Bearer {token}", "cookie": f"session={token}",
        "anthropic-version": "2023-06-01"})
    assert resp.status_code == 200, resp.text
    assert env.fake.state.received_keys == [env.key]


def test_openai_stream_is_metered_though_the_client_did_not_ask(live_sqlite: Env) -> None:
    env = live_sqlite
    token = env.token()
    chunks = list(_openai(env, token).chat.completions.create(
        model="gpt-test", messages=PROMPT, max_tokens=6, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "w0 w1 w2 w3 w4 w5")
    assert all(c.usage is None for c in chunks)  # the usage chunk was stripped
    assert env.fake.state.requests[0]["stream_options"] == {"include_usage": True}
    [event] = env.wait_for_events(1)
    prompt = _prompt_tokens(env.fake.state.requests[0])
    assert (event["status"], event["stream"], event["estimated"]) == ("ok", 1, 0)
    assert (event["prompt_tokens"], event["completion_tokens"]) == (prompt, 6)
    assert event["cost_micros"] == price(prompt, 6)
    assert env.slice_of(token)["spent_micros"] == price(prompt, 6)


def test_openai_stream_keeps_the_usage_chunk_the_client_asked_for(live_sqlite: Env) -> None:
    env = live_sqlite
    chunks = list(_openai(env, env.token()).chat.completions.create(
        model="gpt-test", messages=PROMPT, max_tokens=2, stream=True,
        stream_options={"include_usage": True}))
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 2


def test_anthropic_stream_is_metered(live_sqlite: Env) -> None:
    env = live_sqlite
    with _anthropic(env, env.token()).messages.stream(
            model="claude-test", max_tokens=4, messages=CLAUDE_PROMPT) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens == 4
    [event] = env.wait_for_events(1)
    assert (event["status"], event["completion_tokens"], event["estimated"]) == ("ok", 4, 0)
    assert event["cost_micros"] == price(final.usage.input_tokens, 4)


def test_embeddings_are_metered(live_sqlite: Env) -> None:
    env = live_sqlite
    raw = _openai(env, env.token()).embeddings.with_raw_response.create(
        model="embed-test", input=["one text", "another text"])
    result = raw.parse()
    assert len(result.data) == 2
    assert int(raw.headers["x-broker-cost-micros"]) == price(result.usage.prompt_tokens, 0)
    [event] = env.events()
    assert (event["model"], event["completion_tokens"]) == ("embed-test", 0)


def test_openai_compatible_provider_limits_with_max_tokens(live_sqlite: Env) -> None:
    env = live_sqlite
    resp = _openai(env, env.token()).chat.completions.create(model="compat-test", messages=PROMPT)
    assert resp.choices[0].message.content is not None
    assert env.fake.state.received_keys == [env.key]
    assert env.fake.state.requests[0]["max_tokens"] == 4096
    assert "max_completion_tokens" not in env.fake.state.requests[0]


def test_a_provider_without_a_vault_path_gets_no_credentials() -> None:
    config = ProviderConfig("local", "openai-compatible", "http://127.0.0.1:1/v1", 1.0, False)
    request = OpenAIWire(config, "http://127.0.0.1:1/v1").build_request(
        "chat", {"model": "m", "messages": []}, key="",
        client_headers={"authorization": "Bearer client-token", "x-api-key": "client-token"})
    assert "authorization" not in request.headers and "x-api-key" not in request.headers


def test_mock_provider_answers_in_process(live_sqlite: Env) -> None:
    env = live_sqlite
    client = _openai(env, env.token())
    resp = client.chat.completions.create(model="mock-gpt", messages=PROMPT, max_tokens=3)
    assert resp.choices[0].message.content == "w0 w1 w2"
    chunks = client.chat.completions.create(model="mock-gpt", messages=PROMPT, max_tokens=2,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "w0 w1"
    message = _anthropic(env, env.token()).messages.create(
        model="mock-claude", max_tokens=2, messages=CLAUDE_PROMPT)
    assert message.usage.output_tokens == 2
    assert env.fake.state.requests == []  # never left the process
    assert [e["status"] for e in env.wait_for_events(3)] == ["ok", "ok", "ok"]


def test_models_lists_what_the_token_may_use(live_sqlite: Env) -> None:
    env = live_sqlite
    token = env.token(models=["gpt-*"])
    names = sorted(m.id for m in _openai(env, token).models.list())
    assert names == ["gpt-other", "gpt-test"]
    anthropic_names = [m.id for m in _anthropic(env, token).models.list()]
    assert sorted(anthropic_names) == ["gpt-other", "gpt-test"]


# --- refusals: nothing reaches the provider, nothing is held ----------------------------


def test_model_outside_the_token_is_refused(live_sqlite: Env) -> None:
    env = live_sqlite
    token = env.token()
    with pytest.raises(openai.PermissionDeniedError) as info:
        _openai(env, token).chat.completions.create(model="gpt-other", messages=PROMPT)
    assert info.value.code == "model_not_allowed"
    with pytest.raises(anthropic.PermissionDeniedError):
        _anthropic(env, token).messages.create(model="gpt-other", max_tokens=5, messages=CLAUDE_PROMPT)
    assert env.fake.state.requests == [] and env.events() == []
    assert env.slice_of(token)["held_micros"] == 0


def test_narrowed_scope_is_enforced(live_sqlite: Env) -> None:
    env = live_sqlite
    agent = env.agent()
    token = env.broker.token(agent["client_id"], agent["client_secret"], scope="claude-test")
    with pytest.raises(openai.PermissionDeniedError):
        _openai(env, token).chat.completions.create(model="gpt-test", messages=PROMPT)


def test_unknown_model_is_not_found(live_sqlite: Env) -> None:
    env = live_sqlite
    with pytest.raises(openai.NotFoundError) as info:
        _openai(env, env.token()).chat.completions.create(model="no-such-model", messages=PROMPT)
    assert info.value.code == "model_not_found"


def test_model_needing_approval_is_refused(live_sqlite: Env) -> None:
    env = live_sqlite
    token = env.token(approval_models=["o1*"])
    with pytest.raises(openai.PermissionDeniedError) as info:
        _openai(env, token).chat.completions.create(model="o1-test", messages=PROMPT)
    assert info.value.code == "approval_required"
    assert env.fake.state.requests == []


@pytest.mark.parametrize("token", ["", "not-a-jwt", "a.b.c"], ids=["empty", "opaque", "junk"])
def test_bad_token_is_refused_in_each_dialect(live_sqlite: Env, token: str) -> None:
    env = live_sqlite
    url = env.broker.url
    bearer = {"authorization": f"Bearer {token}"} if token else {}
    resp = httpx.post(f"{url}/v1/chat/completions", json={"model": "gpt-test", "messages": PROMPT},
                      headers=bearer)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key"
    resp = httpx.post(f"{url}/v1/messages", headers={"x-api-key": token} if token else {},
                      json={"model": "claude-test", "max_tokens": 5, "messages": PROMPT})
    assert resp.status_code == 401
    assert resp.json() == {"type": "error", "error": {"type": "authentication_error",
                                                      "message": resp.json()["error"]["message"]}}
    assert env.fake.state.requests == []


@pytest.mark.parametrize("body", [
    pytest.param({"messages": PROMPT}, id="no-model"),
    pytest.param({"model": "gpt-test", "messages": PROMPT, "max_tokens": 0}, id="zero-limit"),
    pytest.param({"model": "gpt-test", "messages": PROMPT, "max_tokens": "9"}, id="string-limit"),
    pytest.param({"model": "gpt-test", "messages": PROMPT, "n": 0}, id="zero-choices"),
    pytest.param({"model": "gpt-test", "messages": PROMPT, "stream": "yes"}, id="stream-string"),
    pytest.param({"model": "gpt-test", "messages": PROMPT, "stream": True,
                  "stream_options": "x"}, id="stream-options"),
    pytest.param({"model": "claude-test", "messages": PROMPT}, id="wrong-route"),
])
def test_malformed_requests_are_refused_before_any_hold(live_sqlite: Env,
                                                        body: dict[str, Any]) -> None:
    env = live_sqlite
    token = env.token()
    resp = httpx.post(f"{env.broker.url}/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert env.fake.state.requests == [] and env.events() == []
    assert env.slice_of(token)["held_micros"] == 0


# --- the slice is a hard wall ------------------------------------------------------------


def test_output_limit_is_lowered_to_what_the_slice_pays_for(zero_input: Env) -> None:
    env = zero_input
    token = env.token(budget=5)
    client = _openai(env, token)
    resp = client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=1000)
    assert env.fake.state.requests[0]["max_tokens"] == 5
    assert resp.choices[0].message.content == "w0 w1 w2 w3 w4"
    assert resp.choices[0].finish_reason == "length"
    assert env.slice_of(token)["spent_micros"] == 5


def test_output_limit_is_set_when_the_client_sent_none(zero_input: Env) -> None:
    env = zero_input
    token = env.token(budget=3)
    _openai(env, token).chat.completions.create(model="gpt-test", messages=PROMPT)
    assert env.fake.state.requests[0]["max_completion_tokens"] == 3
    _anthropic(env, env.token(budget=7)).messages.create(
        model="claude-test", max_tokens=4000, messages=CLAUDE_PROMPT)
    assert env.fake.state.requests[1]["max_tokens"] == 7


def test_several_answers_share_the_slice(zero_input: Env) -> None:
    env = zero_input
    resp = _openai(env, env.token(budget=10)).chat.completions.create(
        model="gpt-test", messages=PROMPT, n=3, max_tokens=100)
    assert env.fake.state.requests[0]["max_tokens"] == 3  # 3 answers x 3 tokens <= 10
    assert resp.usage is not None


def test_a_slice_that_cannot_pay_for_one_token_is_refused(live_sqlite: Env) -> None:
    env = live_sqlite
    token = env.token(budget=2)  # the input alone costs more
    with pytest.raises(openai.RateLimitError) as info:
        _openai(env, token).chat.completions.create(model="gpt-test", messages=PROMPT)
    assert info.value.code == "insufficient_quota"
    with pytest.raises(anthropic.RateLimitError):
        _anthropic(env, token).messages.create(model="claude-test", max_tokens=1, messages=CLAUDE_PROMPT)
    assert env.fake.state.requests == [] and env.events() == []


def test_spending_stops_exactly_at_the_slice(zero_input: Env) -> None:
    env = zero_input
    token = env.token(budget=10)
    client = _openai(env, token)
    for _ in range(3):
        client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=3)
    last = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=PROMPT, max_tokens=3)
    assert last.parse().choices[0].message.content == "w0"  # clamped to the last micro
    assert last.headers["x-broker-budget-remaining-micros"] == "0"
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=3)
    assert sum(e["cost_micros"] for e in env.events()) == env.slice_of(token)["spent_micros"] == 10


def test_rate_limit_refuses_before_any_hold(live_sqlite: Env) -> None:
    env = live_sqlite
    token = env.token(rate={"rpm": 2})
    client = _openai(env, token)
    for _ in range(2):
        client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=1)
    assert info.value.code == "rate_limit_exceeded"
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert len(env.fake.state.requests) == len(env.events()) == 2
    assert env.slice_of(token)["held_micros"] == 0


def test_gateway_routes_are_in_the_openapi_document(live_sqlite: Env) -> None:
    paths = live_sqlite.broker.client.get("/openapi.json").json()["paths"]
    for path in ("/v1/models", "/v1/chat/completions", "/v1/embeddings", "/v1/messages"):
        assert path in paths
    assert paths["/v1/messages"]["post"]["requestBody"]


# --- keys from Vault ---------------------------------------------------------------------


def test_a_new_key_version_is_used_without_restart(live_sqlite: Env) -> None:
    """A key written to Vault is used once the cached one is ``FRESH_S`` old. The gateway's
    key cache runs on a clock the test moves, instead of the test waiting on the real one."""
    env = live_sqlite
    svc, clock = env.broker.services, Clock()
    env.gateway.keys = ProviderKeys(
        svc.vault, {name: p.vault_path for name, p in svc.settings.providers.items()},
        max_stale_s=svc.settings.vault.max_stale_s, clock=clock)
    client = _openai(env, env.token())
    client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=1)
    old = env.key
    env.write_key("sk-fake-rotated-" + old[-6:])
    env.fake.state.valid_keys = {old, env.key}
    client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=1)
    assert env.fake.state.received_keys[-1] == old  # still fresh: the cached key
    clock.advance(FRESH_S)
    client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=1)
    assert env.fake.state.received_keys[-1] == env.key
    env.fake.state.valid_keys = {env.key}  # the old key is not needed any more
    client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=1)
    assert env.fake.state.received_keys[-1] == env.key


# --- configuration and plugins -----------------------------------------------------------


def test_a_provider_without_its_plugin_stops_the_start() -> None:
    with pytest.raises(ConfigError, match=r"providers\.local\.plugin.*'vllm'"):
        build_providers({"local": ProviderSettings(plugin="vllm")})


@pytest.mark.parametrize(("table", "key"), [
    ({"plugin": "openai"}, "providers.p.vault_path"),
    ({"plugin": "openai-compatible"}, "providers.p.base_url"),
    ({"plugin": "anthropic", "vault_path": "x", "base_url": "ftp://h"}, "providers.p.base_url"),
])
def test_a_bad_provider_table_names_its_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_providers({"p": ProviderSettings(**table)})


def test_every_shipped_plugin_is_discovered() -> None:
    assert {"openai", "anthropic", "openai-compatible", "mock"} <= set(load_provider_plugins())


def test_a_duplicate_or_broken_plugin_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint

    import broker.registry

    def group(*eps: EntryPoint) -> Callable[..., tuple[EntryPoint, ...]]:
        return lambda **_: eps

    good = EntryPoint("openai", "plugins.provider_openai:plugin", "broker.providers")
    twin = EntryPoint("openai", "plugins.provider_mock:plugin", "broker.providers")
    broken = EntryPoint("bad", "plugins.no_such_module:plugin", "broker.providers")
    monkeypatch.setattr(broker.registry, "entry_points", group(good, twin))
    with pytest.raises(ConfigError, match="openai"):
        load_provider_plugins()
    monkeypatch.setattr(broker.registry, "entry_points", group(good, broken))
    with pytest.raises(ConfigError, match=r"bad.*failed to load"):
        load_provider_plugins()


# --- wire-format units -------------------------------------------------------------------


def test_sse_framing_survives_any_split() -> None:
    stream = (b"event: a\r\ndata: {\"x\": 1}\r\n\r\n: comment\n\ndata: [DONE]\n\n")
    for cut in range(len(stream)):
        parser = SseParser()
        events = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        data = [e.data for e in events if e.data]
        assert data == ['{"x": 1}', "[DONE]"], cut
        assert events[0].event == "a"


def test_price_math_rounds_up() -> None:
    assert price(1, 0) == math.ceil(PIN / 1_000_000) == 2
    assert price(0, 1) == math.ceil(POUT / 1_000_000) == 3


def test_a_token_revoked_in_the_ledger_is_refused_before_the_denylist_hears_of_it(
        live_sqlite: Env) -> None:
    """Another replica's suspension reaches this one's denylist within a second; in between,
    the ledger already refuses the token's hold, and the answer is the revoked token's 401
    (not a 429 about money), in the gateway and at introspection."""
    env = live_sqlite
    token = env.token()
    jti = env.slice_of(token)["jti"]
    with env.broker.services.db.engine.begin() as conn:
        conn.execute(text("UPDATE token_slice SET revoked_at = 1 WHERE jti = :j"), {"j": jti})
    with pytest.raises(openai.AuthenticationError):
        _openai(env, token).chat.completions.create(model="gpt-test", messages=PROMPT)
    assert env.fake.state.requests == []
    seen = env.broker.client.post("/v1/introspect", data={"token": token},
                                  headers=env.broker.admin())
    assert seen.json() == {"active": False}
