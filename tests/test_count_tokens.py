"""Anthropic's token counting passes through the gateway: free (nothing held, nothing charged,
no usage event), but only for a verified token, a model its policy allows, and within its rates."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from tests.gateway_support import Env
from tests.sdk_support import Sdks

MESSAGES: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Count me, please."}]


def test_the_sdk_helper_counts_through_the_broker_for_free(env: Env, sdk: Sdks) -> None:
    token = env.token()
    counted = sdk.broker_anthropic(env, token).messages.count_tokens(model="claude-test", messages=MESSAGES)
    direct = httpx.post(f"{env.fake.url}/v1/messages/count_tokens",
                        headers={"x-api-key": env.key, "anthropic-version": "2023-06-01"},
                        json={"model": "mock-claude", "messages": MESSAGES})
    assert counted.input_tokens == direct.json()["input_tokens"] > 0
    assert env.events() == []
    assert env.slice_of(token)["spent_micros"] == 0 and env.slice_of(token)["held_micros"] == 0
    assert env.fake.state.received_keys[0] == env.key  # the provider key, never the token


def test_a_model_the_token_may_not_use_is_refused_in_anthropics_dialect(env: Env, sdk: Sdks) -> None:
    with pytest.raises(anthropic.PermissionDeniedError):
        sdk.broker_anthropic(env, env.token(models=["gpt-test"])).messages.count_tokens(
            model="claude-test", messages=MESSAGES)


def test_counting_needs_a_live_token(env: Env) -> None:
    resp = httpx.post(f"{env.broker.url}/v1/messages/count_tokens",
                      headers={"x-api-key": "not-a-token"},
                      json={"model": "claude-test", "messages": MESSAGES})
    assert resp.status_code == 401
    assert resp.json()["type"] == "error"


def test_counting_counts_against_the_request_rate(env: Env, sdk: Sdks) -> None:
    api = sdk.broker_anthropic(env, env.token(rate={"rpm": 2, "tpm": 10**9}))
    for _ in range(2):
        api.messages.count_tokens(model="claude-test", messages=MESSAGES)
    with pytest.raises(anthropic.RateLimitError):
        api.messages.count_tokens(model="claude-test", messages=MESSAGES)
