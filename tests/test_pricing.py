"""Price math: integer micro-dollars, rounded up once per call, exact for every token class
(cache reads and writes, service tiers), and an output limit that a budget pays for exactly."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from broker.money.pricing import Price, Usage
from broker.settings import ModelSettings


def _model(pin: int, pout: int, **extra: int | None) -> ModelSettings:
    return ModelSettings(provider="p", input_micros_per_mtok=pin, output_micros_per_mtok=pout,
                         **extra)


_models = st.builds(
    _model, st.integers(0, 10**9), st.integers(0, 10**9),
    cached_input_micros_per_mtok=st.one_of(st.none(), st.integers(0, 10**9)),
    cache_write_micros_per_mtok=st.one_of(st.none(), st.integers(0, 10**9)),
)
_tokens = st.integers(0, 10**7)
_usages = st.builds(
    lambda uncached, out, read, write, hour: Usage(uncached + read + write + hour, out, read,
                                                   write, hour),
    _tokens, _tokens, _tokens, _tokens, _tokens)


def _exact(model: ModelSettings, usage: Usage, percent: int = 100) -> Fraction:
    """The invoice in micro-dollars, as a fraction: the reference the integer math must meet."""
    pin = Fraction(model.input_micros_per_mtok)
    cached = Fraction(model.cached_input_micros_per_mtok if model.cached_input_micros_per_mtok
                      is not None else model.input_micros_per_mtok)
    write = (Fraction(model.cache_write_micros_per_mtok) if model.cache_write_micros_per_mtok
             is not None else pin * Fraction(5, 4))
    total = (usage.uncached_tokens * pin + usage.cached_tokens * cached
             + usage.cache_write_tokens * write + usage.cache_write_1h_tokens * 2 * pin
             + usage.completion_tokens * model.output_micros_per_mtok)
    return total * Fraction(percent, 100) / 1_000_000


def test_cost_rounds_up_to_the_next_micro() -> None:
    price = Price.of(_model(150_000, 600_000))
    assert price.cost(Usage(1, 0)) == 1  # 0.15 micro is never free
    assert price.cost(Usage(10, 0)) == 2  # 1.5 -> 2
    assert price.cost(Usage(1_000_000, 1_000_000)) == 750_000
    assert price.cost(Usage(0, 0)) == 0


def test_cache_writes_cost_a_quarter_more_and_one_hour_writes_double() -> None:
    price = Price.of(_model(3_000_000, 15_000_000))
    assert price.cost(Usage(1_000_000, 0, cache_write_tokens=1_000_000)) == 3_750_000
    assert price.cost(Usage(1_000_000, 0, cache_write_1h_tokens=1_000_000)) == 6_000_000
    # Cache reads default to the input price (never less than the provider bills)...
    assert price.cost(Usage(1_000_000, 0, cached_tokens=1_000_000)) == 3_000_000
    # ...and follow the configured invoice price when there is one.
    cheap = Price.of(_model(3_000_000, 15_000_000, cached_input_micros_per_mtok=300_000))
    assert cheap.cost(Usage(1_000_000, 0, cached_tokens=1_000_000)) == 300_000


def test_a_service_tier_is_a_percentage_of_the_list_price() -> None:
    assert Price.of(_model(1_000_000, 2_000_000), 200).cost(Usage(1_000_000, 1_000_000)) == 6_000_000
    assert Price.of(_model(1_000_001, 0), 50).cost(Usage(1_000_000, 0)) == 500_001  # 500,000.5 up


def test_the_worst_input_is_the_dearest_class_the_request_allows() -> None:
    price = Price.of(_model(1_000_000, 0))
    assert price.cost(price.worst_input(1_000_000, None)) == 1_000_000
    assert price.cost(price.worst_input(1_000_000, "5m")) == 1_250_000
    assert price.cost(price.worst_input(1_000_000, "1h")) == 2_000_000


def test_the_worst_class_is_chosen_by_exact_cost_not_by_rounded_cost() -> None:
    # 23,855 input tokens at 15 micro per Mtok round to 1 micro in every class, but a one-hour
    # write costs twice the input exactly; with the output added, that difference shows.
    price = Price.of(_model(15, 523_152_088))
    hour = Usage(23_855, 115, cache_write_1h_tokens=20_010)
    assert price.cost(hour) <= price.cost(price.worst_case(23_855, 115, "1h"))


def test_free_output_sets_no_limit_but_the_input_must_fit() -> None:
    price = Price.of(_model(1_000_000, 0))
    assert price.max_output_tokens(Usage(10, 0), 10) is None
    limit = price.max_output_tokens(Usage(11, 0), 10)
    assert limit is not None and limit < 0


@given(model=_models, usage=_usages, percent=st.sampled_from([1, 50, 100, 150, 200, 10_000]))
def test_cost_is_the_exact_ceiling_of_the_invoice(model: ModelSettings, usage: Usage,
                                                  percent: int) -> None:
    exact = _exact(model, usage, percent)
    cost = Price.of(model, percent).cost(usage)
    assert cost - 1 < exact <= cost or exact == cost == 0


@given(model=_models, usage=_usages, cache=st.sampled_from([None, "5m", "1h"]))
def test_no_split_of_the_input_costs_more_than_the_worst(model: ModelSettings, usage: Usage,
                                                         cache: str | None) -> None:
    price = Price.of(model)
    if cache is None:
        usage = Usage(usage.prompt_tokens - usage.cache_write_tokens - usage.cache_write_1h_tokens,
                      usage.completion_tokens, usage.cached_tokens)
    elif cache == "5m":
        usage = Usage(usage.prompt_tokens - usage.cache_write_1h_tokens, usage.completion_tokens,
                      usage.cached_tokens, usage.cache_write_tokens)
    worst = price.worst_case(usage.prompt_tokens, usage.completion_tokens, cache)  # type: ignore[arg-type]
    assert price.cost(usage) <= price.cost(worst)


@given(model=_models, prompt=_tokens, budget=st.integers(0, 10**12))
def test_the_largest_affordable_output_fits_and_one_more_does_not(
        model: ModelSettings, prompt: int, budget: int) -> None:
    price = Price.of(model)
    limit = price.max_output_tokens(Usage(prompt, 0), budget)
    if limit is None:
        assert model.output_micros_per_mtok == 0 and price.cost(Usage(prompt, 0)) <= budget
    elif limit < 0:
        assert price.cost(Usage(prompt, 0)) > budget
    else:
        assert price.cost(Usage(prompt, limit)) <= budget
        assert price.cost(Usage(prompt, limit + 1)) > budget
