"""One quote per call: the output limit a budget pays for, the worst case held, and the bound
charged when the provider's usage is missing, all from one immutable value."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import InsufficientQuota
from broker.gateway.quote import DEFAULT_OUTPUT_LIMIT, NO_TOOLS, Quote, ToolLoad, quote
from broker.money.bounds import RequestBound
from broker.money.pricing import CacheTtl, Price, Usage
from broker.plugin import Operation
from broker.settings import ModelSettings

# One micro-dollar per input token, two per output token: sums that can be checked by hand.
MODEL = ModelSettings(provider="p", input_micros_per_mtok=1_000_000, output_micros_per_mtok=2_000_000)


def _quote(budget: int, *, input_tokens: int = 100, requested: int | None = None, choices: int = 1,
           op: Operation = "chat", extra: int = 0, cache: CacheTtl | None = None,
           model: ModelSettings = MODEL, percent: int = 100) -> Quote:
    bound = RequestBound(input_tokens, cache=cache, extra_output_tokens=extra, price_percent=percent)
    return quote(bound, model, op=op, requested=requested, choices=choices, budget=budget)


def test_the_held_amount_is_the_cost_of_the_worst_case() -> None:
    q = _quote(10**9, requested=50, choices=3, extra=7, cache="1h")
    price = Price.of(MODEL)
    assert q.price == price
    assert q.worst == price.worst_case(100, 50 * 3 + 7, "1h")
    assert q.held == price.cost(q.worst)
    # A one-hour cache write costs twice the input: the worst input is all of it written.
    assert q.worst == Usage(100, 157, cache_write_1h_tokens=100)
    assert q.held == 2 * 100 + 2 * 157


def test_the_worst_case_cannot_disagree_with_the_rest_of_the_quote() -> None:
    q = _quote(10**9, requested=10)
    with pytest.raises(TypeError):
        Quote(q.price, 1, None, 0, 1, 1, q.worst, q.held)  # type: ignore[call-arg, arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.held = 0  # type: ignore[misc]
    assert dataclasses.replace(q, output_limit=20).held == 100 + 2 * 20


def test_without_a_limit_asked_the_default_is_set_and_embeddings_have_none() -> None:
    assert _quote(10**9).output_limit == DEFAULT_OUTPUT_LIMIT
    assert _quote(10**9, requested=7).output_limit == 7
    embeddings = _quote(10**9, op="embeddings", requested=None)
    assert (embeddings.output_limit, embeddings.worst.completion_tokens) == (0, 0)
    assert embeddings.held == 100


def test_the_output_limit_shrinks_to_what_the_budget_pays_for() -> None:
    # 300 micro-dollars: 100 for the input, 200 for 100 output tokens, 50 per answer.
    q = _quote(300, requested=4096, choices=2)
    assert (q.output_limit, q.answer_tokens, q.output_cap) == (50, 100, 100)
    assert q.held == 300
    # One micro-dollar short: the 100th output token no longer fits, and an answer is whole.
    q = _quote(299, requested=4096, choices=2)
    assert (q.output_limit, q.held) == (49, 100 + 2 * 98)


def test_output_the_request_adds_is_paid_before_the_answers() -> None:
    q = _quote(300, requested=4096, extra=40)
    assert (q.output_limit, q.output_cap, q.held) == (60, 100, 300)


def test_a_service_tier_is_priced_into_the_quote() -> None:
    q = _quote(10**9, requested=10, percent=200)
    assert q.held == 2 * (100 + 2 * 10)
    assert _quote(240, requested=4096, percent=200).output_limit == 10


def test_the_admission_quote_keeps_one_token_per_answer_and_the_hold_refuses_it() -> None:
    q = _quote(101, requested=4096, choices=2)
    assert q.output_limit == 1 and q.held > 101  # counted by the limiter, refused by the hold
    with pytest.raises(InsufficientQuota, match="cannot pay for an answer"):
        q.within(101)


def test_refused_when_not_even_the_input_fits() -> None:
    with pytest.raises(InsufficientQuota, match="cannot pay for an answer"):
        _quote(10**9, requested=10).within(99)
    embeddings = _quote(10**9, op="embeddings")
    with pytest.raises(InsufficientQuota, match="cannot pay for this input"):
        embeddings.within(99)
    assert embeddings.within(100) == embeddings
    with pytest.raises(InsufficientQuota):
        _quote(10**9, requested=10).within(-5)  # a slice overrun: nothing is left


def test_within_a_smaller_budget_only_lowers_the_output_limit() -> None:
    q = _quote(10**9, requested=100, choices=2, extra=4, cache="5m")
    assert q.within(10**9) == q
    smaller = q.within(q.held - 1)
    assert smaller.output_limit == q.output_limit - 1
    assert (smaller.price, smaller.input_tokens, smaller.cache, smaller.choices,
            smaller.extra_output_tokens) == (q.price, 100, "5m", 2, 4)
    assert smaller.held <= q.held - 1


def test_free_output_sets_no_limit_while_the_input_fits() -> None:
    free = ModelSettings(provider="p", input_micros_per_mtok=1_000_000, output_micros_per_mtok=0)
    q = _quote(100, model=free, requested=None)
    assert (q.output_limit, q.held) == (DEFAULT_OUTPUT_LIMIT, 100)
    with pytest.raises(InsufficientQuota, match="cannot pay for an answer"):
        q.within(99)


def test_the_bound_without_usage_never_passes_the_hold() -> None:
    q = _quote(10**9, requested=10, choices=2, extra=3, cache="5m")
    # Nothing reported: the worst input, the output seen, capped at what may be billed.
    assert q.bounded(None, 5) == Usage(100, 5, cache_write_tokens=100)
    assert q.bounded(None, 10**6) == Usage(100, 23, cache_write_tokens=100)
    # The input the provider reported, and the higher of its output count and the output seen.
    reported = Usage(80, 9, cached_tokens=30)
    assert q.bounded(reported, 4) == Usage(80, 9, cached_tokens=30)
    assert q.bounded(reported, 12) == Usage(80, 12, cached_tokens=30)
    assert q.price.cost(q.bounded(None, 10**6)) == q.held


# --- the quote is the arithmetic the gateway did before it had one ----------------------------


def _reference(price: Price, bound: RequestBound, op: Operation, requested: int | None,
               choices: int, budget: int, remaining: int) -> tuple[int, int, int | str]:
    """The admission limit, its cost, and the held limit (or the refusal) as the gateway computed
    them in ``begin`` and ``_hold`` before quotes."""

    def affordable(money: int) -> int | None:
        most = price.max_output_tokens(price.worst_input(bound.input_tokens, bound.cache), money)
        return None if most is None else most - bound.extra_output_tokens

    def amount_for(limit: int) -> int:
        return price.cost(price.worst_case(
            bound.input_tokens, limit * choices + bound.extra_output_tokens, bound.cache))

    wanted = 0 if op == "embeddings" else requested or DEFAULT_OUTPUT_LIMIT
    most = affordable(budget)
    if most is not None and op != "embeddings":
        wanted = max(1, min(wanted, most // choices))
    limit = wanted
    most = affordable(remaining)
    if most is not None and op != "embeddings":
        limit = min(limit, most // choices)
        if limit < 1:
            return wanted, amount_for(wanted), "answer"
    elif most is not None and most < 0:
        return wanted, amount_for(wanted), "input"
    return wanted, amount_for(wanted), limit


_micros = st.integers(0, 10**8)


@given(pin=_micros, pout=_micros, cached=st.one_of(st.none(), _micros),
       write=st.one_of(st.none(), _micros), percent=st.integers(1, 400),
       input_tokens=st.integers(0, 10**6), extra=st.integers(0, 10**4),
       cache=st.sampled_from([None, "5m", "1h"]), op=st.sampled_from(["chat", "embeddings"]),
       requested=st.one_of(st.none(), st.integers(1, 10**5)), choices=st.integers(1, 8),
       budget=st.integers(0, 10**7), spent=st.integers(-10**3, 10**7))
def test_the_quote_matches_the_arithmetic_it_replaced(
        pin: int, pout: int, cached: int | None, write: int | None, percent: int,
        input_tokens: int, extra: int, cache: CacheTtl | None, op: Operation,
        requested: int | None, choices: int, budget: int, spent: int) -> None:
    model = ModelSettings(provider="p", input_micros_per_mtok=pin, output_micros_per_mtok=pout,
                          cached_input_micros_per_mtok=cached, cache_write_micros_per_mtok=write)
    bound = RequestBound(input_tokens, cache=cache, extra_output_tokens=extra, price_percent=percent)
    remaining = min(budget, budget - spent)
    admitted = quote(bound, model, op=op, requested=requested, choices=choices, budget=budget)
    limit, amount, held = _reference(Price.of(model, percent), bound, op, requested, choices,
                                     budget, remaining)
    assert (admitted.output_limit, admitted.held) == (limit, amount)
    if isinstance(held, str):
        with pytest.raises(InsufficientQuota, match=f"cannot pay for (an|this) {held}"):
            admitted.within(remaining)
        return
    within = admitted.within(remaining)
    assert within.output_limit == held
    assert within.held <= remaining
    if op == "chat" and held < limit:  # lowered as little as the money allows
        assert dataclasses.replace(within, output_limit=held + 1).held > remaining


# --- server-side tools ------------------------------------------------------------------------


def _tool_quote(budget: int, load: ToolLoad, *, input_tokens: int = 100,
                requested: int | None = 10) -> Quote:
    return quote(RequestBound(input_tokens), MODEL, op="responses", requested=requested,
                 choices=1, budget=budget, tools=load)


def test_with_server_side_tools_every_turn_rereads_input_results_and_output() -> None:
    # Two calls: up to three model turns, each reading the input (100), both results (50) and
    # the output (10): 480 input tokens, 10 output tokens and 30 of fees.
    q = _tool_quote(10**9, ToolLoad(calls=2, result_tokens=50, fee_micros=30))
    assert q.billed_input_tokens == 3 * (100 + 50 + 10)
    assert q.worst == Usage(480, 10, cached_tokens=0)
    assert q.held == 480 + 2 * 10 + 30
    assert _tool_quote(10**9, NO_TOOLS).held == 100 + 2 * 10


def test_with_tools_the_output_limit_is_the_largest_the_budget_pays_for() -> None:
    load = ToolLoad(calls=1, result_tokens=0, fee_micros=100)
    # 2 turns x (100 + o) input + 2 o output + 100 fees <= 1000  =>  o <= 175.
    q = _tool_quote(1000, load, requested=4096)
    assert (q.output_limit, q.held) == (175, 1000)
    with pytest.raises(InsufficientQuota):
        _tool_quote(10**9, load).within(200 + 100 + 3)  # not one token of output fits


@given(budget=st.integers(0, 10**6), input_tokens=st.integers(0, 5_000),
       calls=st.integers(1, 8), result=st.integers(0, 5_000), fee=st.integers(0, 50_000),
       requested=st.integers(1, 10_000))
def test_a_tool_quote_that_fits_is_the_most_that_fits_and_bounds_every_bill(
        budget: int, input_tokens: int, calls: int, result: int, fee: int,
        requested: int) -> None:
    load = ToolLoad(calls, calls * result, fee)
    q = _tool_quote(budget, load, input_tokens=input_tokens, requested=requested)
    if q.held <= budget and q.output_limit < requested:
        assert dataclasses.replace(q, output_limit=q.output_limit + 1).held > budget
    # Whatever the provider bills within the caps costs at most the hold.
    turns = calls + 1
    bill = Usage(turns * (input_tokens + calls * result + q.output_cap), q.output_cap)
    assert q.price.cost(bill) + fee <= q.held
