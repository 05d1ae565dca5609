"""Every way a call can fail settles once and releases the rest of its hold, with one usage event
whose status says what happened: zero when the provider never took the request; the provider's
own count when it reported one; otherwise a bound that is never below the bill (the input bound
or the reported input, and the output seen counted as one token per byte, capped by the hold;
the whole hold when the request was sent and nothing is known); and everything the provider
billed, even above the hold."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anthropic
import anyio
import httpx
import jwt
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from broker.errors import LedgerUnavailable
from broker.gateway.calls import Gateway
from broker.gateway.stream import MeteredStream
from broker.tokens import tokens
from plugins.mock_billing import _prompt_tokens
from tests.conftest import Broker
from tests.fake_provider import FakeProviderServer, free_port
from tests.gateway_support import Env, make_env, price

# One prompt, typed for each SDK (their message types differ though the JSON is the same).
PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me a long story about failures."}]
CLAUDE_PROMPT: list[MessageParam] = [{"role": "user", "content": "Tell me a long story about failures."}]


@pytest.fixture
def per_token(make_live_broker: Callable[..., Broker], sqlite_url: str,
              fake: FakeProviderServer) -> Env:
    """Input is free and an output token costs one micro."""
    return make_env(make_live_broker, sqlite_url, fake, pin=0, pout=1_000_000)


def _openai(env: Env, token: str) -> openai.OpenAI:
    return env.broker.opened(
        openai.OpenAI(base_url=f"{env.broker.url}/v1", api_key=token, max_retries=0))


def _anthropic(env: Env, token: str) -> anthropic.Anthropic:
    return env.broker.opened(
        anthropic.Anthropic(base_url=env.broker.url or "", api_key=token, max_retries=0))


def _content(line: str) -> str:
    """The text a chat-completion stream line carries ("" for anything else)."""
    if not line.startswith("data: {"):
        return ""
    choices = json.loads(line[6:]).get("choices") or [{}]
    return str(choices[0].get("delta", {}).get("content") or "")


def _only_event(env: Env, token: str) -> dict[str, Any]:
    [event] = env.wait_for_events(1)
    held = env.slice_of(token)
    assert held["held_micros"] == 0, "the hold was released"
    assert held["spent_micros"] == event["cost_micros"]
    return event


def _assert_paid_for(event: dict[str, Any], prompt: int, completion: int) -> None:
    assert (event["prompt_tokens"], event["completion_tokens"]) == (prompt, completion)
    assert event["cost_micros"] == price(prompt, completion)


def _assert_bounded(env: Env, event: dict[str, Any], *, prompt_at_least: int,
                    completion_at_least: int) -> None:
    """An estimated charge: never below what the provider can have billed, never above the
    limit the broker set, and priced exactly as its counts say."""
    assert event["estimated"]
    assert event["prompt_tokens"] >= prompt_at_least
    limit = env.fake.state.requests[-1]["max_completion_tokens"]
    assert completion_at_least <= event["completion_tokens"] <= limit
    assert event["cost_micros"] == price(event["prompt_tokens"], event["completion_tokens"])


# --- the provider never took the request: nothing is charged ----------------------------


def test_provider_5xx_costs_nothing(both: Env) -> None:
    env = both
    env.fake.state.faults.status = 500
    token = env.token()
    with pytest.raises(openai.InternalServerError) as info:
        _openai(env, token).chat.completions.create(model="gpt-test", messages=PROMPT)
    assert info.value.status_code == 502 and info.value.code == "upstream_error"
    event = _only_event(env, token)
    assert (event["status"], event["cost_micros"]) == ("upstream_error", 0)


def test_provider_5xx_before_a_stream_costs_nothing(env: Env) -> None:
    env.fake.state.faults.status = 529
    token = env.token()
    client = _anthropic(env, token)
    with (pytest.raises(anthropic.APIStatusError) as info,
          client.messages.stream(model="claude-test", max_tokens=5, messages=CLAUDE_PROMPT) as s):
        s.get_final_message()
    assert info.value.status_code == 502
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["type"] == "api_error"
    assert _only_event(env, token)["cost_micros"] == 0


def test_connection_refused_costs_nothing(make_live_broker: Callable[..., Broker],
                                          sqlite_url: str, fake: FakeProviderServer) -> None:
    env = make_env(make_live_broker, sqlite_url, fake,
                   openai_url=f"http://127.0.0.1:{free_port()}/v1")
    token = env.token()
    with pytest.raises(openai.InternalServerError) as info:
        _openai(env, token).chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
    assert info.value.status_code == 502 and info.value.code == "upstream_error"
    event = _only_event(env, token)
    assert (event["status"], event["cost_micros"], event["prompt_tokens"]) == (
        "upstream_error", 0, 0)


def test_provider_refusing_the_broker_key_is_an_upstream_error(env: Env) -> None:
    env.fake.state.valid_keys = {"sk-some-other-key"}
    token = env.token()
    with pytest.raises(openai.InternalServerError) as info:
        _openai(env, token).chat.completions.create(model="gpt-test", messages=PROMPT)
    assert info.value.status_code == 502 and info.value.code == "upstream_error"
    assert env.key not in str(info.value.body)
    assert _only_event(env, token)["cost_micros"] == 0


def test_provider_refusing_the_request_is_relayed_and_costs_nothing(env: Env) -> None:
    env.fake.state.faults.status = 400
    token = env.token()
    with pytest.raises(openai.BadRequestError) as info:
        _openai(env, token).chat.completions.create(model="gpt-test", messages=PROMPT)
    assert "Injected fault" in str(info.value)
    event = _only_event(env, token)
    assert (event["status"], event["cost_micros"]) == ("upstream_rejected", 0)


def test_provider_rate_limit_is_a_rate_limit(env: Env) -> None:
    env.fake.state.faults.status = 429
    token = env.token()
    with pytest.raises(openai.RateLimitError) as info:
        _openai(env, token).chat.completions.create(model="gpt-test", messages=PROMPT)
    assert info.value.code == "rate_limit_exceeded"
    assert _only_event(env, token)["cost_micros"] == 0


# --- the provider took the request: at least the input is paid ---------------------------


def test_timeout_after_the_request_was_sent_pays_the_whole_hold(
        make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer) -> None:
    # The provider may well have answered in full after the broker stopped waiting: only the
    # hold is sure to cover what it bills.
    env = make_env(make_live_broker, sqlite_url, fake, timeout_s=0.5)
    env.fake.state.faults.delay_s = 5
    token = env.token()
    with pytest.raises(openai.APIStatusError) as info:
        _openai(env, token).chat.completions.create(model="gpt-test", messages=PROMPT)
    assert info.value.status_code == 504 and info.value.code == "upstream_timeout"
    event = _only_event(env, token)
    assert event["status"] == "upstream_timeout" and event["estimated"]
    limit = env.fake.state.requests[0]["max_completion_tokens"]
    assert event["prompt_tokens"] >= _prompt_tokens({"messages": PROMPT})
    _assert_paid_for(event, event["prompt_tokens"], limit)


def test_response_without_usage_is_estimated(env: Env) -> None:
    env.fake.state.faults.omit_usage = True
    token = env.token()
    raw = _openai(env, token).chat.completions.with_raw_response.create(
        model="gpt-test", messages=PROMPT)
    assert raw.parse().usage is None
    event = _only_event(env, token)
    assert event["status"] == "ok" and event["estimated"]
    assert event["prompt_tokens"] >= _prompt_tokens({"messages": PROMPT})
    assert event["completion_tokens"] >= 16
    assert int(raw.headers["x-broker-cost-micros"]) == event["cost_micros"] == price(
        event["prompt_tokens"], event["completion_tokens"])


def test_stream_without_usage_is_estimated_from_what_was_streamed(env: Env) -> None:
    env.fake.state.faults.omit_usage = True
    token = env.token()
    list(_openai(env, token).chat.completions.create(
        model="gpt-test", messages=PROMPT, max_tokens=7, stream=True))
    event = _only_event(env, token)
    assert event["status"] == "ok" and event["estimated"]
    _assert_paid_for(event, event["prompt_tokens"], 7)


def test_stream_cut_midway_pays_what_was_streamed(both: Env) -> None:
    env = both
    env.fake.state.faults.cut_after_chunks = 5  # the role chunk and four words
    token = env.token()
    received = []
    with pytest.raises(openai.APIError):
        for chunk in _openai(env, token).chat.completions.create(
                model="gpt-test", messages=PROMPT, stream=True):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "w0 w1 w2 w3"
    event = _only_event(env, token)
    assert event["status"] == "stream_cut"
    _assert_bounded(env, event, prompt_at_least=_prompt_tokens({"messages": PROMPT}),
                    completion_at_least=4)


def test_anthropic_stream_cut_pays_the_reported_input(env: Env) -> None:
    env.fake.state.faults.cut_after_chunks = 5  # start, block start, ping, two words
    token = env.token()
    client = _anthropic(env, token)
    with (pytest.raises(anthropic.APIStatusError),
          client.messages.stream(model="claude-test", max_tokens=10, messages=CLAUDE_PROMPT) as s):
        s.get_final_message()
    event = _only_event(env, token)
    assert event["status"] == "stream_cut" and event["estimated"]
    # The input the provider reported stands; the output is the bound of what was streamed.
    assert event["prompt_tokens"] == _prompt_tokens({"messages": PROMPT})
    assert 2 <= event["completion_tokens"] <= 10
    assert event["cost_micros"] == price(event["prompt_tokens"], event["completion_tokens"])


def _hang_up_after_words(env: Env, token: str, words: int) -> None:
    """Read a chat stream until ``words`` words arrived, then close the connection."""
    seen = 0
    with httpx.stream("POST", f"{env.broker.url}/v1/chat/completions",
                      headers={"authorization": f"Bearer {token}"},
                      json={"model": "gpt-test", "messages": PROMPT, "stream": True}) as resp:
        for line in resp.iter_lines():
            seen += bool(_content(line))
            if seen == words:
                return


def test_client_hanging_up_mid_stream_pays_the_count_read_after_it_left(env: Env) -> None:
    # The broker goes on reading, without forwarding, until the provider's own usage arrives.
    env.fake.state.faults.chunk_delay_s = 0.1
    token = env.token()
    _hang_up_after_words(env, token, 3)
    event = _only_event(env, token)
    assert event["status"] == "client_disconnected" and not event["estimated"]
    _assert_paid_for(event, _prompt_tokens({"messages": PROMPT}), 16)


def test_client_hanging_up_past_the_drain_pays_a_bound_of_what_was_streamed(
        make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer) -> None:
    env = make_env(make_live_broker, sqlite_url, fake)
    env.gateway.settings = env.broker.settings.model_copy(
        update={"gateway": env.broker.settings.gateway.model_copy(update={"drain_s": 0})})
    env.fake.state.faults.chunk_delay_s = 0.2
    token = env.token()
    _hang_up_after_words(env, token, 3)
    event = _only_event(env, token)
    assert event["status"] == "client_disconnected"
    _assert_bounded(env, event, prompt_at_least=_prompt_tokens({"messages": PROMPT}),
                    completion_at_least=3)


# --- the hold is a hard wall -------------------------------------------------------------


def test_stream_of_a_provider_ignoring_the_limit_ends_at_the_hold(per_token: Env) -> None:
    env = per_token
    env.fake.state.faults.ignore_max_tokens = True
    token = env.token(budget=10)
    text = "".join(
        c.choices[0].delta.content or "" for c in _openai(env, token).chat.completions.create(
            model="gpt-test", messages=PROMPT, stream=True) if c.choices)
    assert env.fake.state.requests[0]["max_completion_tokens"] == 10
    assert 10 <= len(text.split()) <= 13  # not the 1000 the provider meant to send
    event = _only_event(env, token)
    assert (event["status"], event["cost_micros"]) == ("hold_exceeded", 10)
    assert env.slice_of(token)["spent_micros"] == 10


def test_answer_billed_above_the_hold_is_charged_in_full_and_ends_the_token(
        per_token: Env) -> None:
    env = per_token
    env.fake.state.faults.ignore_max_tokens = True
    token = env.token(budget=10)
    raw = _openai(env, token).chat.completions.with_raw_response.create(
        model="gpt-test", messages=PROMPT)
    # The ledger says what the provider billed, not what the broker had hoped for.
    assert raw.headers["x-broker-cost-micros"] == "1000"
    assert raw.headers["x-broker-budget-remaining-micros"] == str(10 - 1000)
    event = _only_event(env, token)
    assert (event["status"], event["completion_tokens"], event["cost_micros"]) == (
        "overrun", 1000, 1000)
    with pytest.raises(openai.AuthenticationError):
        _openai(env, token).chat.completions.create(model="gpt-test", messages=PROMPT)
    assert len(env.fake.state.requests) == 1


# --- revocation, a lost ledger, cancellation ---------------------------------------------


class Gate:
    def __init__(self) -> None:
        self.live = True

    def is_live(self, token: tokens.VerifiedToken) -> bool:
        return self.live


def test_revocation_ends_a_running_stream(env: Env) -> None:
    gate = Gate()
    env.broker.services.token_gate = gate
    env.fake.state.faults.chunk_delay_s = 0.3
    token = env.token()
    lines = []
    with httpx.stream("POST", f"{env.broker.url}/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {token}"},
                      json={"model": "gpt-test", "messages": PROMPT, "stream": True}) as resp:
        for line in resp.iter_lines():
            lines.append(line)
            if _content(line) == "w0":
                gate.live = False
    assert any("token_revoked" in line for line in lines)
    assert "w15" not in "".join(_content(line) for line in lines)
    event = _only_event(env, token)
    assert event["status"] == "revoked"
    _assert_bounded(env, event, prompt_at_least=_prompt_tokens({"messages": PROMPT}),
                    completion_at_least=1)


def test_a_ledger_that_cannot_hold_refuses_before_any_provider_call(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    token = env.token()
    client = _openai(env, token)
    client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=1)

    def down(fn: Any) -> Any:
        raise LedgerUnavailable("the database did not answer")

    monkeypatch.setattr(env.broker.services.db, "transaction", down)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=1)
    assert info.value.status_code == 503 and info.value.code == "service_unavailable"
    assert len(env.fake.state.requests) == 1


def test_a_cancelled_request_still_settles(env: Env) -> None:
    env.fake.state.faults.delay_s = 5
    token = env.token()
    svc = env.broker.services
    verified = tokens.verify(token, svc.keyring, issuer=svc.settings.issuer.url,
                             audience=svc.settings.issuer.audience)
    gateway = Gateway(svc)

    async def scenario() -> None:
        call = await gateway.begin(verified, "chat", {"model": "gpt-test", "messages": PROMPT},
                                   {}, request_id="req_cancel", client_ip=None)
        with anyio.move_on_after(0.5):
            result = await gateway.forward(call, {})
            assert not isinstance(result, MeteredStream)
        await gateway.aclose()

    anyio.run(scenario)
    event = _only_event(env, token)
    assert (event["request_id"], event["status"]) == ("req_cancel", "cancelled")
    # Sent, then abandoned: the provider may bill it all, so the whole hold is charged.
    limit = env.fake.state.requests[0]["max_completion_tokens"]
    _assert_paid_for(event, event["prompt_tokens"], limit)
    assert jwt.decode(token, options={"verify_signature": False})["jti"] == event["jti"]


def test_anthropic_stream_of_a_provider_ignoring_the_limit_ends_cleanly(per_token: Env) -> None:
    env = per_token
    env.fake.state.faults.ignore_max_tokens = True
    token = env.token(budget=10)
    client = _anthropic(env, token)
    with client.messages.stream(model="claude-test", max_tokens=500, messages=CLAUDE_PROMPT) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens"
    [block] = final.content
    assert isinstance(block, anthropic.types.TextBlock) and 10 <= len(block.text.split()) <= 13
    event = _only_event(env, token)
    assert (event["status"], event["cost_micros"]) == ("hold_exceeded", 10)
