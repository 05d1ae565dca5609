"""The slice holds against hostile requests: the provider never bills past a token's slice, and
the ledger equals the provider's bill to the micro-dollar.

The fake provider bills like a real tokenizer here (every string of the body at any depth, one
token per four ASCII characters and one per other character) and keeps a bill per request, so
each test compares the broker's ledger with what the provider charged. Each test is named for
a finding of the attack on the landed code that it closes.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from broker.gateway import calls as gateway_module
from broker.money.limits import InMemoryLimiter
from tests.conftest import Broker
from tests.fake_provider import FakeProviderServer
from tests.gateway_support import PIN, POUT, Env, make_env, price
from tests.support import wait_for

PROMPT = [{"role": "user", "content": "Write something long."}]
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}


@pytest.fixture
def fake(fake: FakeProviderServer) -> FakeProviderServer:
    """The shared fake provider, billing like a real tokenizer (see above)."""
    fake.state.billing = "tokenizer"
    return fake


def _settled(env: Env, calls: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """The usage events of ``calls`` calls, once the provider has stopped billing them all."""

    def settled() -> bool:
        return len(env.events()) >= calls and all(b.ended for b in list(env.fake.state.bills))

    wait_for(settled, timeout_s, what=lambda: f"{calls} settled calls (events: "
             f"{len(env.events())}, bills ended: {[b.ended for b in env.fake.state.bills]})")
    return env.events()


def _openai(env: Env, token: str, body: dict[str, Any]) -> httpx.Response:
    assert env.broker.url
    return httpx.post(f"{env.broker.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {token}"})


def _anthropic(env: Env, token: str, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> httpx.Response:
    assert env.broker.url
    return httpx.post(f"{env.broker.url}/v1/messages", json=body, timeout=60,
                      headers={"x-api-key": token, **ANTHROPIC_HEADERS, **(headers or {})})


def _nested_schema(depth: int, description: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "description": description}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"inner": schema}}
    return schema


# --- finding 1: the hold is a bound, and the charge is the bill ----------------------------


def _hostile(i: int) -> tuple[str, dict[str, Any]]:
    """One of the attack's vectors, varied by ``i``."""
    cjk = "漢字" * (200 + i)
    long = "describe " * (300 + i)
    kind = i % 6
    if kind == 0:  # a tool schema nested deep around a long description
        return "/v1/chat/completions", {
            "model": "gpt-test", "messages": PROMPT, "max_tokens": 64,
            "tools": [{"type": "function", "function": {
                "name": "f", "parameters": _nested_schema(22, long)}}]}
    if kind == 1:  # an Anthropic text document, far above the old flat 1,600-token allowance
        return "/v1/messages", {
            "model": "claude-test", "max_tokens": 64, "messages": [{"role": "user", "content": [
                {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                "data": cjk * 6}},
                {"type": "text", "text": "Summarise."}]}]}
    if kind == 2:  # an Anthropic input_schema nested the same way
        return "/v1/messages", {
            "model": "claude-test", "max_tokens": 64, "messages": PROMPT,
            "tools": [{"name": "f", "input_schema": _nested_schema(22, cjk)}]}
    if kind == 3:  # non-ASCII text, several answers, streamed
        return "/v1/chat/completions", {
            "model": "gpt-test", "messages": [{"role": "user", "content": cjk}], "n": 2,
            "max_tokens": 64, "stream": True}
    if kind == 4:  # an Anthropic stream
        return "/v1/messages", {
            "model": "claude-test", "max_tokens": 64, "stream": True,
            "system": cjk, "messages": PROMPT}
    return "/v1/chat/completions", {  # a prediction, billed as output when rejected
        "model": "gpt-test", "messages": PROMPT, "max_tokens": 64,
        "prediction": {"type": "content", "content": long}}


async def _storm(url: str, token: str, calls: int) -> Counter[str]:
    limits = httpx.Limits(max_connections=calls, max_keepalive_connections=calls)
    headers = {"authorization": f"Bearer {token}", "x-api-key": token, **ANTHROPIC_HEADERS}
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits,
                                 headers=headers) as client:

        async def one(i: int) -> str:
            path, body = _hostile(i)
            resp = await client.post(path, json=body)
            if resp.status_code == 200:
                return "ok"
            error = resp.json()["error"]
            return f"{resp.status_code} {error.get('code') or error.get('type')}"

        return Counter(await asyncio.gather(*(one(i) for i in range(calls))))


def test_100_hostile_requests_in_parallel_never_bill_past_the_slice_and_the_ledger_is_the_bill(
        both: Env) -> None:
    env = both
    env.fake.state.faults.answer_tokens = 64
    env.fake.state.faults.answer_script = "cjk"
    slice_micros = 150_000
    token = env.token(budget=slice_micros)
    assert env.broker.url
    outcomes = asyncio.run(_storm(env.broker.url, token, 100))

    assert set(outcomes) <= {"ok", "429 insufficient_quota", "429 rate_limit_error"}, outcomes
    assert outcomes["ok"] >= 5, outcomes
    events = _settled(env, outcomes["ok"])
    bill = env.fake.state.total_billed(PIN, POUT)
    held = env.slice_of(token)
    assert bill <= slice_micros
    assert sum(e["cost_micros"] for e in events) == bill == held["spent_micros"]
    assert held["held_micros"] == 0
    assert len(events) == len(env.fake.state.bills) == outcomes["ok"]
    assert {e["status"] for e in events} == {"ok"} and not any(e["estimated"] for e in events)


@pytest.mark.parametrize("kind", [0, 1, 2, 5], ids=["tool-schema-22-deep", "text-document",
                                                   "input-schema-22-deep", "prediction"])
def test_each_vector_is_charged_exactly_what_the_provider_billed(env: Env, kind: int) -> None:
    token = env.token(budget=1_000_000)
    path, body = _hostile(kind)
    send = _anthropic if path == "/v1/messages" else _openai
    resp = send(env, token, body)
    assert resp.status_code == 200, resp.text
    [event] = _settled(env, 1)
    assert int(resp.headers["x-broker-cost-micros"]) == event["cost_micros"] == (
        env.fake.state.total_billed(PIN, POUT))
    # The provider counted the deep text: the attack's "ledger 10,950 for a bill of 1.7M" is gone.
    assert event["prompt_tokens"] > 300


@pytest.mark.parametrize(("path", "body", "param"), [
    pytest.param("/v1/chat/completions", {"model": "gpt-test", "messages": PROMPT, "foo": 1},
                 "foo", id="unknown-field"),
    pytest.param("/v1/chat/completions", {"model": "gpt-test", "messages": PROMPT,
                                          "service_tier": "priority"},
                 "service_tier", id="priority-tier-unpriced"),
    pytest.param("/v1/chat/completions", {"model": "gpt-test", "messages": PROMPT,
                                          "tools": [{"type": "web_search"}]},
                 "tools[0]", id="server-tool-unpriced"),
    pytest.param("/v1/chat/completions", {"model": "gpt-test", "messages": [
        {"role": "user", "content": [{"type": "input_audio",
                                      "input_audio": {"data": "UklGRg==", "format": "wav"}}]}]},
        "messages[0].content[0]", id="audio-part"),
    pytest.param("/v1/messages", {"model": "claude-test", "max_tokens": 5, "messages": PROMPT,
                                  "mcp_servers": [{"type": "url", "url": "https://mcp.example",
                                                   "name": "x"}]},
                 "mcp_servers", id="mcp-servers"),
    pytest.param("/v1/messages", {"model": "claude-test", "max_tokens": 5, "messages": PROMPT,
                                  "tools": [{"type": "web_search_20250305", "name": "web_search",
                                             "max_uses": 5}]},
                 "tools[0]", id="anthropic-web-search-unpriced"),
])
def test_what_cannot_be_bounded_is_refused_naming_the_field_and_never_forwarded(
        env: Env, path: str, body: dict[str, Any], param: str) -> None:
    # The policy allows web search; this broker has no price for it (no [tools.web_search]).
    token = env.token(tools=["function", "web_search"])
    send = _anthropic if path == "/v1/messages" else _openai
    resp = send(env, token, body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    if path == "/v1/messages":
        assert error["type"] == "invalid_request_error" and param in error["message"]
    else:
        assert (error["code"], error["param"]) == ("invalid_request", param)
    assert env.fake.state.requests == [] and env.events() == []
    assert env.slice_of(token)["spent_micros"] == 0


@pytest.fixture
def per_token(make_live_broker: Callable[..., Broker], sqlite_url: str,
              fake: FakeProviderServer) -> Env:
    """Input is free and an output token costs one micro."""
    fake.state.billing = "words"
    return make_env(make_live_broker, sqlite_url, fake, pin=0, pout=1_000_000)


def test_a_provider_billing_above_the_hold_is_charged_in_full_alerted_audited_and_the_token_ends(
        per_token: Env) -> None:
    env = per_token
    env.fake.state.faults.ignore_max_tokens = True  # it answers 1000 tokens whatever the limit
    agent = env.agent(budget=10, budgets=[{"period": "total", "limit_micros": 50}])
    token = env.broker.token(agent["client_id"], agent["client_secret"])
    resp = _openai(env, token, {"model": "gpt-test", "messages": PROMPT})
    assert resp.status_code == 200
    assert resp.headers["x-broker-cost-micros"] == "1000"
    [event] = env.events()
    assert (event["status"], event["cost_micros"]) == ("overrun", 1000)
    # The budgets above the slice are debited past their limits, visibly.
    [counter] = env.query("SELECT reserved_micros, spent_micros FROM budget_counter "
                          "WHERE scope = 'workload' AND scope_id = :w", w=agent["id"])
    assert (counter["reserved_micros"], counter["spent_micros"]) == (0, 1000)
    # Audited, counted, and the token is refused from then on, with no further provider call.
    audit = env.query("SELECT actor, detail FROM audit_event WHERE action = 'usage.overrun'")
    assert len(audit) == 1 and audit[0]["actor"] == "broker:overrun"
    metrics = env.broker.client.get("/metrics").text
    assert 'broker_overruns_total{provider="fake-openai"} 1.0' in metrics
    again = _openai(env, token, {"model": "gpt-test", "messages": PROMPT})
    assert again.status_code == 401 and again.json()["error"]["code"] == "invalid_api_key"
    assert len(env.fake.state.requests) == 1
    # The rate limiter learned the real tokens, not the hold's.
    limiter = env.gateway.limiter
    assert isinstance(limiter, InMemoryLimiter)  # the default: it can tell what it counted
    usage = limiter.usage(agent["id"], asyncio.run(env.gateway.policy(agent["id"])), time.time())
    assert usage.tokens >= 1000


# --- finding 2: a stream the client leaves is charged the provider's own count -------------


@pytest.mark.parametrize(("path", "model"), [("/v1/messages", "claude-test"),
                                             ("/v1/chat/completions", "compat-test")])
def test_a_cjk_stream_abandoned_before_its_final_usage_is_charged_the_provider_count(
        env: Env, path: str, model: str) -> None:
    env.fake.state.faults.answer_script = "cjk"  # one token per character
    env.fake.state.faults.answer_tokens = 300
    env.fake.state.faults.chunk_delay_s = 0.002
    token = env.token()
    body = {"model": model, "max_tokens": 300, "stream": True, "messages": PROMPT}
    assert env.broker.url
    deltas = 0
    with httpx.stream("POST", env.broker.url + path, json=body, timeout=60,
                      headers={"authorization": f"Bearer {token}", "x-api-key": token,
                               **ANTHROPIC_HEADERS}) as resp:
        for line in resp.iter_lines():
            deltas += "delta" in line
            if deltas == 20:
                break  # hang up long before message_delta / the usage chunk
    [event] = _settled(env, 1)
    assert event["status"] == "client_disconnected" and not event["estimated"]
    assert event["completion_tokens"] == 300
    assert event["cost_micros"] == env.fake.state.total_billed(PIN, POUT)


def test_a_stream_whose_usage_never_comes_is_charged_no_less_than_the_bill(env: Env) -> None:
    env.fake.state.faults.answer_script = "cjk"
    env.fake.state.faults.answer_tokens = 200
    env.fake.state.faults.omit_final_usage = True
    token = env.token()
    assert env.broker.url
    with httpx.stream("POST", env.broker.url + "/v1/messages", timeout=60,
                      json={"model": "claude-test", "max_tokens": 200, "stream": True,
                            "messages": PROMPT},
                      headers={"x-api-key": token, **ANTHROPIC_HEADERS}) as resp:
        resp.read()
    [event] = _settled(env, 1)
    assert event["estimated"]
    assert env.fake.state.total_billed(PIN, POUT) <= event["cost_micros"]
    assert event["completion_tokens"] <= 200  # never above the limit the broker set


# --- finding 3: price-changing fields are priced or refused --------------------------------


def _with_models(sections: dict[str, dict[str, Any]]) -> None:
    prices = {"input_micros_per_mtok": PIN, "output_micros_per_mtok": POUT}
    sections["models"]["gpt-priority"] = {"provider": "fake-openai", "upstream_model": "mock-gpt",
                                          "service_tier_percent": {"priority": 200}, **prices}
    sections["models"]["gpt-cached"] = {"provider": "fake-openai", "upstream_model": "mock-gpt",
                                        "cached_input_micros_per_mtok": PIN // 10, **prices}
    sections["providers"]["fake-anthropic"]["allowed_beta"] = ["extended-cache-ttl-2025-04-11"]


@pytest.fixture
def priced(make_live_broker: Callable[..., Broker], sqlite_url: str,
           fake: FakeProviderServer) -> Env:
    return make_env(make_live_broker, sqlite_url, fake, adjust=_with_models)


def test_a_priority_service_tier_is_charged_at_its_configured_price(priced: Env) -> None:
    env = priced
    token = env.token(models=["gpt-priority"])
    resp = _openai(env, token, {"model": "gpt-priority", "messages": PROMPT,
                                "service_tier": "priority", "max_tokens": 10})
    assert resp.status_code == 200, resp.text
    [bill] = env.fake.state.bills
    expected = math.ceil(2 * (bill.prompt_tokens * PIN + bill.completion_tokens * POUT) / 10**6)
    assert int(resp.headers["x-broker-cost-micros"]) == expected


def test_cache_reads_are_charged_at_the_invoice_price(priced: Env) -> None:
    env = priced
    env.fake.state.faults.cache_read_tokens = 5
    token = env.token(models=["gpt-cached"])
    resp = _openai(env, token, {"model": "gpt-cached", "messages": PROMPT, "max_tokens": 10})
    assert resp.status_code == 200, resp.text
    assert int(resp.headers["x-broker-cost-micros"]) == env.fake.state.total_billed(
        PIN, POUT, cache_read=PIN // 10)


def test_an_anthropic_beta_outside_the_allow_list_is_refused(priced: Env) -> None:
    env = priced
    token = env.token()
    body = {"model": "claude-test", "max_tokens": 10, "messages": PROMPT}
    refused = _anthropic(env, token, body, {"anthropic-beta": "output-128k-2025-02-19"})
    assert refused.status_code == 400 and "anthropic-beta" in refused.json()["error"]["message"]
    assert env.fake.state.requests == []
    allowed = _anthropic(env, token, body, {"anthropic-beta": "extended-cache-ttl-2025-04-11"})
    assert allowed.status_code == 200, allowed.text


def test_one_hour_cache_writes_are_held_and_charged_at_twice_the_input(priced: Env) -> None:
    env = priced
    token = env.token()
    body = {"model": "claude-test", "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "A long shared context. " * 40,
         "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]}
    resp = _anthropic(env, token, body, {"anthropic-beta": "extended-cache-ttl-2025-04-11"})
    assert resp.status_code == 200, resp.text
    [bill] = env.fake.state.bills
    assert bill.cache_write_1h_tokens > 0
    assert int(resp.headers["x-broker-cost-micros"]) == env.fake.state.total_billed(PIN, POUT)
    [event] = env.events()
    assert event["status"] == "ok"  # within the hold: the hold priced the write at 2x too


# --- finding 10: a stream cannot outlive its token or the broker's cap ---------------------


def _stream_lines(env: Env, token: str, body: dict[str, Any]) -> list[str]:
    assert env.broker.url
    with httpx.stream("POST", env.broker.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {token}"}) as resp:
        return list(resp.iter_lines())


def test_a_stream_ends_at_gateway_max_stream_s_and_settles_once(
        make_live_broker: Callable[..., Broker], sqlite_url: str,
        fake: FakeProviderServer) -> None:
    env = make_env(make_live_broker, sqlite_url, fake,
                   adjust=lambda s: s.setdefault("gateway", {}).update(max_stream_s=1))
    env.fake.state.faults.answer_tokens = 100
    env.fake.state.faults.chunk_delay_s = 0.1  # ten seconds of answer
    token = env.token()
    started = time.monotonic()
    lines = _stream_lines(env, token, {"model": "gpt-test", "messages": PROMPT, "stream": True})
    assert time.monotonic() - started < 8
    assert any("stream_time_limit" in line for line in lines)
    [event] = _settled(env, 1)
    assert event["status"] == "expired" and event["estimated"]
    assert event["cost_micros"] >= env.fake.state.total_billed(PIN, POUT)
    assert env.slice_of(token)["held_micros"] == 0


def test_a_stream_ends_at_its_token_expiry(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    # With no leeway, a token of two seconds: the stream must stop then, not run on.
    monkeypatch.setattr(gateway_module, "LEEWAY_S", 0)
    env.fake.state.faults.answer_tokens = 100
    env.fake.state.faults.chunk_delay_s = 0.1
    agent = env.agent()
    token = env.broker.token(agent["client_id"], agent["client_secret"], ttl_s=2)
    lines = _stream_lines(env, token, {"model": "gpt-test", "messages": PROMPT, "stream": True})
    assert any("stream_time_limit" in line for line in lines)
    words = [line for line in lines if line.startswith("data: {") and '"content":"' in line
             and json.loads(line[6:]).get("choices")]
    assert len(words) < 60
    [event] = _settled(env, 1)
    assert event["status"] == "expired"


def test_the_price_helper_matches_the_fake_bill() -> None:
    # The reference both sides use: one rounding per call.
    assert price(1, 0) == math.ceil(PIN / 10**6)
