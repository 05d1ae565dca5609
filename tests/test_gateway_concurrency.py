"""Concurrent calls on one slice: the slice is a hard wall, and the usage events account for
every micro spent, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import Broker
from tests.fake_provider import FakeProviderServer
from tests.gateway_support import Env, make_env

CALLS = 200
PAID_CALLS = 10
TOKENS_PER_CALL = 4  # the fake answers exactly max_tokens words below 16
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count to four."}]


@pytest.fixture
def env(make_live_broker: Callable[..., Broker], db_url: str, fake: FakeProviderServer) -> Env:
    # Free input and one micro per output token: a call's hold equals its cost exactly, so the
    # slice pays for PAID_CALLS calls and not one token more.
    return make_env(make_live_broker, db_url, fake, pin=0, pout=1_000_000)


async def _storm(url: str, token: str) -> list[str]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0, timeout=120)

    async def one(i: int) -> str:
        try:
            if i % 2:
                stream = await client.chat.completions.create(
                    model="gpt-test", messages=PROMPT, max_tokens=TOKENS_PER_CALL, stream=True)
                text = "".join([c.choices[0].delta.content or "" async for c in stream
                                if c.choices])
            else:
                resp = await client.chat.completions.create(
                    model="gpt-test", messages=PROMPT, max_tokens=TOKENS_PER_CALL)
                text = resp.choices[0].message.content or ""
            # An answer is whole, or cut short by a limit the broker lowered to the slice.
            assert text and "w0 w1 w2 w3".startswith(text)
            return "ok" if text == "w0 w1 w2 w3" else "ok, clamped"
        except openai.APIStatusError as exc:
            return f"{exc.status_code} {exc.code}"

    try:
        return await asyncio.gather(*(one(i) for i in range(CALLS)))
    finally:
        await client.close()


def test_concurrent_calls_never_spend_past_the_slice(env: Env) -> None:
    slice_micros = PAID_CALLS * TOKENS_PER_CALL
    token = env.token(budget=slice_micros)
    assert env.broker.url
    outcomes = Counter(asyncio.run(_storm(env.broker.url, token)))

    assert outcomes == {"ok": PAID_CALLS, "429 insufficient_quota": CALLS - PAID_CALLS}
    events = env.wait_for_events(PAID_CALLS)
    held = env.slice_of(token)
    assert (held["spent_micros"], held["held_micros"]) == (slice_micros, 0)
    assert sum(e["cost_micros"] for e in events) == held["spent_micros"]
    assert len(events) == PAID_CALLS
    assert {e["status"] for e in events} == {"ok"}
    assert len(env.fake.state.requests) == PAID_CALLS


@pytest.fixture
def priced(make_live_broker: Callable[..., Broker], db_url: str, fake: FakeProviderServer) -> Env:
    return make_env(make_live_broker, db_url, fake)


def test_holds_larger_than_costs_still_account_for_every_micro(priced: Env) -> None:
    # The input estimate errs high, so each call settles below its hold and the freed room
    # admits later calls (some with a lowered limit): the wall and the accounting must hold.
    env = priced
    slice_micros = 300
    token = env.token(budget=slice_micros)
    assert env.broker.url
    outcomes = Counter(asyncio.run(_storm(env.broker.url, token)))

    assert set(outcomes) <= {"ok", "ok, clamped", "429 insufficient_quota"}, outcomes
    answered = outcomes["ok"] + outcomes["ok, clamped"]
    events = env.wait_for_events(answered)
    held = env.slice_of(token)
    assert held["held_micros"] == 0
    assert 0 < held["spent_micros"] <= slice_micros
    assert sum(e["cost_micros"] for e in events) == held["spent_micros"]
    assert len(events) == len(env.fake.state.requests) == answered
