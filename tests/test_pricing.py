"""Price math: integer micro-dollars, rounded up, and an output limit that a budget pays for exactly."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from broker.pricing import Price, cost_micros, max_output_tokens

_prices = st.builds(Price, st.integers(0, 10**9), st.integers(0, 10**9))
_tokens = st.integers(0, 10**7)


def test_cost_rounds_up_to_the_next_micro() -> None:
    price = Price(input_micros_per_mtok=150_000, output_micros_per_mtok=600_000)
    assert cost_micros(price, 1, 0) == 1  # 0.15 micro is never free
    assert cost_micros(price, 10, 0) == 2  # 1.5 -> 2
    assert cost_micros(price, 1_000_000, 1_000_000) == 750_000
    assert cost_micros(price, 0, 0) == 0


def test_free_output_sets_no_limit_but_the_input_must_fit() -> None:
    price = Price(input_micros_per_mtok=1_000_000, output_micros_per_mtok=0)
    assert max_output_tokens(price, 10, 10) is None
    limit = max_output_tokens(price, 11, 10)
    assert limit is not None and limit < 0


@given(price=_prices, prompt=_tokens, completion=_tokens)
def test_cost_is_the_exact_ceiling(price: Price, prompt: int, completion: int) -> None:
    exact = prompt * price.input_micros_per_mtok + completion * price.output_micros_per_mtok
    cost = cost_micros(price, prompt, completion)
    assert (cost - 1) * 1_000_000 < exact <= cost * 1_000_000 or exact == cost == 0


@given(price=_prices, prompt=_tokens, budget=st.integers(0, 10**12))
def test_the_largest_affordable_output_fits_and_one_more_does_not(
        price: Price, prompt: int, budget: int) -> None:
    limit = max_output_tokens(price, prompt, budget)
    if limit is None:
        assert price.output_micros_per_mtok == 0 and cost_micros(price, prompt, 0) <= budget
    elif limit < 0:
        assert cost_micros(price, prompt, 0) > budget
    else:
        assert cost_micros(price, prompt, limit) <= budget
        assert cost_micros(price, prompt, limit + 1) > budget
